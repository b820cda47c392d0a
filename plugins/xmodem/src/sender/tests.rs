//! Tests of the sender against a simulated receiver on a virtual clock (no
//! sleeps), plus a scripted port for `identify`.

use std::collections::{HashMap, VecDeque};

use otagw_plugin_sdk::testing::{MemImage, ScriptPort};

use super::*;
use crate::options::{Protocol, Settings};

// ---------------------------------------------------------------------------
// Simulated receiver.

/// How the simulated receiver behaves.
#[derive(Clone)]
struct Rx {
    /// 'C' (CRC) or NAK (checksum) as the start character.
    start: u8,
    /// Interval of start characters while waiting.
    start_every: u64,
    /// Bytes sent before the first start character (boot banner).
    banner: Vec<u8>,
    ymodem: bool,
    /// Accepts STX (1K) frames; otherwise NAKs them.
    accepts_1k: bool,
    nak_first_eot: bool,
    /// data block index (1-based, unwrapped) → NAK the first n receptions.
    nak: HashMap<u64, u32>,
    /// data block index → ignore the first n receptions entirely (lost on the wire).
    lose: HashMap<u64, u32>,
    /// Send CAN CAN on receiving this data block.
    cancel_at: Option<u64>,
    /// Stop answering anything from this data block on.
    dead_from: Option<u64>,
    /// Send a single 'C' right after receiving data block 1 (crossing the frame), then ACK.
    crossing_c: bool,
    /// Reply delay.
    latency: u64,
    /// At most this many bytes per read.
    chunk: usize,
    /// Fails writes with `closed` after this many writes.
    close_after_writes: Option<usize>,
    /// What drain returns (`None` = unsupported).
    drain_supported: bool,
    /// Never send anything.
    mute: bool,
    /// The enter command, and how many of its first writes are ignored (a
    /// receiver still inside an interrupted session): no start characters
    /// until one more comes.
    stale_enters: Option<(Vec<u8>, u32)>,
}

