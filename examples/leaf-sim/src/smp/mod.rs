//! The simulated MCUmgr SMP device with MCUboot behind it, over the serial (console)
//! transport or as raw SMP packets (the Bluetooth LE form): its settings ([`SmpSimConfig`],
//! [`SmpFaults`], [`SmpFraming`]), what tests observe ([`SmpHandle`], [`SmpEvent`], [`Boot`])
//! and the session loop ([`serve`]) over any `AsyncRead + AsyncWrite` link.
//!
//! It is the DEVICE side only, like a Zephyr application with MCUmgr's OS and image groups on
//! a UART (or behind the SMP GATT service) and MCUboot (swap mode) below it. It opens no links
//! itself (see [`crate::transport`]) and knows nothing of the gateway, nor of Bluetooth: a
//! BLE peripheral in front of it (`examples/ble-sim`) relays the characteristic's writes and
//! notifications as raw packets on a byte stream.
//!
//! - `frame.rs`: the SMP header, the console framing and raw reassembly (no I/O).
//! - `mcuboot.rs`: the MCUboot image format: parse and check, build (no I/O).
//! - `device.rs`: the command handlers and the slot model (no I/O).
//!
//! # Behaviour
//! - OS group: echo (0, write) `{d}` → `{r}`; reset (5, write) → `{}` then reset; MCUmgr
//!   parameters (6, read) → `{buf_size, buf_count}`.
//! - Image group: state read (0) → `{images: [{slot, version, hash, bootable, pending,
//!   confirmed, active, permanent}], splitStatus: 0}`; state write (0) `{hash, confirm}`;
//!   upload (1); erase (5) `{slot}` (slot 1 only).
//! - Any other (group, command, op) → `{rc: 8}` (`MGMT_ERR_ENOTSUP`). Errors are `{rc}` for
//!   SMP v1 and v2 alike. Answers echo the sequence number and version, op + 1.
//! - A packet with a bad CRC, a bad length, bad base64, a frame over 127 bytes, or an SMP
//!   packet (header + body) larger than `buf_size` is dropped without an answer, as a real
//!   device drops it.
//! - Raw framing ([`SmpFraming::Raw`]): packets are reassembled by the header's length, however
//!   the stream splits them; an oversized one is dropped and its body skipped. A reset (the
//!   command, or the `reset` fault) ends the session once the answer is written: the link
//!   drops as a rebooting BLE peripheral's does. The session returns [`SessionEnd::Reset`] once
//!   the boot time is over, so a TCP transport accepts the next session only when the device
//!   listens again.
//! - Upload, resume and MCUboot rules: see [`SmpHandle`].
//! - With [`SmpSimConfig::line_rate`] each answer is written when its last byte would have
//!   arrived on a UART at that rate, 8N1: after the wire time of the request bytes heard and of
//!   the answer (`pace.rs`).

mod device;
pub mod frame;
pub mod mcuboot;

use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pace::Pacer;
pub use device::rc;
use device::{Image, State};
use mcuboot::ImageVersion;

use crate::transport::SessionEnd;

/// Faults to inject. Counted faults (`drop_request`, `drop_answer`, `garble_answer`,
/// `reset_mid_upload`) name a 1-based number k counted over the device's life and fire once
/// in that life, so a retry succeeds. The refusals and `no_boot` describe the device and hold
/// for its whole life.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmpFaults {
    /// The k-th valid request is ignored (as if lost on the way in): no effect, no answer.
    pub drop_request: Option<u32>,
    /// The k-th answer is not sent (the request WAS carried out).
    pub drop_answer: Option<u32>,
    /// One base64 character of the k-th answer is changed (the request was carried out). With
    /// raw framing, which has no CRC (Bluetooth's link layer lets no corrupt packet through),
    /// the answer's sequence number is changed instead: an answer to no pending request.
    pub garble_answer: Option<u32>,
    /// After the k-th upload chunk is written, the device resets instead of answering it.
    pub reset_mid_upload: Option<u32>,
    /// Every upload chunk is answered `{rc: 3}` (`MGMT_ERR_EINVAL`).
    pub refuse_upload: bool,
    /// Marking slot 1 for test or permanent is answered `{rc: 6}` (`MGMT_ERR_EBADSTATE`).
    pub refuse_test: bool,
    /// The new image never boots: at the reset after a test (or permanent) mark MCUboot
    /// swaps it in, it fails, and the old image runs again at once (slot 1 keeps the new
    /// image, not pending).
    pub no_boot: bool,
}

