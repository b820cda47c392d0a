//! The host side of the contract: [`PluginState`], the data of one job's Store,
//! and the implementations of the `host` interface the plugin imports.
//!
//! What a plugin gets is exactly what is here: its job's link and image, progress
//! and log, sleep and a clock that starts at zero. WASI is linked only for the
//! `wasi:io` and `wasi:cli` interfaces that Rust's std imports by itself, with an
//! empty context (no arguments, environment or preopens; stdout and stderr are
//! captured into the job's log).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::latest::otagw::plugin::host as wit_host;
use super::bindings::latest::otagw::plugin::types as wit;
use crate::link::{
    Link, LinkError, LinkFeature, LinkKind, MAX_READ, Parity, SerialConfig, StopBits,
};
use crate::progress::{JobEvent, LogLevel, Phase};

/// The image of a job as the plugin sees it: a size and reads at an offset.
///
/// Implemented by files (for `otagw flash`) and by the firmware cache.
pub trait ImageSource: Send + Sync {
    fn size(&self) -> u64;
    /// Read up to `len` bytes at `offset`; fewer only at the end.
    fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
}

/// A firmware image in a local file.
#[derive(Debug)]
pub struct FileImage {
    file: std::fs::File,
    size: u64,
}

impl FileImage {
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

impl ImageSource for FileImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let len = len.min(self.size.saturating_sub(offset) as usize);
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = self.file.read_at(&mut buf[got..], offset + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }
}

/// An image in memory (tests, small images).
impl ImageSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let start = (offset as usize).min(self.len());
        let end = start.saturating_add(len).min(self.len());
        Ok(self[start..end].to_vec())
    }
}

/// The `image` resource's host representation.
pub struct ImageHandle(pub Arc<dyn ImageSource>);

/// Why the host stopped a plugin, recorded where the trap happens so the error
/// can name it precisely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    Memory { wanted: usize },
    Cpu,
}

/// The data of one job's Store.
pub struct PluginState {
    pub(crate) table: ResourceTable,
    wasi: WasiCtx,
    pub(crate) stderr: MemoryOutputPipe,
    limits: StoreLimits,
    memory_limit: usize,
    /// Epoch ticks the guest has run since it last called the host.
    pub(crate) ticks_without_host: u64,
    pub(crate) stop: Option<Stop>,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
    started: Instant,
    max_sleep: Duration,
    last_progress: Option<(Phase, u64, Instant)>,
    log_lines: u32,
    pub(crate) plugin: String,
}

/// Log lines a job may write before the rest are dropped (one notice says so).
const MAX_LOG_LINES: u32 = 2_000;
/// Captured stdout/stderr of a guest.
const CAPTURE: usize = 64 * 1024;

impl PluginState {
    pub(crate) fn new(
        plugin: String,
        memory_limit: usize,
        events: Option<mpsc::UnboundedSender<JobEvent>>,
        max_sleep: Duration,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(CAPTURE);
        let wasi = WasiCtx::builder()
            .stdout(stderr.clone())
            .stderr(stderr.clone())
            .build();
        Self {
            table: ResourceTable::new(),
            wasi,
            stderr,
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(memory_limit)
                .instances(16)
                .tables(16)
                .memories(4)
                .build(),
            memory_limit,
            ticks_without_host: 0,
            stop: None,
            events,
            started: Instant::now(),
            max_sleep,
            last_progress: None,
            log_lines: 0,
            plugin,
        }
    }

    /// The guest called the host: it is making progress.
    fn touch(&mut self) {
        self.ticks_without_host = 0;
    }