impl Default for Rx {
    fn default() -> Self {
        Rx {
            start: CRC_C,
            start_every: 1000,
            banner: Vec::new(),
            ymodem: false,
            accepts_1k: true,
            nak_first_eot: false,
            nak: HashMap::new(),
            lose: HashMap::new(),
            cancel_at: None,
            dead_from: None,
            crossing_c: false,
            latency: 5,
            chunk: 4096,
            close_after_writes: None,
            drain_supported: true,
            mute: false,
            stale_enters: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Sending start characters until a first frame comes.
    Waiting,
    Data,
    /// YMODEM: after EOT, waiting for the null block 0.
    Closing,
    Finished,
    Cancelled,
}

/// The receiver plus the virtual clock: the port the sender talks to.
struct Sim {
    rx: Rx,
    now: u64,
    st: St,
    next_start: u64,
    outbox: VecDeque<(u64, u8)>,
    inbuf: Vec<u8>,
    crc: bool,
    expect: u8,
    /// Unwrapped index of the next data block.
    index: u64,
    /// Reception count per data block index.
    seen: HashMap<u64, u32>,
    data: Vec<u8>,
    block_sizes: Vec<usize>,
    header: Option<Vec<u8>>,
    header_len: usize,
    null_block: bool,
    eots: u32,
    writes: usize,
    /// CAN bytes received from the sender outside frames.
    cans_from_sender: u32,
    /// Writes of the enter command seen.
    enters: u32,
    all_written: Vec<u8>,
    drains: u32,
    sleeps: Vec<u32>,
    logs: Vec<(Level, String)>,
    progress: Vec<(u64, u64)>,
}

impl Sim {
    fn new(rx: Rx) -> Self {
        let mut sim = Sim {
            crc: rx.start == CRC_C,
            rx,
            now: 0,
            st: St::Waiting,
            next_start: 0,
            outbox: VecDeque::new(),
            inbuf: Vec::new(),
            expect: 1,
            index: 1,
            seen: HashMap::new(),
            data: Vec::new(),
            block_sizes: Vec::new(),
            header: None,
            header_len: 0,
            null_block: false,
            eots: 0,
            writes: 0,
            cans_from_sender: 0,
            enters: 0,
            all_written: Vec::new(),
            drains: 0,
            sleeps: Vec::new(),
            logs: Vec::new(),
            progress: Vec::new(),
        };
        if !sim.rx.banner.is_empty() {
            // The banner arrives after the sender's drain, at t = 1 ms.
            sim.next_start = 1 + sim.rx.banner.len() as u64;
        }
        sim.expect = if sim.rx.ymodem { 0 } else { 1 };
        sim
    }

    fn reply(&mut self, bytes: &[u8]) {
        if self.rx.mute {
            return;
        }
        let at = self.now + self.rx.latency;
        for &b in bytes {
            self.outbox.push_back((at, b));
        }
    }

    fn dead(&self) -> bool {
        matches!(self.rx.dead_from, Some(d) if self.index >= d && self.st == St::Data)
    }

    fn on_bytes(&mut self) {
        loop {
            let Some(&first) = self.inbuf.first() else {
                return;
            };
            match first {
                SOH | STX => {
                    let len = if first == STX { 1024 } else { 128 };
                    let total = 3 + len + if self.crc { 2 } else { 1 };
                    if self.inbuf.len() < total {
                        return;
                    }
                    let f: Vec<u8> = self.inbuf.drain(..total).collect();
                    self.on_frame(&f, len);
                }
                EOT => {
                    self.inbuf.remove(0);
                    if self.dead() {
                        continue;
                    }
                    self.eots += 1;
                    if self.rx.nak_first_eot && self.eots == 1 {
                        self.reply(&[NAK]);
                    } else {
                        self.reply(&[ACK]);
                        if self.rx.ymodem {
                            self.st = St::Closing;
                            self.expect = 0;
                            self.next_start = self.now + self.rx.latency + 1;
                        } else {
                            self.st = St::Finished;
                        }
                    }
                }
                CAN => {
                    self.inbuf.remove(0);
                    self.cans_from_sender += 1;
                }
                _ => {
                    self.inbuf.remove(0);
                }
            }
        }
    }

    fn on_frame(&mut self, f: &[u8], len: usize) {
        let seq = f[1];
        let payload = &f[3..3 + len];
        let ok_check = if self.crc {
            let c = u16::from_be_bytes([f[3 + len], f[4 + len]]);
            c == crc16(payload)
        } else {
            f[3 + len] == checksum8(payload)
        };
        if f[2] != !seq || !ok_check {
            self.reply(&[NAK]);
            return;
        }
        let is_header = self.rx.ymodem && seq == 0 && matches!(self.st, St::Waiting);
        let is_null = self.rx.ymodem && seq == 0 && self.st == St::Closing;
        if is_header {
            let n = self.seen.entry(0).or_insert(0);
            *n += 1;
            if self.rx.lose.get(&0).is_some_and(|&lost| *n <= lost) {
                return;
            }
            if len == 1024 && !self.rx.accepts_1k {
                self.reply(&[NAK]);
                return;
            }
            self.header = Some(payload.to_vec());
            self.header_len = len;
            self.reply(&[ACK, CRC_C]);
            self.expect = 1;
            self.st = St::Data;
            return;
        }
        if is_null {
            self.null_block = payload.iter().all(|&b| b == 0);
            self.reply(&[ACK]);
            self.st = St::Finished;
            return;
        }
        if self.st == St::Closing || self.st == St::Finished {
            self.reply(&[CAN, CAN]);
            self.st = St::Cancelled;
            return;
        }
        // A data frame.
        if seq == self.expect.wrapping_sub(1) && self.index > 1 {
            self.reply(&[ACK]); // duplicate
            return;
        }
        if seq != self.expect {
            self.reply(&[CAN, CAN]);
            self.st = St::Cancelled;
            return;
        }
        let n = self.seen.entry(self.index).or_insert(0);
        *n += 1;
        let n = *n;
        if let Some(&lost) = self.rx.lose.get(&self.index)
            && n <= lost
        {
            return;
        }
        if self.rx.dead_from.is_some_and(|d| self.index >= d) {
            self.st = St::Data;
            return;
        }
        if self.rx.cancel_at == Some(self.index) {
            self.reply(&[CAN, CAN]);
            self.st = St::Cancelled;
            return;
        }
        if len == 1024 && !self.rx.accepts_1k {
            self.reply(&[NAK]);
            return;
        }
        if let Some(&naks) = self.rx.nak.get(&self.index)
            && n <= naks
        {
            self.reply(&[NAK]);
            return;
        }
        self.st = St::Data;
        self.data.extend_from_slice(payload);
        self.block_sizes.push(len);
        if self.rx.crossing_c && self.index == 1 {
            self.outbox.push_back((self.now, CRC_C));
        }
        self.reply(&[ACK]);
        self.expect = self.expect.wrapping_add(1);
        self.index += 1;
    }

    fn waiting(&self) -> bool {
        let entered = self
            .rx
            .stale_enters
            .as_ref()
            .is_none_or(|(_, ignored)| self.enters > *ignored);
        matches!(self.st, St::Waiting | St::Closing) && !self.rx.mute && entered
    }
}

impl Port for Sim {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.writes += 1;
        if let Some(n) = self.rx.close_after_writes
            && self.writes > n
        {
            return Err(LinkFault::Closed("peer hung up".into()));
        }
        self.all_written.extend_from_slice(data);
        if self
            .rx
            .stale_enters
            .as_ref()
            .is_some_and(|(cmd, _)| cmd == data)
        {
            self.enters += 1;
            if self.enters > self.rx.stale_enters.as_ref().map_or(0, |(_, n)| *n) {
                self.next_start = self.now + self.rx.latency;
            }
            return Ok(());
        }
        if self.st == St::Cancelled {
            return Ok(());
        }
        self.inbuf.extend_from_slice(data);
        self.on_bytes();
        Ok(())
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        assert!(timeout_ms > 0, "read with a zero timeout");
        let horizon = self.now + u64::from(timeout_ms);
        if !self.rx.banner.is_empty() && self.now < 1 + self.rx.banner.len() as u64 {
            // The banner, one read's worth at t = 1.
            let banner = std::mem::take(&mut self.rx.banner);
            self.now = self.now.max(1);
            return Ok(banner);
        }
        let max = (max as usize).min(self.rx.chunk);
        if let Some(&(t, _)) = self.outbox.front() {
            if t <= horizon {
                self.now = self.now.max(t);
                let mut out = Vec::new();
                while let Some(&(t, b)) = self.outbox.front() {
                    if t > self.now || out.len() >= max {
                        break;
                    }
                    out.push(b);
                    self.outbox.pop_front();
                }
                return Ok(out);
            }
        } else if self.waiting() && self.next_start <= horizon {
            self.now = self.now.max(self.next_start);
            self.next_start = self.now + self.rx.start_every;
            return Ok(vec![self.rx.start]);
        }
        self.now = horizon;
        Ok(Vec::new())
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        if !self.rx.drain_supported {
            return Err(LinkFault::Unsupported("no drain here".into()));
        }
        self.drains += 1;
        let n = self.outbox.len() as u32;
        self.outbox.clear();
        Ok(n)
    }

    fn now_ms(&mut self) -> u64 {
        self.now
    }

    fn sleep(&mut self, ms: u32) {
        self.sleeps.push(ms);
        self.now += u64::from(ms);
        if self.next_start < self.now {
            self.next_start = self.now;
        }
    }

    fn progress(&mut self, done: u64, total: u64, _: Phase) {
        self.progress.push((done, total));
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}

fn run(rx: Rx, size: usize, settings: Settings) -> (Sim, MemImage, Result<FlashReport, Error>) {
    let mut sim = Sim::new(rx);
    let mut img = MemImage::pattern(size);
    let r = flash(&mut sim, &mut img, &settings);
    (sim, img, r)
}

fn xmodem() -> Settings {
    Settings::default()
}

fn ymodem() -> Settings {
    Settings {
        protocol: Protocol::Ymodem,
        ..Settings::default()
    }
}

/// The received data is the image followed by pad bytes only.
fn assert_delivered(sim: &Sim, img: &MemImage, pad: u8) {
    assert!(
        sim.data.len() >= img.bytes.len(),
        "short: {}",
        sim.data.len()
    );
    assert_eq!(&sim.data[..img.bytes.len()], &img.bytes[..]);
    assert!(
        sim.data[img.bytes.len()..].iter().all(|&b| b == pad),
        "padding is not all {pad:#04x}"
    );
    assert_eq!(sim.st, St::Finished);
}

// ---------------------------------------------------------------------------
// Framing helpers.

#[test]
fn crc16_check_value() {
    // The catalogue check value of CRC-16/XMODEM.
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(checksum8(&[0xFF, 0x02]), 0x01);
}

#[test]
fn frame_layout() {
    let f = frame(3, b"abc", 128, 0x1A, true);
    assert_eq!(f.len(), 133);
    assert_eq!(&f[..6], &[SOH, 3, 0xFC, b'a', b'b', b'c']);
    assert!(f[6..131].iter().all(|&b| b == 0x1A));
    assert_eq!(u16::from_be_bytes([f[131], f[132]]), crc16(&f[3..131]));

    let f = frame(255, &[1; 1024], 1024, 0, false);
    assert_eq!(f.len(), 1028);
    assert_eq!(&f[..3], &[STX, 255, 0]);
    assert_eq!(f[1027], checksum8(&[1; 1024]));
}

#[test]
fn block_len_and_padding_plan() {
    assert_eq!(block_len(1024, 5000, true), 1024);
    assert_eq!(block_len(1024, 896, true), 128);
    assert_eq!(block_len(1024, 897, true), 1024);
    assert_eq!(block_len(1024, 100, false), 1024);
    assert_eq!(block_len(128, 5000, true), 128);
    assert_eq!(pad_bytes(2048, 1024, true), 0);
    assert_eq!(pad_bytes(1024 + 100, 1024, true), 28);
    assert_eq!(pad_bytes(1024 + 100, 1024, false), 924);
    assert_eq!(pad_bytes(1000, 1024, true), 24);
    assert_eq!(pad_bytes(1, 128, true), 127);
}

#[test]
fn ymodem_header_is_name_nul_size_nul() {
    assert_eq!(ymodem_header("a.bin", 1234), b"a.bin\x001234\x00".to_vec());
}

// ---------------------------------------------------------------------------
// Transfers.

#[test]
fn xmodem_1k_crc_happy_path_streams_the_image() {
    let (sim, img, r) = run(Rx::default(), 5000, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    // 904-byte tail: 7 small blocks would be 931 bytes on the wire, so one 1K block.
    assert_eq!(sim.block_sizes, vec![1024; 5]);
    assert_eq!(report.bytes_sent, 5000);
    assert_eq!(report.retries, 0);
    assert!(
        report
            .summary
            .starts_with("XMODEM CRC-16: 5000 bytes in 5 blocks")
    );
    // Never more than a block from the image at once.
    assert!(img.largest_read <= 1024);
    // Without an enter command stale input is read (to keep a waiting start
    // character), not drained.
    assert_eq!(sim.drains, 0);
    // Progress after every block, ending at the total.
    assert_eq!(sim.progress.first(), Some(&(0, 5000)));
    assert_eq!(sim.progress.last(), Some(&(5000, 5000)));
    assert_eq!(sim.progress.len(), 6);
    assert!(sim.progress.windows(2).all(|w| w[0].0 < w[1].0));
    // Start and end are logged at info.
    let infos: Vec<_> = sim.logs.iter().filter(|(l, _)| *l == Level::Info).collect();
    assert_eq!(infos.len(), 2, "{infos:?}");
    assert!(
        sim.logs[0]
            .1
            .contains("sending 5000 bytes with XMODEM (CRC-16, 1024-byte blocks)")
    );
    assert_eq!(sim.cans_from_sender, 0);
}

#[test]
fn short_tail_goes_in_128_byte_blocks() {
    let (sim, img, r) = run(Rx::default(), 1024 + 300, xmodem());
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.block_sizes, vec![1024, 128, 128, 128]);
    assert_eq!(sim.data.len(), 1024 + 384);
}

#[test]
fn small_tail_off_pads_a_1k_block() {
    let settings = Settings {
        small_tail: false,
        pad_byte: 0xFF,
        ..xmodem()
    };
    let (sim, img, r) = run(Rx::default(), 1024 + 300, settings);
    r.unwrap();
    assert_delivered(&sim, &img, 0xFF);
    assert_eq!(sim.block_sizes, vec![1024, 1024]);
}

#[test]
fn block_size_128_option() {
    let settings = Settings {
        block_size: 128,
        ..xmodem()
    };
    let (sim, img, r) = run(Rx::default(), 1000, settings);
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.block_sizes, vec![128; 8]);
}

#[test]
fn nak_start_means_checksum_and_128_byte_blocks() {
    let rx = Rx {
        start: NAK,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 3000, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert!(sim.block_sizes.iter().all(|&n| n == 128));
    assert_eq!(sim.block_sizes.len(), 24);
    assert!(report.summary.contains("checksum"));
}

#[test]
fn receiver_without_1k_gets_128_byte_blocks_after_two_naks() {
    let rx = Rx {
        accepts_1k: false,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 4096, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.block_sizes, vec![128; 32]);
    assert_eq!(report.retries, 2);
    assert!(sim.logs.iter().any(|(l, m)| *l == Level::Warn
        && m.contains("block 1 (offset 0): 1K block refused 2 times, falling back")));
}

#[test]
fn nak_resends_the_same_block() {
    let rx = Rx {
        nak: HashMap::from([(3, 2)]),
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 8 * 1024, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(report.retries, 2);
    assert_eq!(
        sim.block_sizes,
        vec![1024; 8],
        "two NAKs must not cause a fallback"
    );
}

#[test]
fn later_block_refused_three_times_falls_back() {
    let rx = Rx {
        nak: HashMap::from([(3, 3)]),
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 4 * 1024, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(report.retries, 3);
    let mut expected = vec![1024, 1024];
    expected.extend([128; 16]);
    assert_eq!(sim.block_sizes, expected);
}

#[test]
fn retries_exhausted_is_a_transfer_error_and_sends_can_can() {
    let rx = Rx {
        nak: HashMap::from([(3, 1000)]),
        ..Rx::default()
    };
    let settings = Settings {
        block_size: 128,
        retries: 4,
        ..xmodem()
    };
    let (sim, _, r) = run(rx, 1024, settings);
    assert_eq!(
        r.unwrap_err(),
        Error::Transfer(
            "transfer: block 3 (offset 256): not acknowledged after 5 attempts (5 NAK, 0 \
             garbled, 0 without reply); sent CAN CAN"
                .into()
        )
    );
    assert_eq!(sim.seen[&3], 5);
    assert!(sim.all_written.ends_with(&[CAN, CAN]));
    assert_eq!(sim.cans_from_sender, 2);
}

#[test]
fn silent_receiver_mid_transfer_is_a_timeout() {
    let rx = Rx {
        dead_from: Some(3),
        ..Rx::default()
    };
    let settings = Settings {
        retries: 2,
        ..xmodem()
    };
    let (sim, _, r) = run(rx, 8 * 1024, settings);
    let err = r.unwrap_err();
    // 1K block 3 fails 3 times (fallback), then the 128-byte block 3 times.
    assert_eq!(
        err,
        Error::Timeout(
            "transfer: block 3 (offset 2048): the receiver stopped answering: no reply to 3 \
             attempts (3000 ms each); sent CAN CAN"
                .into()
        )
    );
    assert!(sim.all_written.ends_with(&[CAN, CAN]));
    // 3 + 3 attempts of 3 s each after block 2.
    assert!(sim.now >= 18_000 && sim.now < 19_000, "now = {}", sim.now);
}

#[test]
fn handshake_timeout_when_the_receiver_never_starts() {
    let rx = Rx {
        mute: true,
        ..Rx::default()
    };
    let (sim, _, r) = run(rx, 100, xmodem());
    assert_eq!(
        r.unwrap_err(),
        Error::Timeout("handshake: no 'C' or NAK from the receiver within 30000 ms".into())
    );
    // The handshake's timeout, after a short look for a start character already queued.
    assert_eq!(sim.now, 30_000 + u64::from(QUIET_MS));
    assert!(
        sim.all_written.is_empty(),
        "nothing to cancel before a start"
    );
}

#[test]
fn handshake_timeout_counts_skipped_bytes_and_long_timeouts_loop() {
    let mut port = ScriptPort::arrivals(vec![(10, b"hello".to_vec())]);
    let settings = Settings {
        handshake_timeout_ms: 150_000,
        ..xmodem()
    };
    let err = flash(&mut port, &mut MemImage::pattern(10), &settings).unwrap_err();
    assert_eq!(
        err,
        Error::Timeout(
            "handshake: no 'C' or NAK from the receiver within 150000 ms (5 other bytes skipped)"
                .into()
        )
    );
    assert_eq!(port.now, 150_000 + u64::from(QUIET_MS));
}

#[test]
fn receiver_cancel_mid_transfer() {
    let rx = Rx {
        cancel_at: Some(2),
        ..Rx::default()
    };
    let (sim, _, r) = run(rx, 4096, xmodem());
    assert_eq!(
        r.unwrap_err(),
        Error::Transfer(
            "transfer: block 2 (offset 1024): the receiver cancelled the transfer (CAN CAN)".into()
        )
    );
    assert_eq!(
        sim.cans_from_sender, 0,
        "no CAN back to a cancelling receiver"
    );
}

#[test]
fn receiver_cancel_during_handshake_starts_over_once() {
    // A stale receiver aborts its old session while we wait for 'C'; the
    // second start sees the 'C' of its new session and sends block 1 (this
    // script never acknowledges it).
    let mut port = ScriptPort::arrivals(vec![(100, vec![CAN, CAN]), (4_000, vec![CRC_C])]);
    let err = flash(&mut port, &mut MemImage::pattern(10), &xmodem())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "transfer: handshake: the receiver cancelled the transfer (CAN CAN); starting over \
             failed too: timeout: transfer: block 1"
        ),
        "{err}"
    );
    assert_eq!(port.written.first(), Some(&SOH), "block 1 went out");

    // A receiver that keeps cancelling is not retried a second time.
    let mut port = ScriptPort::arrivals(vec![(100, vec![CAN, CAN]), (4_000, vec![CAN, CAN])]);
    let err = flash(&mut port, &mut MemImage::pattern(10), &xmodem())
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("starting over failed too: transfer: handshake: the receiver cancelled the transfer (CAN CAN)"),
        "{err}"
    );
    assert!(port.written.is_empty());
}

#[test]
fn a_receiver_that_refuses_block_1_twice_fails_at_once_as_a_refusal() {
    // A bootloader that rejects the image: CAN CAN for block 1, then back to
    // polling 'C' every second, so the line is never quiet for long.
    let polls: Vec<(u64, Vec<u8>)> = (0..40u64).map(|i| (1_000 * i + 500, vec![CRC_C])).collect();
    let mut arrivals = vec![(0, vec![CRC_C])];
    arrivals.extend(polls);
    let mut port = ScriptPort::arrivals(arrivals)
        .reply(10, vec![CAN, CAN])
        .reply(10, vec![CAN, CAN]);
    let err = flash(&mut port, &mut MemImage::pattern(10), &xmodem()).unwrap_err();
    assert!(
        err.to_string().contains("the device refused the image"),
        "{err}"
    );
    assert!(
        port.now < 10_000,
        "given up after {} ms of a scripted clock",
        port.now
    );
    assert_eq!(
        port.writes
            .iter()
            .filter(|(_, w)| w.first() == Some(&SOH))
            .count(),
        2,
        "block 1 sent twice"
    );
}

#[test]
fn banner_with_a_c_in_it_is_skipped() {
    let rx = Rx {
        banner: b"\r\nGecko Bootloader v2.4\r\nCRC OK, C to go\r\nBL > \x15\x15 ".to_vec(),
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 2048, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert!(report.summary.contains("CRC-16"), "{}", report.summary);
    assert_eq!(sim.block_sizes, vec![1024, 1024]);
}

#[test]
fn lone_start_character_in_a_script_settles() {
    // 'C' followed by more 'C's within the settle window is still a start
    // (after an enter command, so the handshake reads it).
    let mut port = ScriptPort::arrivals(vec![(5, b"xxC".to_vec()), (20, b"C".to_vec())]);
    let settings = Settings {
        retries: 0,
        block_timeout_ms: 100,
        enter_command: Some(b"u".to_vec()),
        ..xmodem()
    };
    let err = flash(&mut port, &mut MemImage::pattern(10), &settings).unwrap_err();
    // It started (a block went out) and then timed out on the reply.
    assert!(matches!(err, Error::Timeout(m) if m.starts_with("transfer: block 1")));
    assert_eq!(port.written[..2], [b'u', SOH]);
}

/// When the first data frame went out.
fn first_frame_at(port: &ScriptPort) -> Option<u64> {
    port.writes
        .iter()
        .find(|(_, w)| matches!(w.first(), Some(&SOH | &STX)))
        .map(|(t, _)| *t)
}

#[test]
fn a_start_character_queued_before_the_sender_looks_is_used_not_drained() {
    // The receiver asked ('C') before the link was opened and repeats only
    // after 10 s (lrzsz `rx`); noise before the 'C' is still dropped. The
    // first two ACKs answer a sender that used the queued 'C', the last two
    // one that waited for the next.
    let script = vec![
        (0, b"boot\r\nCC".to_vec()),
        (60, vec![ACK]),
        (61, vec![ACK]),
        (10_000, b"C".to_vec()),
        (10_100, vec![ACK]),
        (10_101, vec![ACK]),
    ];
    let mut port = ScriptPort::arrivals(script.clone());
    let report = flash(&mut port, &mut MemImage::pattern(10), &xmodem()).unwrap();
    assert!(
        report.summary.contains("10 bytes in 1 blocks"),
        "{}",
        report.summary
    );
    assert_eq!(port.written[0], SOH);
    assert_eq!(port.now, 61, "block 1 went out on the queued 'C'");

    // With an enter command a queued 'C' is stale: the sender drains it and
    // waits for one after the command.
    let settings = Settings {
        enter_command: Some(b"go\r".to_vec()),
        ..xmodem()
    };
    let mut port = ScriptPort::arrivals(script);
    flash(&mut port, &mut MemImage::pattern(10), &settings).unwrap();
    assert!(port.written.starts_with(b"go\r\x01"));
    assert_eq!(
        port.now, 10_101,
        "block 1 waited for the receiver's next 'C'"
    );
}

#[test]
fn a_queued_c_followed_by_text_is_a_banner_letter() {
    // Text comes 3 ms after the 'C', within the quiet the sender waits for.
    let script = vec![
        (0, b"boot: C".to_vec()),
        (3, b"hecking\r\n".to_vec()),
        (100, b"C".to_vec()),
        (200, vec![ACK]),
        (201, vec![ACK]),
    ];
    let mut port = ScriptPort::arrivals(script);
    flash(&mut port, &mut MemImage::pattern(10), &xmodem()).unwrap();
    let first_block = first_frame_at(&port).unwrap();
    assert!(
        first_block >= 100 + u64::from(SETTLE_MS),
        "block 1 at {first_block} ms: waited for the receiver's 'C' and its settle"
    );
}

#[test]
fn first_eot_nak_is_normal() {
    let rx = Rx {
        nak_first_eot: true,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 1024, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.eots, 2);
    assert_eq!(report.retries, 0);
}

#[test]
fn lost_first_block_is_resent_on_the_second_c() {
    let rx = Rx {
        lose: HashMap::from([(1, 1)]),
        start_every: 500,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 2048, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(report.retries, 1);
    assert!(
        sim.now < 3000,
        "resent before the block timeout: now = {}",
        sim.now
    );
}

#[test]
fn a_single_crossing_c_does_not_resend() {
    let rx = Rx {
        crossing_c: true,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 3000, xmodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(report.retries, 0);
}

#[test]
fn block_numbers_wrap_after_255() {
    let settings = Settings {
        block_size: 128,
        ..xmodem()
    };
    let (sim, img, r) = run(Rx::default(), 300 * 128 + 5, settings);
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.block_sizes.len(), 301);
}

#[test]
fn large_image_one_byte_reads() {
    let rx = Rx {
        chunk: 1,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 300 * 1024 + 17, xmodem());
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.block_sizes.len(), 301);
    assert!(img.largest_read <= 1024);
    assert!(img.reads >= 301);
}

#[test]
fn enter_command_is_sent_before_the_handshake_then_waits() {
    let settings = Settings {
        enter_command: Some(b"1\r".to_vec()),
        enter_wait_ms: 700,
        ..xmodem()
    };
    let (sim, img, r) = run(Rx::default(), 128, settings);
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert!(sim.all_written.starts_with(b"1\r\x01\x01\xFE"));
    assert_eq!(sim.sleeps, vec![700]);
}

#[test]
fn a_receiver_deaf_to_the_first_enter_commands_gets_them_again() {
    // Campaign, 1-5 notices a run: after a restart mid-transfer the
    // receiver was still in its old session and ignored the enter command.
    let settings = Settings {
        enter_command: Some(b"update\r".to_vec()),
        ..xmodem()
    };
    let rx = Rx {
        stale_enters: Some((b"update\r".to_vec(), 2)),
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 3000, settings.clone());
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.enters, 3, "sent again every 10 s of silence");
    assert!(
        sim.logs
            .iter()
            .any(|(l, m)| *l == Level::Warn && m.contains("sending enter_command again"))
    );

    // Deaf for longer than the handshake: the error says how often it asked.
    let rx = Rx {
        stale_enters: Some((b"update\r".to_vec(), 10)),
        ..Rx::default()
    };
    let (sim, _, r) = run(rx, 3000, settings.clone());
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("within 30000 ms") && e.contains("enter_command sent 3 times"),
        "{e}"
    );
    assert_eq!(sim.enters, 3);