/// A malformed fault specification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmpFaultParseError {
    /// An unknown fault name.
    #[error(
        "fault `{0}`: unknown (drop-request=K, drop=K, garble=K, reset=K, refuse-upload, refuse-test, no-boot)"
    )]
    Unknown(String),
    /// A number that does not parse, or 0, or a missing one.
    #[error("fault `{0}`: expected a number from 1")]
    Number(String),
}

impl SmpFaults {
    /// Adds one fault: `drop-request=K`, `drop=K` (an answer), `garble=K`, `reset=K` (after
    /// the k-th upload chunk), `refuse-upload`, `refuse-test`, `no-boot` (`_` works as `-`).
    pub fn add(&mut self, spec: &str) -> Result<(), SmpFaultParseError> {
        let (name, value) = match spec.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (spec.trim(), None),
        };
        let name = name.replace('_', "-");
        let k = || -> Result<Option<u32>, SmpFaultParseError> {
            match value.map(str::parse::<u32>) {
                Some(Ok(k)) if k > 0 => Ok(Some(k)),
                _ => Err(SmpFaultParseError::Number(spec.to_owned())),
            }
        };
        match name.as_str() {
            "drop-request" => self.drop_request = k()?,
            "drop" | "drop-answer" => self.drop_answer = k()?,
            "garble" | "garble-answer" => self.garble_answer = k()?,
            "reset" | "reset-mid-upload" => self.reset_mid_upload = k()?,
            "refuse-upload" if value.is_none() => self.refuse_upload = true,
            "refuse-test" if value.is_none() => self.refuse_test = true,
            "no-boot" if value.is_none() => self.no_boot = true,
            _ => return Err(SmpFaultParseError::Unknown(spec.to_owned())),
        }
        Ok(())
    }
}

impl FromStr for SmpFaults {
    type Err = SmpFaultParseError;

    /// A comma-separated list (see [`SmpFaults::add`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut faults = Self::default();
        for spec in s.split(',').filter(|p| !p.trim().is_empty()) {
            faults.add(spec)?;
        }
        Ok(faults)
    }
}

/// How SMP packets travel on the device's link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SmpFraming {
    /// The serial transport: base64 console frames with a length and a CRC-16
    /// (`frame.rs`). A reset keeps the link (the UART stays where it is).
    #[default]
    Console,
    /// Raw SMP packets, header + CBOR body back to back, as the Bluetooth LE transport carries
    /// them (reassembled by the header's length). A reset ends the session. Meant for TCP,
    /// where each connection is one session; on a pty the device stops at its first reset.
    Raw,
}

/// Settings of one simulated SMP device.
#[derive(Clone, Debug)]
pub struct SmpSimConfig {
    /// The version of the initial slot-0 image (`1.2.3`, `1.2.3+4`), built in memory as a
    /// valid MCUboot image so that state read reports a real hash.
    pub version: String,
    /// Payload bytes of that generated image.
    pub image_size: usize,
    /// Use this image for slot 0 instead of a generated one (it must parse as MCUboot).
    pub initial_image: Option<Vec<u8>>,
    /// The largest SMP packet (header + CBOR) the device takes, reported as `buf_size`.
    pub buf_size: usize,
    /// Reported as `buf_count`.
    pub buf_count: u32,
    /// The largest image slot 1 takes (the upload's `len`).
    pub slot_size: usize,
    /// How long the device hears nothing after a reset.
    pub boot_time: Duration,
    /// Keep a partial upload across resets (Zephyr does not: its session lives in RAM).
    pub keep_upload_across_reset: bool,
    /// Faults to inject.
    pub faults: SmpFaults,
    /// Simulated line rate in bits per second (8N1: 10 bits a byte): each answer is written
    /// no sooner than the request bytes heard and the answer itself take on such a wire.
    /// `None` (or 0): as fast as the link carries them. Console framing only.
    pub line_rate: Option<u32>,
    /// How packets travel on the link.
    pub framing: SmpFraming,
}