    fn emit(&self, ev: JobEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    /// The last lines the guest wrote to stdout/stderr (a panic message, usually).
    pub(crate) fn captured_tail(&self) -> String {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let start = lines.len().saturating_sub(3);
        lines[start..].join(" | ")
    }

    fn link(&mut self, r: &Resource<Link>) -> wasmtime::Result<&mut Link> {
        Ok(self.table.get_mut(r)?)
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for PluginState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.stop = Some(Stop::Memory { wanted: desired });
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} exceeded (the plugin asked for {desired} bytes)",
                human_bytes(self.memory_limit)
            )));
        }
        self.limits.memory_growing(current, desired, maximum)
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
    fn instances(&self) -> usize {
        self.limits.instances()
    }
    fn tables(&self) -> usize {
        self.limits.tables()
    }
    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

pub(crate) fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

fn to_wit_link_error(e: LinkError) -> wit::LinkError {
    let m = e.to_string();
    match e {
        LinkError::Unsupported { .. } => wit::LinkError::Unsupported(m),
        LinkError::Closed { .. } | LinkError::Stopped { .. } => wit::LinkError::Closed(m),
        LinkError::Timeout { .. } => wit::LinkError::Timeout(m),
        LinkError::NotFound { .. } => wit::LinkError::NotFound(m),
        LinkError::Invalid { .. } => wit::LinkError::Invalid(m),
        LinkError::BadUrl { .. } | LinkError::Open { .. } | LinkError::Io { .. } => {
            wit::LinkError::Io(m)
        }
    }
}

pub(crate) fn serial_from_wit(c: wit::SerialConfig) -> SerialConfig {
    SerialConfig {
        baud: c.baud,
        data_bits: c.data_bits,
        parity: match c.parity {
            wit::Parity::None => Parity::None,
            wit::Parity::Odd => Parity::Odd,
            wit::Parity::Even => Parity::Even,
        },
        stop_bits: match c.stop_bits {
            wit::StopBits::One => StopBits::One,
            wit::StopBits::Two => StopBits::Two,
        },
    }
}

impl From<wit::Phase> for Phase {
    fn from(p: wit::Phase) -> Self {
        match p {
            wit::Phase::Prepare => Phase::Prepare,
            wit::Phase::Erase => Phase::Erase,
            wit::Phase::Transfer => Phase::Transfer,
            wit::Phase::Verify => Phase::Verify,
            wit::Phase::Finish => Phase::Finish,
        }
    }
}

impl From<wit::LogLevel> for LogLevel {
    fn from(l: wit::LogLevel) -> Self {
        match l {
            wit::LogLevel::Trace => LogLevel::Trace,
            wit::LogLevel::Debug => LogLevel::Debug,
            wit::LogLevel::Info => LogLevel::Info,
            wit::LogLevel::Warn => LogLevel::Warn,
            wit::LogLevel::Error => LogLevel::Error,
        }
    }
}

/// The longest a plugin may wait in one `reopen` (the contract's cap).
const MAX_REOPEN: Duration = Duration::from_secs(600);
/// The longest a plugin may wait in one `read` or `gatt-receive`.
const MAX_WAIT: Duration = Duration::from_secs(60);

impl wit::Host for PluginState {}

impl wit_host::Host for PluginState {
    async fn progress(&mut self, done: u64, total: u64, phase: wit::Phase) -> wasmtime::Result<()> {
        self.touch();
        let phase = Phase::from(phase);
        let now = Instant::now();
        // Coalesce: a plugin may report every byte; consumers need at most
        // ~1000 steps a phase or ten a second.
        let due = match self.last_progress {
            None => true,
            Some((p, d, t)) => {
                p != phase
                    || done >= total
                    || done.saturating_sub(d) >= total / 1000
                    || now.duration_since(t) >= Duration::from_millis(100)
            }
        };
        if due {
            self.last_progress = Some((phase, done, now));
            self.emit(JobEvent::Progress { done, total, phase });
        }
        Ok(())
    }