    // enter_repeat_ms = 0: once, as before.
    let rx = Rx {
        stale_enters: Some((b"update\r".to_vec(), 1)),
        ..Rx::default()
    };
    let once = Settings {
        enter_repeat_ms: 0,
        ..settings
    };
    let (sim, _, r) = run(rx, 3000, once);
    assert!(r.is_err());
    assert_eq!(sim.enters, 1);
}

#[test]
fn unsupported_drain_is_ignored() {
    let rx = Rx {
        drain_supported: false,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 100, xmodem());
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
}

#[test]
fn link_closed_is_a_transfer_error_naming_the_block() {
    let rx = Rx {
        close_after_writes: Some(2),
        ..Rx::default()
    };
    let (_, _, r) = run(rx, 4096, xmodem());
    assert_eq!(
        r.unwrap_err(),
        Error::Transfer("transfer: block 3: link closed: peer hung up".into())
    );
}

#[test]
fn empty_image_is_refused() {
    let (sim, _, r) = run(Rx::default(), 0, xmodem());
    assert!(matches!(r.unwrap_err(), Error::Verify(_)));
    assert!(sim.all_written.is_empty());
}

#[test]
fn ymodem_batch() {
    let (sim, img, r) = run(
        Rx {
            ymodem: true,
            ..Rx::default()
        },
        2500,
        ymodem(),
    );
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    let header = sim.header.clone().unwrap();
    assert_eq!(sim.header_len, 128);
    assert!(header.starts_with(b"firmware.bin\x002500\x00"));
    assert!(header[19..].iter().all(|&b| b == 0));
    assert!(sim.null_block, "the batch ends with a null block 0");
    // 2500 = 2 x 1K + 452 → 4 small blocks.
    assert_eq!(sim.block_sizes, vec![1024, 1024, 128, 128, 128, 128]);
    assert!(report.summary.starts_with("YMODEM CRC-16: 2500 bytes"));
    assert_eq!(report.retries, 0);
}