impl Default for SmpSimConfig {
    fn default() -> Self {
        Self {
            version: "1.0.0".to_owned(),
            image_size: 2048,
            initial_image: None,
            buf_size: 1024,
            buf_count: 4,
            slot_size: 2 * 1024 * 1024,
            boot_time: Duration::from_millis(200),
            keep_upload_across_reset: false,
            faults: SmpFaults::default(),
            line_rate: None,
            framing: SmpFraming::Console,
        }
    }
}

/// An invalid [`SmpSimConfig`].
#[derive(Debug, thiserror::Error)]
pub enum SmpConfigError {
    /// The version does not parse.
    #[error(transparent)]
    Version(#[from] mcuboot::VersionParseError),
    /// The initial image is not a valid MCUboot image.
    #[error("initial image: {0}")]
    Image(#[from] mcuboot::ImageError),
    /// `buf_size` cannot hold an SMP header.
    #[error("buf_size {0} is smaller than an SMP header")]
    BufSize(usize),
}

/// What the state read reports of a slot, with the image bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotState {
    /// 0 (running) or 1 (upload target).
    pub slot: u8,
    /// The image's bytes as stored.
    pub data: Vec<u8>,
    /// `ih_ver` as Zephyr prints it.
    pub version: String,
    /// `ih_ver`.
    pub image_version: ImageVersion,
    /// The SHA-256 TLV: the image's identity.
    pub hash: [u8; 32],
    /// Valid image.
    pub bootable: bool,
    /// Marked for the next boot.
    pub pending: bool,
    /// Slot 0: `image_ok` is set. Slot 1: the image a test swap reverts to.
    pub confirmed: bool,
    /// Running.
    pub active: bool,
    /// Marked permanent for the next boot.
    pub permanent: bool,
}

impl SlotState {
    fn new(
        slot: u8,
        image: &Image,
        confirmed: bool,
        pending: bool,
        permanent: bool,
        active: bool,
    ) -> Self {
        Self {
            slot,
            data: image.data.clone(),
            version: image.info.version.to_string(),
            image_version: image.info.version,
            hash: image.info.hash,
            bootable: true,
            pending,
            confirmed,
            active,
            permanent,
        }
    }
}

impl std::fmt::Debug for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotState")
            .field("slot", &self.slot)
            .field("len", &self.data.len())
            .field("version", &self.version)
            .field("hash", &Hex(&self.hash))
            .field("pending", &self.pending)
            .field("confirmed", &self.confirmed)
            .field("active", &self.active)
            .field("permanent", &self.permanent)
            .finish()
    }
}

struct Hex<'a>(&'a [u8]);

impl std::fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// What MCUboot did at a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swap {
    /// Nothing pending: the same image runs.
    None,
    /// The slot-1 image was swapped in for test: it runs unconfirmed.
    Test,
    /// The slot-1 image was swapped in permanently.
    Permanent,
    /// The unconfirmed test image was swapped back out: the old image runs.
    Revert,
    /// The pending image did not boot (fault): the old image runs, slot 1 keeps the new one.
    NoBoot,
}

/// Why the device reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCause {
    /// The OS reset command.
    Command,
    /// The `reset_mid_upload` fault.
    Fault,
}

/// The device came up after a reset (the boot time is over).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boot {
    /// The running version.
    pub version: String,
    /// The running image's hash.
    pub hash: [u8; 32],
    /// Whether the running image is confirmed.
    pub confirmed: bool,
    /// What MCUboot did.
    pub swap: Swap,
}

