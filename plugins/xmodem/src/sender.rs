//! The XMODEM / XMODEM-1K / YMODEM **sender**, written against [`Port`] and
//! [`Source`] so it runs natively in unit tests and inside the wasm component.
//!
//! What it does, in order: drain stale input (without an enter command, keep a
//! start character followed by a quiet line: the receiver asked before the link
//! was opened); send the optional enter-bootloader command and wait; wait for
//! the receiver's start character ('C' = CRC-16, NAK = 8-bit checksum),
//! skipping banner bytes; for YMODEM send block 0
//! (`name\0size\0`) and wait for ACK and a new 'C'; send the image in 1K (STX)
//! or 128-byte (SOH) blocks read from the image one block at a time; send EOT
//! until it is ACKed; for YMODEM end the batch with a null block 0.
//!
//! Recovery rules:
//! - every frame is re-sent after a NAK, a garbled reply or `block_timeout_ms`
//!   of silence, at most `retries` times; then the sender sends CAN CAN and
//!   fails (`timeout` if the receiver never said anything, else `transfer`);
//! - 1K blocks fall back to 128-byte blocks for the rest of the transfer when
//!   the first data block fails twice in a row, or any later one three times
//!   (receivers without XMODEM-1K, noisy lines);
//! - a receiver that starts with NAK gets the original XMODEM: 8-bit checksum
//!   and 128-byte blocks;
//! - two consecutive CAN bytes from the receiver abort at once (`transfer`),
//!   without sending CAN back;
//! - while waiting for the reply to the first frame of a phase (block 0, data
//!   block 1, the null block), a second 'C' means the receiver did not see the
//!   frame: it is re-sent without waiting for the timeout. A single 'C' may
//!   have crossed the frame on the wire and is not enough. Elsewhere 'C' is
//!   noise.
//!
//! What it is not: a receiver, ZMODEM, or a file-system batch sender (YMODEM
//! sends exactly one file). It does not interpret the image.
//!
//! Why not the `xmodem` (0.4) or `ymodem` (0.1) crates: both drive a
//! `std::io::Read + Write` device and rely on the device's own read timeout,
//! while our link has an explicit read-with-timeout and a host clock; both send
//! one fixed block size with no 1K→128 or CRC→checksum fallback and leave CAN
//! during the data phase as a TODO; `xmodem` has no YMODEM batch, and both
//! read the payload from a `Read` stream rather than by offset, which our
//! retry and block-size fallback need. Adapting them would have meant rewriting
//! their send loops, so this module implements the sender directly (CRC-16 via
//! the `crc` crate).

use crc::{CRC_16_XMODEM, Crc};
use otagw_plugin_sdk::{Error, FlashReport, Inbox, Level, LinkFault, Phase, Port, Source};

use crate::options::{Protocol, Settings};

pub const SOH: u8 = 0x01;
pub const STX: u8 = 0x02;
pub const EOT: u8 = 0x04;
pub const ACK: u8 = 0x06;
pub const NAK: u8 = 0x15;
pub const CAN: u8 = 0x18;
/// The receiver's request for CRC-16 mode.
pub const CRC_C: u8 = b'C';

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// After a start character, how long to listen for more bytes: text that
/// follows within this window means the 'C' was part of a banner.
pub const SETTLE_MS: u32 = 50;
/// Clearing the input without an enter command: the quiet (as the host's
/// `drain` waits for bytes in flight) after which the last byte read counts,
/// and how many reads at most before the handshake takes over.
pub(crate) const QUIET_MS: u32 = 5;
const QUIET_READS: usize = 64;
/// Consecutive failures of a 1K block before falling back to 128-byte blocks.
const FALLBACK_FIRST_BLOCK: u32 = 2;
const FALLBACK_LATER_BLOCK: u32 = 3;