#[test]
fn ymodem_long_name_uses_a_1k_header_and_eot_nak() {
    let name = "n".repeat(200);
    let settings = Settings {
        filename: name.clone(),
        ..ymodem()
    };
    let rx = Rx {
        ymodem: true,
        nak_first_eot: true,
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 1024, settings);
    r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.header_len, 1024);
    let header = sim.header.unwrap();
    assert_eq!(&header[..200], name.as_bytes());
    assert_eq!(&header[200..206], b"\x001024\x00");
}

#[test]
fn ymodem_lost_header_is_resent_on_the_second_c() {
    // The receiver misses block 0 twice and keeps asking with 'C'.
    let rx = Rx {
        ymodem: true,
        lose: HashMap::from([(0, 2)]),
        ..Rx::default()
    };
    let (sim, img, r) = run(rx, 1500, ymodem());
    let report = r.unwrap();
    assert_delivered(&sim, &img, 0x1A);
    assert_eq!(sim.seen[&0], 3);
    assert_eq!(report.retries, 2);
    // Two 'C's per resend at 1 s intervals, far below the 30 s header timeout.
    assert!(sim.now < 6000, "now = {}", sim.now);
}

#[test]
fn ymodem_refused_header_gives_up() {
    let rx = Rx {
        ymodem: true,
        accepts_1k: false,
        ..Rx::default()
    };
    let settings = Settings {
        filename: "x".repeat(300), // forces a 1K header this receiver refuses
        retries: 3,
        ..ymodem()
    };
    let (sim, _, r) = run(rx, 10, settings);
    assert_eq!(
        r.unwrap_err(),
        Error::Transfer(
            "block 0 (YMODEM header): not acknowledged after 4 attempts (4 NAK, 0 garbled, 0 \
             without reply); sent CAN CAN"
                .into()
        )
    );
    assert!(sim.all_written.ends_with(&[CAN, CAN]));
}

#[test]
fn ymodem_receiver_cancel_at_block_1() {
    let rx = Rx {
        ymodem: true,
        cancel_at: Some(1),
        ..Rx::default()
    };
    let (_, _, r) = run(rx, 2000, ymodem());
    // A stale session is assumed: the sender waits for a quiet line and
    // starts over once; this receiver stays silent, so both failures are told.
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.starts_with(
            "transfer: block 1 (offset 0): the receiver cancelled the transfer (CAN CAN); \
             starting over failed too: timeout: handshake"
        ),
        "{msg}"
    );
}