/// Something the device did, in order. Queued without limit; [`SmpHandle::next_event`]
/// takes them one by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmpEvent {
    /// A valid request arrived (before it is handled).
    Request {
        /// SMP op.
        op: u8,
        /// Group.
        group: u16,
        /// Command.
        id: u8,
        /// Sequence number.
        seq: u8,
    },
    /// A packet was dropped without an answer (framing, CRC, length, size).
    Dropped {
        /// Why.
        reason: String,
    },
    /// A new upload session began (slot 1 erased).
    UploadStarted {
        /// The announced length.
        len: usize,
        /// The announced SHA-256 of the upload.
        sha: Option<Vec<u8>>,
    },
    /// A first chunk with the session's `sha` and `len`: the session goes on at `off`.
    UploadResumed {
        /// Bytes already received.
        off: usize,
    },
    /// A chunk at the wrong offset, answered with the expected one.
    OffsetMismatch {
        /// The chunk's offset.
        got: usize,
        /// The answered offset.
        expected: usize,
    },
    /// The upload is complete and valid: slot 1 holds it.
    UploadComplete {
        /// Its version.
        version: String,
        /// Its hash.
        hash: [u8; 32],
    },
    /// The upload was refused (bad magic, bad hash, not an upgrade); the session is gone.
    UploadRejected {
        /// Why.
        reason: String,
    },
    /// Slot 1 marked for test.
    TestMarked {
        /// Its hash.
        hash: [u8; 32],
    },
    /// Slot 1 marked permanent.
    PermanentMarked {
        /// Its hash.
        hash: [u8; 32],
    },
    /// The running test image was confirmed.
    Confirmed {
        /// Its hash.
        hash: [u8; 32],
    },
    /// Slot 1 erased.
    Erased,
    /// A fault fired.
    Fault(String),
    /// The device reset (MCUboot has acted; the device is silent for the boot time).
    Reset {
        /// Why.
        cause: ResetCause,
    },
    /// The device listens again.
    Booted(Boot),
}

/// What tests and the binary observe of an SMP device. Cheap to clone; all clones share one
/// device.
///
/// # Upload semantics (what the device implements)
/// - A chunk with `off` 0 needs `len` (else `rc` 3). If an upload session exists whose `sha`
///   equals the chunk's `sha` (present in both) and whose `len` is the same, the session
///   goes on: the chunk's data is NOT written and the answer is `{off: bytes received}`.
///   Otherwise a new session starts (slot 1 is erased) and the chunk is written. A new
///   session is refused with `rc` 2 (Zephyr's "no free slot") while slot 1 is pending or
///   holds the image a test swap would revert to; with `rc` 3 when `len` exceeds
///   `slot_size` or the first 4 bytes are not the MCUboot magic; with `rc` 6 when
///   `upgrade` is true and the version is not newer than the running one.
/// - A chunk with `off` ≠ 0: with no session (never started, finished, or lost at a
///   reset) the answer is `{off: 0}`; at an offset other than the bytes received the answer
///   is `{off: bytes received}` (rc 0, nothing written); otherwise the data is written and
///   the answer is `{off: new total}`.
/// - When the total reaches `len`: the upload's `sha` (when given) must be the SHA-256 of the
///   data (else `rc` 9), and the data must be a valid MCUboot image (magic, bounds, TLVs:
///   `rc` 3; SHA-256 TLV: `rc` 9); then slot 1 holds it and the answer is `{off: len}` plus
///   `match: true` when a `sha` was given. A refused image ends the session.
/// - A reset drops the session (unless `keep_upload_across_reset`).
///
/// # MCUboot
/// Slot 0 runs. State write `{confirm: false, hash: slot-1 hash}` marks slot 1 for test;
/// `{confirm: true, hash: slot-1 hash}` marks it permanent; `{confirm: true}` with no hash or
/// the running hash confirms the running image. At a reset: a running unconfirmed image is
/// swapped back (revert); else a pending slot 1 is swapped in (test: unconfirmed;
/// permanent: confirmed). The old image then sits in slot 1.
#[derive(Clone, Debug)]
pub struct SmpHandle {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: SmpSimConfig,
    state: Mutex<State>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<SmpEvent>>,
    boots: tokio::sync::Mutex<mpsc::UnboundedReceiver<Boot>>,
}