/// CRC-16/XMODEM of `data`.
pub fn crc16(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

/// 8-bit arithmetic checksum of `data` (original XMODEM).
pub fn checksum8(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// One frame: header, block number, its complement, `data` padded to `len`
/// with `pad`, then CRC-16 (big-endian) or the 8-bit checksum.
pub fn frame(seq: u8, data: &[u8], len: usize, pad: u8, crc: bool) -> Vec<u8> {
    debug_assert!(data.len() <= len && (len == 128 || len == 1024));
    let mut f = Vec::with_capacity(len + 5);
    f.push(if len == 1024 { STX } else { SOH });
    f.push(seq);
    f.push(!seq);
    f.extend_from_slice(data);
    f.resize(3 + len, pad);
    let payload = &f[3..];
    if crc {
        let c = crc16(payload);
        f.extend_from_slice(&c.to_be_bytes());
    } else {
        let c = checksum8(payload);
        f.push(c);
    }
    f
}

/// The size of the next block: `block_size`, except that a tail shorter than 1K
/// goes in 128-byte blocks when `small_tail` is set and that puts fewer bytes
/// on the wire than one padded 1K block.
pub fn block_len(block_size: usize, remaining: u64, small_tail: bool) -> usize {
    if block_size == 128 || remaining >= 1024 {
        return block_size;
    }
    // Frame overhead with CRC: header, 2 block-number bytes, 2 CRC bytes.
    let small_blocks = remaining.div_ceil(128);
    if small_tail && small_blocks * (128 + 5) < 1024 + 5 {
        128
    } else {
        1024
    }
}

/// Pad bytes an XMODEM receiver will get after `size` image bytes with the
/// default plan (`block_size`, `small_tail`, CRC mode, no fallback).
pub fn pad_bytes(size: u64, block_size: usize, small_tail: bool) -> u64 {
    let mut remaining = size;
    let mut padded = 0;
    while remaining > 0 {
        let len = block_len(block_size, remaining, small_tail) as u64;
        let take = len.min(remaining);
        padded += len - take;
        remaining -= take;
    }
    padded
}

/// The YMODEM header payload: `name\0size\0` (decimal size, nothing else).
pub fn ymodem_header(name: &str, size: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(name.len() + 22);
    h.extend_from_slice(name.as_bytes());
    h.push(0);
    h.extend_from_slice(size.to_string().as_bytes());
    h.push(0);
    h
}

/// The reply to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Ack,
    Nak,
    /// Two consecutive CAN bytes.
    Cancel,
    /// Bytes came, but neither ACK nor NAK (noise, a lone 'C', a lone CAN).
    Garbled,
    /// Nothing at all within the timeout.
    Silence,
}

/// How long the line must stay quiet before a second start after a stale
/// session (receivers discard input for about a block timeout after a cancel).
pub const STALE_QUIET_MS: u32 = 1_500;
/// The longest wait for that quiet.
const STALE_WAIT_MAX_MS: u64 = 20_000;

/// Send the image: the whole `flash` of this family.
///
/// A receiver still inside an earlier, interrupted session (the gateway
/// restarted mid-transfer, a technician pulled a cable) cancels our first
/// block as out of sequence, or aborts its old session (CAN CAN) while we
/// wait for its start character. Then, once, wait for the line to go quiet
/// and start over from the enter-bootloader command.
///
/// The report counts the image bytes the receiver acknowledged (without
/// padding) and as retries the data blocks, block 0s and null blocks sent
/// again (EOT repeats are not: receivers NAK the first EOT by design).
pub fn flash<P: Port + ?Sized, S: Source + ?Sized>(
    port: &mut P,
    image: &mut S,
    settings: &Settings,
) -> Result<FlashReport, Error> {
    let mut sender = Sender::new(port, image, settings);
    match sender.run() {
        // The operator stopped the job mid-transfer: tell the receiver, so
        // it does not wait out its timeouts on half an image.
        Err(e)
            if sender.started
                && e.to_string()
                    .contains(otagw_plugin_sdk::STOPPED_BY_OPERATOR) =>
        {
            let _ = sender.port.write(&[CAN, CAN]);
            sender.log(
                Level::Warn,
                "stopped by the operator: sent CAN CAN to the receiver",
            );
            Err(e)
        }
        Err(e) if sender.cancelled_at_start => {
            let retries = sender.retries;
            let refused = sender.refused_block_1;
            sender.log(
                Level::Warn,
                &format!("{e}: the receiver was in a stale session; starting over once"),
            );
            // Until the line is quiet, or the receiver asks again: a start
            // character after its CAN is a fresh handshake (bootloaders
            // poll every second and are never quiet for long).
            let t0 = sender.port.now_ms();
            loop {
                let got = sender
                    .port
                    .read(256, STALE_QUIET_MS)
                    .map_err(|e| link_error("prepare: waiting for a quiet line", e))?;
                let asks = got.last().is_some_and(|b| matches!(*b, CRC_C | NAK));
                if got.is_empty() || asks || sender.port.now_ms() - t0 > STALE_WAIT_MAX_MS {
                    break;
                }
            }
            let mut again = Sender::new(port, image, settings);
            again.retries = retries + 1;
            let r = again.run();
            if r.is_err() && refused && again.refused_block_1 {
                return Err(Error::Device(
                    "the device refused the image: it cancelled the first block twice \
                     (CAN CAN); check that the image is for this device and its bootloader"
                        .into(),
                ));
            }
            r.map_err(|e2| {
                Error::Transfer(format!(
                    "{}; starting over failed too: {e2}",
                    e.to_string().trim_start_matches("transfer: ")
                ))
            })
        }
        r => r,
    }
}

struct Sender<'a, P: Port + ?Sized, S: Source + ?Sized> {
    port: &'a mut P,
    image: &'a mut S,
    s: &'a Settings,
    /// Bytes read from the link and not yet looked at.
    rx: Inbox,
    crc: bool,
    block_size: usize,
    retries: u32,
    blocks: u32,
    /// The receiver has started: giving up now sends CAN CAN.
    started: bool,
    /// The receiver cancelled the very first frame (a stale session).
    cancelled_at_start: bool,
    /// ... and that frame was data block 1 (not the handshake).
    refused_block_1: bool,
}