    async fn log(&mut self, level: wit::LogLevel, message: String) -> wasmtime::Result<()> {
        self.touch();
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            if self.log_lines == MAX_LOG_LINES + 1 {
                self.emit(JobEvent::Log {
                    level: LogLevel::Warn,
                    message: format!(
                        "plugin {} logs too much; further lines dropped",
                        self.plugin
                    ),
                });
            }
            return Ok(());
        }
        let mut message = message;
        if message.len() > 1024 {
            let mut cut = 1024;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let level = LogLevel::from(level);
        level.trace(&self.plugin, &message);
        self.emit(JobEvent::Log { level, message });
        Ok(())
    }

    async fn sleep(&mut self, ms: u32) -> wasmtime::Result<()> {
        self.touch();
        tokio::time::sleep(Duration::from_millis(ms.into()).min(self.max_sleep)).await;
        self.touch();
        Ok(())
    }

    async fn now_ms(&mut self) -> wasmtime::Result<u64> {
        self.touch();
        Ok(self.started.elapsed().as_millis() as u64)
    }
}

/// Run one link operation: count the call as progress before and after (it
/// may wait on the device), and hand the plugin the contract's error.
macro_rules! link_call {
    ($state:ident, $link:ident, |$l:ident| $op:expr) => {{
        $state.touch();
        let $l = $state.link(&$link)?;
        let r = $op;
        $state.touch();
        Ok(r.map_err(to_wit_link_error))
    }};
}

impl wit_host::HostLink for PluginState {
    async fn write(
        &mut self,
        link: Resource<Link>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        link_call!(self, link, |l| l.write(&data).await)
    }

