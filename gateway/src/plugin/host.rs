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

use super::bindings::types as wit;
use super::bindings::v0_1_0::otagw::plugin::host as wit_host;
use crate::link::{Link, LinkError, LinkKind, MAX_READ, Parity, SerialConfig, StopBits};
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
    match e {
        LinkError::Unsupported { .. } => wit::LinkError::Unsupported(e.to_string()),
        LinkError::Closed { .. } => wit::LinkError::Closed(e.to_string()),
        other => wit::LinkError::Io(other.to_string()),
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

impl wit_host::HostLink for PluginState {
    async fn write(
        &mut self,
        link: Resource<Link>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        self.touch();
        let r = self.link(&link)?.write(&data).await;
        self.touch();
        Ok(r.map_err(to_wit_link_error))
    }

    async fn read(
        &mut self,
        link: Resource<Link>,
        max: u32,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, wit::LinkError>> {
        self.touch();
        let timeout = Duration::from_millis(timeout_ms.min(60_000).into());
        let r = self
            .link(&link)?
            .read((max as usize).min(MAX_READ), timeout)
            .await;
        self.touch();
        Ok(r.map_err(to_wit_link_error))
    }

    async fn drain(
        &mut self,
        link: Resource<Link>,
    ) -> wasmtime::Result<Result<u32, wit::LinkError>> {
        self.touch();
        let r = self.link(&link)?.drain().await;
        self.touch();
        Ok(r.map_err(to_wit_link_error))
    }

    async fn configure(
        &mut self,
        link: Resource<Link>,
        config: wit::SerialConfig,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        self.touch();
        let c = serial_from_wit(config);
        Ok(self.link(&link)?.configure(&c).map_err(to_wit_link_error))
    }

    async fn set_lines(
        &mut self,
        link: Resource<Link>,
        dtr: bool,
        rts: bool,
    ) -> wasmtime::Result<Result<(), wit::LinkError>> {
        self.touch();
        Ok(self
            .link(&link)?
            .set_lines(dtr, rts)
            .map_err(to_wit_link_error))
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