impl<'a, P: Port + ?Sized, S: Source + ?Sized> Sender<'a, P, S> {
    fn new(port: &'a mut P, image: &'a mut S, s: &'a Settings) -> Self {
        Sender {
            port,
            image,
            s,
            rx: Inbox::default(),
            crc: true,
            block_size: s.block_size,
            retries: 0,
            blocks: 0,
            started: false,
            cancelled_at_start: false,
            refused_block_1: false,
        }
    }
}

impl<P: Port + ?Sized, S: Source + ?Sized> Sender<'_, P, S> {
    fn run(&mut self) -> Result<FlashReport, Error> {
        let total = self.image.size();
        if total == 0 {
            return Err(Error::Verify("the image is empty: nothing to send".into()));
        }
        let t0 = self.port.now_ms();

        // Stale input (boot banners, old 'C's) would confuse the handshake. But
        // without an enter command the receiver may already be waiting, its
        // start character queued up before the link was opened (a
        // pseudo-terminal, a serial device server), and draining it would cost
        // a whole poll of the receiver (lrzsz `rx` asks again only after 10 s).
        let mut ready = None;
        if self.s.enter_command.is_none() {
            ready = self.clear_keeping_start()?;
        } else {
            match self.port.drain() {
                Ok(n) if n > 0 => self.log(Level::Debug, &format!("drained {n} stale bytes")),
                Ok(_) | Err(LinkFault::Unsupported(_)) => {}
                Err(e) => return Err(link_error("prepare: drain", e)),
            }
        }
        self.send_enter_command()?;

        let start = match ready {
            Some(b) => b,
            None => self.handshake()?,
        };
        self.started = true;
        if start == NAK {
            self.crc = false;
            self.block_size = 128;
        }
        self.log(
            Level::Info,
            &format!(
                "sending {total} bytes with {} ({}, {}-byte blocks)",
                self.s.protocol.name().to_uppercase(),
                if self.crc { "CRC-16" } else { "8-bit checksum" },
                self.block_size
            ),
        );
        if self.s.protocol == Protocol::Ymodem {
            if !self.crc {
                self.log(
                    Level::Warn,
                    "the receiver asked for checksum mode (NAK); YMODEM normally uses CRC",
                );
            }
            let header = ymodem_header(&self.s.filename, total);
            let len = if header.len() <= 128 { 128 } else { 1024 };
            let f = frame(0, &header, len, 0, self.crc);
            // Receivers erase flash when they get the size: allow the long timeout.
            self.exchange("block 0 (YMODEM header)", &f, self.s.handshake_timeout_ms)?;
            let go = self.wait_start("after block 0", self.s.handshake_timeout_ms)?;
            if go == NAK && self.crc {
                self.crc = false;
                self.block_size = 128;
                self.log(
                    Level::Warn,
                    "receiver switched to checksum mode after block 0",
                );
            }
        }

        self.port.progress(0, total, Phase::Transfer);
        self.send_data(total)?;
        self.send_eot()?;

        if self.s.protocol == Protocol::Ymodem {
            self.end_batch();
        }

        let ms = self.port.now_ms().saturating_sub(t0);
        let summary = format!(
            "{} {}: {total} bytes in {} blocks ({}-byte blocks at the end), {} retries, {}.{:03} s",
            self.s.protocol.name().to_uppercase(),
            if self.crc { "CRC-16" } else { "checksum" },
            self.blocks,
            self.block_size,
            self.retries,
            ms / 1000,
            ms % 1000
        );
        self.log(Level::Info, &format!("done: {summary}"));
        Ok(FlashReport {
            bytes_sent: total,
            retries: self.retries,
            summary,
        })
    }

    /// The data blocks, numbered from 1 (wrapping at 256 on the wire).
    fn send_data(&mut self, total: u64) -> Result<(), Error> {
        let mut offset = 0u64;
        let mut index = 1u64;
        while offset < total {
            let remaining = total - offset;
            let mut len = block_len(self.block_size, remaining, self.s.small_tail);
            let mut data = self.image.read_exact(offset, len.min(remaining as usize))?;
            let seq = index as u8;
            let mut f = frame(seq, &data, len, self.s.pad_byte, self.crc);
            let first = index == 1;
            let mut attempts = 0u32;
            let mut streak = 0u32;
            let (mut naks, mut silent, mut garbled) = (0u32, 0u32, 0u32);
            loop {
                self.rx.clear();
                self.port
                    .write(&f)
                    .map_err(|e| link_error(&format!("transfer: block {index}"), e))?;
                match self.wait_reply(self.s.block_timeout_ms, first)? {
                    Reply::Ack => break,
                    Reply::Cancel => {
                        self.cancelled_at_start = first && self.blocks == 0;
                        self.refused_block_1 = self.cancelled_at_start;
                        return Err(Error::Transfer(format!(
                            "transfer: block {index} (offset {offset}): the receiver cancelled \
                             the transfer (CAN CAN)"
                        )));
                    }
                    Reply::Nak => naks += 1,
                    Reply::Garbled => garbled += 1,
                    Reply::Silence => silent += 1,
                }
                attempts += 1;
                streak += 1;
                self.retries += 1;
                let limit = if first {
                    FALLBACK_FIRST_BLOCK
                } else {
                    FALLBACK_LATER_BLOCK
                };
                if len == 1024 && streak >= limit {
                    self.log(
                        Level::Warn,
                        &format!(
                            "block {index} (offset {offset}): 1K block refused {streak} times, \
                             falling back to 128-byte blocks"
                        ),
                    );
                    self.block_size = 128;
                    len = 128;
                    data.truncate(128);
                    f = frame(seq, &data, len, self.s.pad_byte, self.crc);
                    streak = 0;
                    attempts = 0;
                    continue;
                }
                if attempts > self.s.retries {
                    let what = format!("transfer: block {index} (offset {offset})");
                    return Err(self.give_up(&what, attempts, naks, garbled, silent));
                }
                self.log(
                    Level::Debug,
                    &format!("block {index}: re-sending (attempt {})", attempts + 1),
                );
            }
            offset += data.len() as u64;
            index += 1;
            self.blocks += 1;
            self.port.progress(offset, total, Phase::Transfer);
        }
        Ok(())
    }

    /// EOT until ACK; a NAK to the first EOT is normal.
    fn send_eot(&mut self) -> Result<(), Error> {
        let mut attempts = 0u32;
        let (mut naks, mut silent, mut garbled) = (0u32, 0u32, 0u32);
        loop {
            self.rx.clear();
            self.port.write(&[EOT]).map_err(|e| link_error("EOT", e))?;
            match self.wait_reply(self.s.block_timeout_ms, false)? {
                Reply::Ack => return Ok(()),
                Reply::Cancel => {
                    return Err(Error::Transfer(
                        "EOT: the receiver cancelled the transfer (CAN CAN) after all data \
                         blocks were acknowledged"
                            .into(),
                    ));
                }
                Reply::Nak => naks += 1,
                Reply::Garbled => garbled += 1,
                Reply::Silence => silent += 1,
            }
            attempts += 1;
            if attempts > self.s.retries {
                return Err(self.give_up("EOT", attempts, naks, garbled, silent));
            }
        }
    }

    /// YMODEM: after the EOT, wait for 'C' and send the null block 0. The file
    /// is complete at this point, so problems here are warnings.
    fn end_batch(&mut self) {
        match self.wait_start("end of batch", self.s.block_timeout_ms) {
            Ok(_) => {}
            Err(e) => self.log(
                Level::Warn,
                &format!("{e}; sending the null block 0 anyway"),
            ),
        }
        let f = frame(0, &[], 128, 0, self.crc);
        if let Err(e) = self.exchange("null block 0 (end of batch)", &f, self.s.block_timeout_ms) {
            self.log(
                Level::Warn,
                &format!("{e}; the file itself was acknowledged, treating the transfer as done"),
            );
        }
    }

    /// Send one frame until ACK (block 0 and the null block).
    fn exchange(&mut self, what: &str, f: &[u8], timeout_ms: u32) -> Result<(), Error> {
        let mut attempts = 0u32;
        let (mut naks, mut silent, mut garbled) = (0u32, 0u32, 0u32);
        loop {
            self.rx.clear();
            self.port.write(f).map_err(|e| link_error(what, e))?;
            match self.wait_reply(timeout_ms, true)? {
                Reply::Ack => return Ok(()),
                Reply::Cancel => {
                    return Err(Error::Transfer(format!(
                        "{what}: the receiver cancelled the transfer (CAN CAN)"
                    )));
                }
                Reply::Nak => naks += 1,
                Reply::Garbled => garbled += 1,
                Reply::Silence => silent += 1,
            }
            attempts += 1;
            self.retries += 1;
            if attempts > self.s.retries {
                return Err(self.give_up(what, attempts, naks, garbled, silent));
            }
        }
    }

    /// Out of retries: tell the receiver (CAN CAN) and build the error.
    fn give_up(
        &mut self,
        what: &str,
        attempts: u32,
        naks: u32,
        garbled: u32,
        silent: u32,
    ) -> Error {
        if self.started {
            // Best effort: the link may be what failed.
            let _ = self.port.write(&[CAN, CAN]);
        }
        if naks == 0 && garbled == 0 {
            Error::Timeout(format!(
                "{what}: the receiver stopped answering: no reply to {attempts} attempts \
                 ({} ms each); sent CAN CAN",
                self.s.block_timeout_ms
            ))
        } else {
            Error::Transfer(format!(
                "{what}: not acknowledged after {attempts} attempts ({naks} NAK, {garbled} \
                 garbled, {silent} without reply); sent CAN CAN"
            ))
        }
    }

    /// Discards the input, like `drain`, until the line has been quiet for
    /// [`QUIET_MS`], but reads it to see its last byte: a start character ('C'
    /// or NAK) followed by that quiet is the receiver asking, not a banner's
    /// letter (text after it would have come too), and is returned. A line that
    /// never goes quiet is left to the handshake, which skips banners.
    fn clear_keeping_start(&mut self) -> Result<Option<u8>, Error> {
        let mut last = None;
        let mut dropped = 0usize;
        for _ in 0..QUIET_READS {
            let chunk = self
                .port
                .read(4096, QUIET_MS)
                .map_err(|e| link_error("prepare: clearing the input", e))?;
            if chunk.is_empty() {
                let start = last.filter(|b| matches!(*b, CRC_C | NAK));
                dropped -= usize::from(start.is_some());
                if dropped > 0 {
                    self.log(Level::Debug, &format!("drained {dropped} stale bytes"));
                }
                return Ok(start);
            }
            dropped += chunk.len();
            last = chunk.last().copied();
        }
        Ok(None)
    }

    /// Wait for a start character ('C' or NAK), skipping anything else.
    /// Send `enter_command` (if any), then wait `enter_wait_ms`.
    fn send_enter_command(&mut self) -> Result<(), Error> {
        let Some(cmd) = self.s.enter_command.clone() else {
            return Ok(());
        };
        self.port
            .write(&cmd)
            .map_err(|e| link_error("prepare: enter_command", e))?;
        self.log(
            Level::Debug,
            &format!(
                "sent enter_command ({} bytes), waiting {} ms",
                cmd.len(),
                self.s.enter_wait_ms
            ),
        );
        if self.s.enter_wait_ms > 0 {
            self.port.sleep(self.s.enter_wait_ms);
        }
        Ok(())
    }

    /// Wait for the receiver's start character for `handshake_timeout_ms`;
    /// with an enter command, send it again every `enter_repeat_ms` of
    /// silence (see the option).
    fn handshake(&mut self) -> Result<u8, Error> {
        let total = self.s.handshake_timeout_ms;
        let repeat = self.s.enter_repeat_ms;
        if self.s.enter_command.is_none() || repeat == 0 || repeat >= total {
            return self.wait_start("handshake", total);
        }
        let deadline = self.port.now_ms() + u64::from(total);
        let mut sent = 1u32;
        loop {
            let left = deadline.saturating_sub(self.port.now_ms());
            let slice = u64::from(repeat).min(left).max(1) as u32;
            match self.wait_start("handshake", slice) {
                Err(Error::Timeout(_)) if self.port.now_ms() < deadline => {
                    self.log(
                        Level::Warn,
                        &format!(
                            "handshake: no 'C' or NAK within {slice} ms: sending enter_command \
                             again (a receiver inside an interrupted session ignores it)"
                        ),
                    );
                    self.send_enter_command()?;
                    sent += 1;
                }
                Err(Error::Timeout(m)) => {
                    return Err(Error::Timeout(format!(
                        "handshake: no 'C' or NAK from the receiver within {total} ms \
                         (enter_command sent {sent} times){}",
                        m.split_once(" ms").map_or("", |(_, rest)| rest)
                    )));
                }
                r => return r,
            }
        }
    }

    fn wait_start(&mut self, phase: &str, timeout_ms: u32) -> Result<u8, Error> {
        let deadline = self.port.now_ms() + u64::from(timeout_ms);
        let mut skipped = 0u32;
        let mut can = false;
        loop {
            let Some(b) = self.next_byte(deadline, phase)? else {
                let extra = if skipped > 0 {
                    format!(" ({skipped} other bytes skipped)")
                } else {
                    String::new()
                };
                return Err(Error::Timeout(format!(
                    "{phase}: no 'C' or NAK from the receiver within {timeout_ms} ms{extra}"
                )));
            };
            match b {
                CRC_C | NAK => {
                    if let Some(start) = self.settle(b, phase)? {
                        if skipped > 0 {
                            self.log(
                                Level::Debug,
                                &format!("{phase}: skipped {skipped} bytes before the start"),
                            );
                        }
                        return Ok(start);
                    }
                    skipped += 1;
                    can = false;
                }
                CAN if can => {
                    // Before our first block, a cancel can only end a session
                    // we are not in: a receiver still inside an interrupted
                    // transfer (the gateway restarted) aborting it while we
                    // re-sent the enter command. `flash` starts over once.
                    self.cancelled_at_start = !self.started;
                    return Err(Error::Transfer(format!(
                        "{phase}: the receiver cancelled the transfer (CAN CAN)"
                    )));
                }
                CAN => can = true,
                _ => {
                    skipped += 1;
                    can = false;
                }
            }
        }
    }

    /// A start character was seen: accept it if only start characters (or
    /// nothing) follow within [`SETTLE_MS`]; text after it means it was part of
    /// a banner. Returns the last start character seen.
    fn settle(&mut self, first: u8, phase: &str) -> Result<Option<u8>, Error> {
        let mut start = first;
        let deadline = self.port.now_ms() + u64::from(SETTLE_MS);
        loop {
            let Some(b) = self.next_byte(deadline, phase)? else {
                return Ok(Some(start));
            };
            match b {
                CRC_C | NAK => start = b,
                _ => {
                    // Let the caller look at it (it may be a CAN).
                    self.rx.unread(b);
                    return Ok(None);
                }
            }
        }
    }

    /// Wait for the reply to a frame. `first`: the receiver may still be asking
    /// for the start ('C'); a second 'C' means it did not see the frame.
    fn wait_reply(&mut self, timeout_ms: u32, first: bool) -> Result<Reply, Error> {
        let deadline = self.port.now_ms() + u64::from(timeout_ms);
        let mut can = false;
        let mut seen_c = 0u32;
        let mut anything = false;
        loop {
            let Some(b) = self.next_byte(deadline, "reply")? else {
                return Ok(if anything {
                    Reply::Garbled
                } else {
                    Reply::Silence
                });
            };
            anything = true;
            match b {
                ACK => return Ok(Reply::Ack),
                NAK => return Ok(Reply::Nak),
                CAN if can => return Ok(Reply::Cancel),
                CAN => {
                    can = true;
                    continue;
                }
                CRC_C if first => {
                    seen_c += 1;
                    if seen_c >= 2 {
                        return Ok(Reply::Nak);
                    }
                }
                _ => {}
            }
            can = false;
        }
    }

    /// The next received byte, or `None` once `deadline` has passed.
    fn next_byte(&mut self, deadline: u64, phase: &str) -> Result<Option<u8>, Error> {
        self.rx
            .next_byte(self.port, deadline, 1024)
            .map_err(|e| link_error(phase, e))
    }

    fn log(&mut self, level: Level, message: &str) {
        self.port.log(level, message);
    }
}

/// A link failure in `phase`, as a flash error.
fn link_error(phase: &str, e: LinkFault) -> Error {
    Error::Transfer(format!("{phase}: {e}"))
}

#[cfg(test)]
pub(crate) mod tests;