    async fn read(
        &mut self,
        link: Resource<Link>,
        max: u32,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, wit::LinkError>> {
        let timeout = Duration::from_millis(timeout_ms.into()).min(MAX_WAIT);
        link_call!(self, link, |l| l
            .read((max as usize).min(MAX_READ), timeout)
            .await)
    }

    async fn drain(
        &mut self,
        link: Resource<Link>,
    ) -> wasmtime::Result<Result<u32, wit::LinkError>> {
        link_call!(self, link, |l| l.drain().await)
    }

    async fn configure(
        &mut self,
        link: Resource<Link>,
        config: wit::SerialConfig,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        let c = serial_from_wit(config);
        link_call!(self, link, |l| l.configure_for_plugin(&c))
    }

    async fn set_lines(
        &mut self,
        link: Resource<Link>,
        dtr: bool,
        rts: bool,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        link_call!(self, link, |l| l.set_lines(dtr, rts))
    }

    async fn mtu(&mut self, link: Resource<Link>) -> wasmtime::Result<u32> {
        self.touch();
        Ok(self.link(&link)?.mtu())
    }

    async fn kind(&mut self, link: Resource<Link>) -> wasmtime::Result<wit::LinkKind> {
        self.touch();
        Ok(match self.link(&link)?.kind() {
            LinkKind::Serial => wit::LinkKind::Serial,
            LinkKind::Tcp => wit::LinkKind::Tcp,
            LinkKind::Ble => wit::LinkKind::Ble,
        })
    }

    async fn supports(
        &mut self,
        link: Resource<Link>,
        feature: wit::LinkFeature,
    ) -> wasmtime::Result<bool> {
        self.touch();
        Ok(self.link(&link)?.supports(match feature {
            wit::LinkFeature::Configure => LinkFeature::Configure,
            wit::LinkFeature::ModemLines => LinkFeature::ModemLines,
            wit::LinkFeature::Reopen => LinkFeature::Reopen,
            wit::LinkFeature::Gatt => LinkFeature::Gatt,
        }))
    }

    async fn reopen(
        &mut self,
        link: Resource<Link>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        let timeout = Duration::from_millis(timeout_ms.into())
            .min(MAX_REOPEN)
            .min(self.max_sleep);
        link_call!(self, link, |l| l.reopen(timeout).await)
    }

    async fn gatt_write(
        &mut self,
        link: Resource<Link>,
        characteristic: String,
        data: Vec<u8>,
        mode: wit::GattWriteMode,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        let with_response = matches!(mode, wit::GattWriteMode::WithResponse);
        link_call!(self, link, |l| l
            .gatt_write(&characteristic, &data, with_response)
            .await)
    }

    async fn gatt_read(
        &mut self,
        link: Resource<Link>,
        characteristic: String,
    ) -> wasmtime::Result<Result<Vec<u8>, wit::LinkError>> {
        link_call!(self, link, |l| l.gatt_read(&characteristic).await)
    }

    async fn gatt_subscribe(
        &mut self,
        link: Resource<Link>,
        characteristic: String,
        delivery: wit::GattDelivery,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        let indicate = matches!(delivery, wit::GattDelivery::Indication);
        link_call!(self, link, |l| l
            .gatt_subscribe(&characteristic, indicate)
            .await)
    }

    async fn gatt_unsubscribe(
        &mut self,
        link: Resource<Link>,
        characteristic: String,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        link_call!(self, link, |l| l.gatt_unsubscribe(&characteristic).await)
    }

    async fn gatt_receive(
        &mut self,
        link: Resource<Link>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Option<wit::GattValue>, wit::LinkError>> {
        let timeout = Duration::from_millis(timeout_ms.into()).min(MAX_WAIT);
        link_call!(self, link, |l| l.gatt_receive(timeout).await.map(|v| v
            .map(|(characteristic, data)| wit::GattValue {
                characteristic,
                data
            })))
    }

    async fn drop(&mut self, _link: Resource<Link>) -> wasmtime::Result<()> {
        // The guest only ever borrows the link; the job owns it.
        Ok(())
    }
}

impl wit_host::HostImage for PluginState {
    async fn size(&mut self, image: Resource<ImageHandle>) -> wasmtime::Result<u64> {
        self.touch();
        Ok(self.table.get(&image)?.0.size())
    }

    async fn read(
        &mut self,
        image: Resource<ImageHandle>,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Vec<u8>> {
        self.touch();
        let src = self.table.get(&image)?.0.clone();
        let len = (len as usize).min(MAX_READ);
        // A failing image read is the host's fault, not the plugin's: trap with
        // the reason so the job fails naming it.
        let bytes = src.read_at(offset, len).map_err(|e| {
            wasmtime::Error::msg(format!("reading the image at offset {offset}: {e}"))
        })?;
        Ok(bytes)
    }

    async fn drop(&mut self, _image: Resource<ImageHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// Contract 0.1: the same host, its types converted to and from the latest.
mod v0_1 {
    use wasmtime::component::Resource;

    use super::wit;
    use super::{ImageHandle, PluginState};
    use crate::link::Link;
    use crate::plugin::bindings::v0_1_0::otagw::plugin::{host as old_host, types as old};

    fn link_error(e: wit::LinkError) -> old::LinkError {
        match e {
            wit::LinkError::Unsupported(m) => old::LinkError::Unsupported(m),
            wit::LinkError::Closed(m) => old::LinkError::Closed(m),
            // 0.1 has no names for these; they only arise from 0.2 calls.
            wit::LinkError::Timeout(m)
            | wit::LinkError::NotFound(m)
            | wit::LinkError::Invalid(m)
            | wit::LinkError::Io(m) => old::LinkError::Io(m),
        }
    }

    type Answer<T> = wasmtime::Result<Result<T, old::LinkError>>;

    fn old_answer<T>(r: wasmtime::Result<Result<T, wit::LinkError>>) -> Answer<T> {
        r.map(|r| r.map_err(link_error))
    }

    impl old::Host for PluginState {}

    impl old_host::Host for PluginState {
        async fn progress(
            &mut self,
            done: u64,
            total: u64,
            phase: old::Phase,
        ) -> wasmtime::Result<()> {
            let phase = match phase {
                old::Phase::Prepare => wit::Phase::Prepare,
                old::Phase::Erase => wit::Phase::Erase,
                old::Phase::Transfer => wit::Phase::Transfer,
                old::Phase::Verify => wit::Phase::Verify,
                old::Phase::Finish => wit::Phase::Finish,
            };
            super::wit_host::Host::progress(self, done, total, phase).await
        }

        async fn log(&mut self, level: old::LogLevel, message: String) -> wasmtime::Result<()> {
            let level = match level {
                old::LogLevel::Trace => wit::LogLevel::Trace,
                old::LogLevel::Debug => wit::LogLevel::Debug,
                old::LogLevel::Info => wit::LogLevel::Info,
                old::LogLevel::Warn => wit::LogLevel::Warn,
                old::LogLevel::Error => wit::LogLevel::Error,
            };
            super::wit_host::Host::log(self, level, message).await
        }

        async fn sleep(&mut self, ms: u32) -> wasmtime::Result<()> {
            super::wit_host::Host::sleep(self, ms).await
        }

        async fn now_ms(&mut self) -> wasmtime::Result<u64> {
            super::wit_host::Host::now_ms(self).await
        }
    }

    impl old_host::HostLink for PluginState {
        async fn write(&mut self, link: Resource<Link>, data: Vec<u8>) -> Answer<()> {
            old_answer(super::wit_host::HostLink::write(self, link, data).await)
        }

        async fn read(
            &mut self,
            link: Resource<Link>,
            max: u32,
            timeout_ms: u32,
        ) -> Answer<Vec<u8>> {
            old_answer(super::wit_host::HostLink::read(self, link, max, timeout_ms).await)
        }

        async fn drain(&mut self, link: Resource<Link>) -> Answer<u32> {
            old_answer(super::wit_host::HostLink::drain(self, link).await)
        }

        async fn configure(&mut self, link: Resource<Link>, c: old::SerialConfig) -> Answer<()> {
            let c = wit::SerialConfig {
                baud: c.baud,
                data_bits: c.data_bits,
                parity: match c.parity {
                    old::Parity::None => wit::Parity::None,
                    old::Parity::Odd => wit::Parity::Odd,
                    old::Parity::Even => wit::Parity::Even,
                },
                stop_bits: match c.stop_bits {
                    old::StopBits::One => wit::StopBits::One,
                    old::StopBits::Two => wit::StopBits::Two,
                },
            };
            old_answer(super::wit_host::HostLink::configure(self, link, c).await)
        }

        async fn set_lines(&mut self, link: Resource<Link>, dtr: bool, rts: bool) -> Answer<()> {
            old_answer(super::wit_host::HostLink::set_lines(self, link, dtr, rts).await)
        }

        async fn mtu(&mut self, link: Resource<Link>) -> wasmtime::Result<u32> {
            super::wit_host::HostLink::mtu(self, link).await
        }

        async fn kind(&mut self, link: Resource<Link>) -> wasmtime::Result<old::LinkKind> {
            Ok(match super::wit_host::HostLink::kind(self, link).await? {
                wit::LinkKind::Serial => old::LinkKind::Serial,
                wit::LinkKind::Tcp => old::LinkKind::Tcp,
                wit::LinkKind::Ble => old::LinkKind::Ble,
                // The host offers no other kinds of link today; a 0.1
                // plugin would see a byte stream.
                wit::LinkKind::Other(_) => old::LinkKind::Tcp,
            })
        }

        async fn drop(&mut self, _link: Resource<Link>) -> wasmtime::Result<()> {
            Ok(())
        }
    }

    impl old_host::HostImage for PluginState {
        async fn size(&mut self, image: Resource<ImageHandle>) -> wasmtime::Result<u64> {
            super::wit_host::HostImage::size(self, image).await
        }

        async fn read(
            &mut self,
            image: Resource<ImageHandle>,
            offset: u64,
            len: u32,
        ) -> wasmtime::Result<Vec<u8>> {
            super::wit_host::HostImage::read(self, image, offset, len).await
        }

        async fn drop(&mut self, _image: Resource<ImageHandle>) -> wasmtime::Result<()> {
            Ok(())
        }
    }
}