impl SmpHandle {
    /// A new device running its initial image (confirmed), slot 1 empty.
    pub fn new(config: SmpSimConfig) -> Result<Self, SmpConfigError> {
        if config.buf_size < frame::Header::SIZE {
            return Err(SmpConfigError::BufSize(config.buf_size));
        }
        let data = match &config.initial_image {
            Some(image) => image.clone(),
            None => {
                let version: ImageVersion = config.version.parse()?;
                let payload: Vec<u8> = (0..config.image_size)
                    .map(|i| (i % 251) as u8 ^ version.major)
                    .collect();
                mcuboot::build(version, &payload)
            }
        };
        let info = mcuboot::parse(&data)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (boots_tx, boots_rx) = mpsc::unbounded_channel();
        Ok(Self {
            inner: Arc::new(Shared {
                config,
                state: Mutex::new(State::new(Image { data, info }, events_tx, boots_tx)),
                events: tokio::sync::Mutex::new(events_rx),
                boots: tokio::sync::Mutex::new(boots_rx),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's settings.
    pub fn config(&self) -> &SmpSimConfig {
        &self.inner.config
    }

    /// The running image.
    pub fn slot0(&self) -> SlotState {
        self.state().slot0_state()
    }

    /// The image in slot 1, when it holds a complete valid one.
    pub fn slot1(&self) -> Option<SlotState> {
        self.state().slot1_state()
    }

    /// The running version.
    pub fn version(&self) -> String {
        self.state().slot0.info.version.to_string()
    }

    /// Upload bytes written over the device's life (a resumed upload adds only what it
    /// sends again; chunks answered with another offset add nothing).
    pub fn upload_bytes(&self) -> u64 {
        self.state().counters.upload_bytes
    }

    /// Upload chunks written over the device's life.
    pub fn upload_chunks(&self) -> u64 {
        self.state().counters.upload_chunks
    }

    /// The session in progress: `(bytes received, announced length)`.
    pub fn upload_progress(&self) -> Option<(usize, usize)> {
        self.state().upload_progress()
    }

    /// Resets so far (commands and faults).
    pub fn resets(&self) -> u32 {
        self.state().counters.resets
    }

    /// Valid requests received.
    pub fn requests(&self) -> u64 {
        self.state().counters.requests
    }

    /// Answers the device meant to send (dropped and garbled ones included).
    pub fn answers(&self) -> u64 {
        self.state().counters.answers
    }

    /// Packets dropped for framing, CRC, length or size.
    pub fn dropped_packets(&self) -> u64 {
        self.state().counters.dropped_packets
    }

    /// Bytes over the device's life: `(read from the link, written to it)`.
    pub fn link_bytes(&self) -> (u64, u64) {
        let c = self.state().counters;
        (c.link_in, c.link_out)
    }

    /// Wire bytes of the image upload over the device's life: `(request frames, answer
    /// frames)`. With [`SmpHandle::upload_bytes`] this gives what the serial framing costs:
    /// the best a stop-and-wait upload can do on a wire is `upload_bytes / (requests +
    /// answers)` of its byte rate.
    pub fn upload_wire_bytes(&self) -> (u64, u64) {
        let c = self.state().counters;
        (c.upload_in, c.upload_out)
    }

    /// Whether the device is booting (hears nothing).
    pub fn is_booting(&self) -> bool {
        self.state().silent_until.is_some()
    }

    /// Waits for the next event (queued, none is lost).
    pub async fn next_event(&self) -> SmpEvent {
        match self.inner.events.lock().await.recv().await {
            Some(e) => e,
            // Unreachable: the state holds a sender.
            None => std::future::pending().await,
        }
    }

    /// Waits for the next completed boot (queued separately from the events).
    pub async fn next_boot(&self) -> Boot {
        match self.inner.boots.lock().await.recv().await {
            Some(b) => b,
            None => std::future::pending().await,
        }
    }

    /// Handles a packet; returns the answer to send, framed as the link wants it (after the
    /// answer faults), and whether to reset afterwards.
    fn packet(&self, packet: &[u8]) -> (Option<Vec<u8>>, Option<ResetCause>) {
        let cfg = &self.inner.config;
        let mut st = self.state();
        let outcome = st.packet(cfg, packet);
        let Some(answer) = outcome.answer else {
            return (None, outcome.reset);
        };
        st.counters.answers += 1;
        let n = st.counters.answers as u32;
        let framing = cfg.framing;
        let mut wire = match framing {
            SmpFraming::Console => frame::encode(&answer),
            SmpFraming::Raw => answer,
        };
        if cfg.faults.drop_answer == Some(n) && !std::mem::replace(&mut st.fired.drop_answer, true)
        {
            st.event(SmpEvent::Fault(format!("answer {n} dropped")));
            return (None, outcome.reset);
        }
        if cfg.faults.garble_answer == Some(n)
            && !std::mem::replace(&mut st.fired.garble_answer, true)
        {
            st.event(SmpEvent::Fault(format!("answer {n} garbled")));
            match framing {
                SmpFraming::Console => {
                    // Inside the first frame's base64 (the SMP header): a CRC mismatch.
                    let b = &mut wire[6];
                    *b = if *b == b'A' { b'B' } else { b'A' };
                }
                // The sequence number: an answer to no pending request.
                SmpFraming::Raw => wire[6] ^= 0x80,
            }
        }
        (Some(wire), outcome.reset)
    }

    /// Counts a packet's wire bytes: `request` read for it, `answer` written.
    fn count_wire(&self, packet: &[u8], request: u64, answer: u64) {
        let mut st = self.state();
        st.counters.link_out += answer;
        if device::is_upload(packet) {
            st.counters.upload_in += request;
            st.counters.upload_out += answer;
        }
    }

    fn dropped(&self, e: &frame::FrameError) {
        let mut st = self.state();
        st.counters.dropped_packets += 1;
        st.event(SmpEvent::Dropped {
            reason: e.to_string(),
        });
    }

    fn reset(&self, cause: ResetCause) {
        self.state()
            .reset(&self.inner.config, cause, Instant::now());
    }
}

/// Runs the device on `io` until the link closes or `cancel` fires, in the framing of its
/// configuration. The device's state lives in `device` and outlives the session. With console
/// framing a reset does not end the session; with raw framing it does (see the module docs).
pub async fn serve<S>(device: &SmpHandle, io: S, cancel: &CancellationToken) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match device.config().framing {
        SmpFraming::Console => serve_console(device, io, cancel).await,
        SmpFraming::Raw => serve_raw(device, io, cancel).await,
    }
}

async fn serve_console<S>(device: &SmpHandle, mut io: S, cancel: &CancellationToken) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut deframer = frame::Deframer::new(device.config().buf_size);
    let mut pacer = device
        .config()
        .line_rate
        .filter(|&bps| bps > 0)
        .map(|bps| Pacer::new(bps, Instant::now()));
    let mut buf = vec![0u8; 4096];
    // Bytes read since the last packet ended (its frames, for the wire counters).
    let mut heard = 0u64;
    loop {
        let silent_until = device.state().silent_until;
        let n = tokio::select! {
            biased;
            () = cancel.cancelled() => return SessionEnd::Shutdown,
            () = sleep_until(silent_until), if silent_until.is_some() => {
                deframer.reset();
                device.state().booted();
                continue;
            }
            r = io.read(&mut buf) => match r {
                Ok(0) => return SessionEnd::PeerClosed,
                Ok(n) => n,
                Err(e) => return SessionEnd::LinkError(e),
            },
        };
        device.state().counters.link_in += n as u64;
        // When the first of these bytes went onto the (simulated) wire.
        let on_wire = pacer.as_mut().map(|p| p.arrived(n, Instant::now()));
        if silent_until.is_some_and(|t| Instant::now() < t) {
            continue; // booting: the bytes are lost
        }
        for (i, &byte) in buf[..n].iter().enumerate() {
            heard += 1;
            let packet = match deframer.push(byte) {
                None => continue,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "packet dropped");
                    device.dropped(&e);
                    heard = 0;
                    continue;
                }
                Some(Ok(packet)) => packet,
            };
            let request_bytes = std::mem::take(&mut heard);
            let (answer, reset) = device.packet(&packet);
            let answer_bytes = answer.as_ref().map_or(0, Vec::len);
            device.count_wire(&packet, request_bytes, answer_bytes as u64);
            if let Some(wire) = answer {
                let due = match (pacer.as_mut(), on_wire) {
                    (Some(p), Some(start)) => Some(p.due(start, i + 1, wire.len())),
                    _ => None,
                };
                let write = async {
                    if let Some(due) = due {
                        tokio::time::sleep_until(due).await;
                    }
                    let at = Instant::now();
                    io.write_all(&wire).await?;
                    io.flush().await?;
                    Ok::<_, std::io::Error>(at)
                };
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return SessionEnd::Shutdown,
                    r = write => match r {
                        Ok(at) => {
                            if let (Some(p), Some(due)) = (pacer.as_mut(), due) {
                                p.written(due, at);
                            }
                        }
                        Err(e) => return SessionEnd::LinkError(e),
                    },
                }
            }
            if let Some(cause) = reset {
                tracing::info!(?cause, "device reset");
                device.reset(cause);
                deframer.reset();
                heard = 0;
                break; // the rest of what was read is lost
            }
        }
    }
}

/// The raw session: packets reassembled by their headers, answers written as they are, and the
/// session ends at a reset (after the boot time).
async fn serve_raw<S>(device: &SmpHandle, mut io: S, cancel: &CancellationToken) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut assembler = frame::RawAssembler::new(device.config().buf_size);
    let mut buf = vec![0u8; 4096];
    // Bytes read since the last packet ended (for the wire counters).
    let mut heard = 0u64;
    loop {
        let silent_until = device.state().silent_until;
        let n = tokio::select! {
            biased;
            () = cancel.cancelled() => return SessionEnd::Shutdown,
            () = sleep_until(silent_until), if silent_until.is_some() => {
                assembler.reset();
                device.state().booted();
                continue;
            }
            r = io.read(&mut buf) => match r {
                Ok(0) => return SessionEnd::PeerClosed,
                Ok(n) => n,
                Err(e) => return SessionEnd::LinkError(e),
            },
        };
        device.state().counters.link_in += n as u64;
        if silent_until.is_some_and(|t| Instant::now() < t) {
            continue; // booting: the bytes are lost
        }
        for &byte in &buf[..n] {
            heard += 1;
            let packet = match assembler.push(byte) {
                None => continue,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "packet dropped");
                    device.dropped(&e);
                    heard = 0;
                    continue;
                }
                Some(Ok(packet)) => packet,
            };
            let request_bytes = std::mem::take(&mut heard);
            let (answer, reset) = device.packet(&packet);
            let answer_bytes = answer.as_ref().map_or(0, Vec::len);
            device.count_wire(&packet, request_bytes, answer_bytes as u64);
            if let Some(wire) = answer {
                let write = async {
                    io.write_all(&wire).await?;
                    io.flush().await
                };
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return SessionEnd::Shutdown,
                    r = write => if let Err(e) = r {
                        return SessionEnd::LinkError(e);
                    },
                }
            }
            if let Some(cause) = reset {
                tracing::info!(?cause, "device reset: the raw session ends");
                device.reset(cause);
                // The peer sees the link go now; the device boots before the session returns.
                // A peer that already left makes the shutdown fail: nothing to tell it then.
                let _ = io.shutdown().await;
                let until = device.state().silent_until;
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return SessionEnd::Shutdown,
                    () = sleep_until(until) => device.state().booted(),
                }
                return SessionEnd::Reset;
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        let f: SmpFaults = "drop=2, garble=3,reset=4,drop_request=1,refuse-upload,no_boot"
            .parse()
            .unwrap();
        assert_eq!(
            f,
            SmpFaults {
                drop_request: Some(1),
                drop_answer: Some(2),
                garble_answer: Some(3),
                reset_mid_upload: Some(4),
                refuse_upload: true,
                refuse_test: false,
                no_boot: true,
            }
        );
        assert!(matches!(
            "drop=0".parse::<SmpFaults>(),
            Err(SmpFaultParseError::Number(_))
        ));
        assert!(matches!(
            "drop".parse::<SmpFaults>(),
            Err(SmpFaultParseError::Number(_))
        ));
        assert!(matches!(
            "no-boot=1".parse::<SmpFaults>(),
            Err(SmpFaultParseError::Unknown(_))
        ));
    }

    /// An OS echo request `{d: text}` (SMP v1), framed for the console.
    fn echo_request(seq: u8, text: &str) -> Vec<u8> {
        let mut body = vec![0xa1, 0x61, b'd', 0x60 | text.len() as u8];
        body.extend_from_slice(text.as_bytes());
        let header = frame::Header {
            op: 2,
            version: 0,
            flags: 0,
            len: body.len() as u16,
            group: 0,
            seq,
            id: 0,
        };
        let mut packet = header.to_bytes().to_vec();
        packet.extend_from_slice(&body);
        frame::encode(&packet)
    }

    /// Runs `exchanges` echo exchanges against a device paced at `bps` on an in-memory link;
    /// returns the (virtual) time they took and the wire bytes both ways.
    async fn echo_exchanges(bps: Option<u32>, exchanges: u8) -> (Duration, usize) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let device = SmpHandle::new(SmpSimConfig {
            line_rate: bps,
            ..SmpSimConfig::default()
        })
        .unwrap();
        let (mut host, link) = tokio::io::duplex(1 << 16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (device, cancel) = (device.clone(), cancel.clone());
            async move { serve(&device, link, &cancel).await }
        });
        let t0 = Instant::now();
        let mut wire = 0;
        for seq in 0..exchanges {
            let request = echo_request(seq, "paced");
            host.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            while answer.last() != Some(&b'\n') {
                let mut b = [0u8; 256];
                let n = host.read(&mut b).await.unwrap();
                assert!(n > 0, "the device closed the link");
                answer.extend_from_slice(&b[..n]);
            }
            wire += request.len() + answer.len();
        }
        let elapsed = t0.elapsed();
        assert_eq!(device.answers(), u64::from(exchanges));
        assert_eq!(device.link_bytes().0 + device.link_bytes().1, wire as u64);
        cancel.cancel();
        assert!(matches!(task.await.unwrap(), SessionEnd::Shutdown));
        (elapsed, wire)
    }

    fn wire_time(bytes: usize, bps: u32) -> Duration {
        Duration::from_nanos(bytes as u64 * 10 * 1_000_000_000 / u64::from(bps))
    }

    /// Virtual time (tokio's paused clock): an answer comes no sooner than the request and
    /// the answer take on the wire, and the timers' millisecond granularity does not add up
    /// over many exchanges.
    #[tokio::test(start_paused = true)]
    async fn answers_take_the_wire_time_of_request_and_answer() {
        let (elapsed, wire) = echo_exchanges(Some(9600), 1).await;
        let expected = wire_time(wire, 9600);
        assert!(
            elapsed >= expected && elapsed <= expected + Duration::from_millis(1),
            "one exchange of {wire} bytes at 9600 baud took {elapsed:?}, the wire {expected:?}"
        );
        // About 0.6 ms of wire an exchange at 921600 baud: no whole millisecond per answer.
        let (elapsed, wire) = echo_exchanges(Some(921_600), 50).await;
        let expected = wire_time(wire, 921_600);
        assert!(
            elapsed >= expected && elapsed <= expected + Duration::from_millis(1),
            "50 exchanges of {wire} bytes at 921600 baud took {elapsed:?}, the wire {expected:?}"
        );
        // Unpaced: no time passes at all.
        let (elapsed, _) = echo_exchanges(None, 5).await;
        assert_eq!(elapsed, Duration::ZERO);
    }

    #[test]
    fn initial_image_is_valid_and_versioned() {
        let h = SmpHandle::new(SmpSimConfig {
            version: "2.3.4+5".into(),
            ..SmpSimConfig::default()
        })
        .unwrap();
        let s0 = h.slot0();
        assert_eq!(s0.version, "2.3.4.5");
        assert!(s0.confirmed && s0.active && !s0.pending);
        assert_eq!(mcuboot::parse(&s0.data).unwrap().hash, s0.hash);
        assert!(h.slot1().is_none());
        assert!(
            SmpHandle::new(SmpSimConfig {
                version: "x".into(),
                ..SmpSimConfig::default()
            })
            .is_err()
        );
    }
}
