//! The AN3155 command interpreter as a sans-I/O state machine: bytes in, one at a time; answers
//! (and how long the part is busy before sending them) out. It owns the memory model, the
//! counters and the one-shot faults; [`super::serve`] moves the bytes.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::memory::{MemError, Memory, Region};
use super::{EraseCommand, EraseKind, Stm32Counters, Stm32Event, Stm32Mode, Stm32SimConfig};

/// Acknowledge.
pub const ACK: u8 = 0x79;
/// Not acknowledge.
pub const NACK: u8 = 0x1F;
/// The autobaud byte that selects the UART.
pub const SYNC: u8 = 0x7F;

/// Command codes.
pub mod cmd {
    /// Get the version and the allowed commands.
    pub const GET: u8 = 0x00;
    /// Get the version and two option bytes.
    pub const GET_VERSION: u8 = 0x01;
    /// Get the product ID.
    pub const GET_ID: u8 = 0x02;
    /// Read memory.
    pub const READ_MEMORY: u8 = 0x11;
    /// Jump to an address.
    pub const GO: u8 = 0x21;
    /// Write memory.
    pub const WRITE_MEMORY: u8 = 0x31;
    /// Erase (one-byte page numbers).
    pub const ERASE: u8 = 0x43;
    /// Extended erase (two-byte page numbers).
    pub const EXTENDED_ERASE: u8 = 0x44;
}

/// What the part sends, after being busy for `busy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Bytes to send.
    pub reply: Vec<u8>,
    /// How long the part works before sending them (erase time).
    pub busy: Duration,
}

impl Output {
    fn now(reply: Vec<u8>) -> Self {
        Self {
            reply,
            busy: Duration::ZERO,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddrFor {
    Read,
    Write,
    Go,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Collect {
    /// 4 address bytes + XOR checksum.
    Address(AddrFor),
    /// N and its complement.
    ReadLen(u32),
    /// N, N+1 data bytes, XOR checksum of N and the data.
    WriteBody(u32),
    /// N (1 byte) then pages and checksum, or 0xFF 0x00 for a global erase.
    Erase,
    /// N (2 bytes) then pages and checksum, or a special code and its checksum.
    ExtendedErase,
}

impl Collect {
    fn command(self) -> u8 {
        match self {
            Collect::Address(AddrFor::Read) | Collect::ReadLen(_) => cmd::READ_MEMORY,
            Collect::Address(AddrFor::Write) | Collect::WriteBody(_) => cmd::WRITE_MEMORY,
            Collect::Address(AddrFor::Go) => cmd::GO,
            Collect::Erase => cmd::ERASE,
            Collect::ExtendedErase => cmd::EXTENDED_ERASE,
        }
    }

    /// How many bytes the step takes, given what has arrived (None: not known yet).
    fn needed(self, buf: &[u8]) -> Option<usize> {
        match self {
            Collect::Address(_) => Some(5),
            Collect::ReadLen(_) => Some(2),
            Collect::WriteBody(_) => buf.first().map(|&n| usize::from(n) + 3),
            Collect::Erase => buf.first().map(|&n| match n {
                0xFF => 2,
                n => usize::from(n) + 3,
            }),
            Collect::ExtendedErase => {
                (buf.len() >= 2).then(|| match u16::from_be_bytes([buf[0], buf[1]]) {
                    n if n >= 0xFFF0 => 3,
                    n => 2 + 2 * (usize::from(n) + 1) + 1,
                })
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Unsynced,
    Idle,
    Complement(u8),
    Collect(Collect, Vec<u8>),
    Application(u32),
    Silent,
}

#[derive(Debug, Default)]
struct Fired {
    nack_write: bool,
    corrupt_read: bool,
    silent: bool,
}

/// The bootloader and the part's memories.
#[derive(Debug)]
pub struct Bootloader {
    cfg: Stm32SimConfig,
    mem: Memory,
    phase: Phase,
    counters: Stm32Counters,
    /// Write memory commands whose data arrived intact (what `nack_write` counts).
    write_commands: u32,
    fired: Fired,
    /// The silence fault fires when the current command ends.
    silence_due: bool,
    events: UnboundedSender<Stm32Event>,
}

fn xor(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

impl Bootloader {
    /// A part fresh out of reset with BOOT0 high: waiting for 0x7F.
    pub fn new(cfg: Stm32SimConfig, events: UnboundedSender<Stm32Event>) -> Self {
        Self {
            mem: Memory::new(&cfg),
            cfg,
            phase: Phase::Unsynced,
            counters: Stm32Counters::default(),
            write_commands: 0,
            fired: Fired::default(),
            silence_due: false,
            events,
        }
    }

    /// The memories.
    pub fn memory(&self) -> &Memory {
        &self.mem
    }

    /// The counters.
    pub fn counters(&self) -> &Stm32Counters {
        &self.counters
    }

    /// What the part is doing.
    pub fn mode(&self) -> Stm32Mode {
        match self.phase {
            Phase::Unsynced => Stm32Mode::Bootloader { synced: false },
            Phase::Application(address) => Stm32Mode::Application { address },
            Phase::Silent => Stm32Mode::Silent,
            _ => Stm32Mode::Bootloader { synced: true },
        }
    }

    /// A reset with BOOT0 high: back to the bootloader, waiting for 0x7F (a silenced part
    /// stays silent: that fault lasts the device's life).
    pub fn reset(&mut self) {
        if self.phase != Phase::Silent {
            self.phase = Phase::Unsynced;
        }
        self.event(Stm32Event::Reset);
    }

    /// A new link session: a command cut in half is dropped (the part would wait for the rest;
    /// a new TCP connection is a new host).
    pub fn new_session(&mut self) {
        if matches!(self.phase, Phase::Complement(_) | Phase::Collect(..)) {
            self.phase = Phase::Idle;
        }
    }

    fn event(&self, e: Stm32Event) {
        let _ = self.events.send(e);
    }

    /// Ends the current command with `reply`.
    fn finish(&mut self, reply: Vec<u8>, busy: Duration) -> Option<Output> {
        self.phase = Phase::Idle;
        if std::mem::take(&mut self.silence_due) {
            self.phase = Phase::Silent;
            self.event(Stm32Event::Fault("silent from now on".into()));
        }
        Some(Output { reply, busy })
    }

    fn nack(&mut self, command: Option<u8>, reason: impl Into<String>) -> Option<Output> {
        let reason = reason.into();
        tracing::debug!(?command, %reason, "NACK");
        self.counters.nacks += 1;
        self.event(Stm32Event::Nack { command, reason });
        self.finish(vec![NACK], Duration::ZERO)
    }

    fn commands(&self) -> Vec<u8> {
        let erase = match self.cfg.erase {
            EraseCommand::Standard => cmd::ERASE,
            EraseCommand::Extended => cmd::EXTENDED_ERASE,
        };
        vec![
            cmd::GET,
            cmd::GET_VERSION,
            cmd::GET_ID,
            cmd::READ_MEMORY,
            cmd::GO,
            cmd::WRITE_MEMORY,
            erase,
        ]
    }

    /// Takes one byte from the host; returns what to send, if anything.
    pub fn push(&mut self, byte: u8) -> Option<Output> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Unsynced => {
                if byte == SYNC {
                    self.counters.syncs += 1;
                    self.event(Stm32Event::Synced);
                    Some(Output::now(vec![ACK]))
                } else {
                    // Autobaud sees garbage: nothing happens.
                    self.phase = Phase::Unsynced;
                    None
                }
            }
            // After the sync, 0x7F is a command byte like any other (see the module docs).
            Phase::Idle => {
                self.phase = Phase::Complement(byte);
                None
            }
            Phase::Complement(code) => self.command(code, byte),
            Phase::Collect(what, mut buf) => {
                buf.push(byte);
                match what.needed(&buf) {
                    Some(n) if buf.len() >= n => self.step(what, &buf),
                    _ => {
                        self.phase = Phase::Collect(what, buf);
                        None
                    }
                }
            }
            p @ (Phase::Application(_) | Phase::Silent) => {
                self.phase = p;
                None
            }
        }
    }

    fn command(&mut self, code: u8, complement: u8) -> Option<Output> {
        self.counters.commands += 1;
        if self.cfg.faults.silent_after == Some(self.counters.commands as u32)
            && !std::mem::replace(&mut self.fired.silent, true)
        {
            self.silence_due = true;
        }
        if code ^ complement != 0xFF {
            return self.nack(
                None,
                format!("command 0x{code:02x} with complement 0x{complement:02x}"),
            );
        }
        self.event(Stm32Event::Command { code });
        let start = |this: &mut Self, what: Collect| this.next(what);
        match code {
            cmd::GET => {
                let cmds = self.commands();
                let mut r = vec![ACK, cmds.len() as u8, self.cfg.bootloader_version];
                r.extend(cmds);
                r.push(ACK);
                self.finish(r, Duration::ZERO)
            }
            cmd::GET_VERSION => {
                let [a, b] = self.cfg.option_bytes;
                self.finish(
                    vec![ACK, self.cfg.bootloader_version, a, b, ACK],
                    Duration::ZERO,
                )
            }
            cmd::GET_ID => {
                let [hi, lo] = self.cfg.pid.to_be_bytes();
                self.finish(vec![ACK, 1, hi, lo, ACK], Duration::ZERO)
            }
            cmd::READ_MEMORY => start(self, Collect::Address(AddrFor::Read)),
            cmd::WRITE_MEMORY => start(self, Collect::Address(AddrFor::Write)),
            cmd::GO => start(self, Collect::Address(AddrFor::Go)),
            cmd::ERASE if self.cfg.erase == EraseCommand::Standard => start(self, Collect::Erase),
            cmd::EXTENDED_ERASE if self.cfg.erase == EraseCommand::Extended => {
                start(self, Collect::ExtendedErase)
            }
            _ => self.nack(Some(code), format!("command 0x{code:02x} not supported")),
        }
    }

    fn step(&mut self, what: Collect, buf: &[u8]) -> Option<Output> {
        let code = Some(what.command());
        let (body, sum) = buf.split_at(buf.len() - 1);
        let sum = sum[0];
        match what {
            Collect::Address(purpose) => {
                if xor(body) != sum {
                    return self.nack(code, "address checksum");
                }
                let addr = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                match purpose {
                    AddrFor::Read => match self.mem.locate(addr) {
                        Some(_) => self.next(Collect::ReadLen(addr)),
                        None => self.nack(code, MemError::Unmapped(addr).to_string()),
                    },
                    AddrFor::Write => match self.mem.check_write_start(addr) {
                        Ok(_) => self.next(Collect::WriteBody(addr)),
                        Err(e) => self.nack(code, e.to_string()),
                    },
                    AddrFor::Go => match self.mem.locate(addr) {
                        Some((Region::Flash | Region::Ram, _)) => {
                            self.counters.go_address = Some(addr);
                            self.event(Stm32Event::Go { address: addr });
                            let out = self.finish(vec![ACK], Duration::ZERO);
                            if self.phase == Phase::Idle {
                                self.phase = Phase::Application(addr);
                            }
                            out
                        }
                        _ => self.nack(code, format!("cannot jump to 0x{addr:08x}")),
                    },
                }
            }
            Collect::ReadLen(addr) => {
                let n = body[0];
                if n ^ sum != 0xFF {
                    return self.nack(code, "length complement");
                }
                let len = usize::from(n) + 1;
                match self.mem.read(addr, len) {
                    Ok(mut data) => {
                        self.counters.reads += 1;
                        self.counters.read_bytes += len as u64;
                        if self.cfg.faults.corrupt_read == Some(self.counters.reads as u32)
                            && !std::mem::replace(&mut self.fired.corrupt_read, true)
                        {
                            data[len / 2] ^= 0xFF;
                            self.event(Stm32Event::Fault(format!(
                                "read {} corrupted at 0x{:08x}",
                                self.counters.reads,
                                addr + (len / 2) as u32
                            )));
                        }
                        self.event(Stm32Event::Read { address: addr, len });
                        let mut r = vec![ACK];
                        r.extend(data);
                        self.finish(r, Duration::ZERO)
                    }
                    Err(e) => self.nack(code, e.to_string()),
                }
            }
            Collect::WriteBody(addr) => {
                if xor(body) != sum {
                    return self.nack(code, "data checksum");
                }
                self.write_commands += 1;
                if self.cfg.faults.nack_write == Some(self.write_commands)
                    && !std::mem::replace(&mut self.fired.nack_write, true)
                {
                    self.event(Stm32Event::Fault(format!(
                        "write {} at 0x{addr:08x} refused",
                        self.write_commands
                    )));
                    return self.nack(code, "fault: write refused");
                }
                let data = &body[1..];
                let mut program = data.to_vec();
                if matches!(self.mem.locate(addr), Some((Region::Flash, _))) {
                    // Flash is programmed a word at a time: a short tail is padded with 0xFF,
                    // which leaves those cells as they are.
                    program.resize(data.len().next_multiple_of(4), 0xFF);
                }
                match self.mem.write(addr, &program) {
                    Ok(()) => {
                        self.counters.writes += 1;
                        self.counters.write_bytes += data.len() as u64;
                        self.event(Stm32Event::Written {
                            address: addr,
                            len: data.len(),
                        });
                        self.finish(vec![ACK], Duration::ZERO)
                    }
                    Err(e) => self.nack(code, e.to_string()),
                }
            }
            Collect::Erase => {
                if body[0] == 0xFF {
                    if sum != 0x00 {
                        return self.nack(code, "global erase checksum");
                    }
                    return self.erased(EraseKind::Mass);
                }
                if xor(body) != sum {
                    return self.nack(code, "erase checksum");
                }
                let pages: Vec<u32> = body[1..].iter().map(|&p| u32::from(p)).collect();
                self.erase_pages(pages)
            }
            Collect::ExtendedErase => {
                if xor(body) != sum {
                    return self.nack(code, "extended erase checksum");
                }
                match u16::from_be_bytes([body[0], body[1]]) {
                    0xFFFF => self.erased(EraseKind::Mass),
                    0xFFFE => self.erased(EraseKind::Bank(1)),
                    0xFFFD => self.erased(EraseKind::Bank(2)),
                    n if n >= 0xFFF0 => self.nack(code, format!("reserved erase code 0x{n:04x}")),
                    _ => {
                        let pages = body[2..]
                            .chunks_exact(2)
                            .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
                            .collect();
                        self.erase_pages(pages)
                    }
                }
            }
        }
    }

    fn next(&mut self, what: Collect) -> Option<Output> {
        self.phase = Phase::Collect(what, Vec::new());
        Some(Output::now(vec![ACK]))
    }

    fn erase_pages(&mut self, pages: Vec<u32>) -> Option<Output> {
        let code = Some(self.cmd_of_erase());
        if let Err(e) = self.mem.check_pages(&pages) {
            return self.nack(code, e.to_string());
        }
        self.erased(EraseKind::Pages(pages))
    }

    fn cmd_of_erase(&self) -> u8 {
        match self.cfg.erase {
            EraseCommand::Standard => cmd::ERASE,
            EraseCommand::Extended => cmd::EXTENDED_ERASE,
        }
    }

    fn erased(&mut self, kind: EraseKind) -> Option<Output> {
        let pages = match &kind {
            EraseKind::Mass => {
                self.mem.mass_erase();
                self.counters.mass_erases += 1;
                self.mem.page_count()
            }
            EraseKind::Bank(b) => match self.mem.erase_bank(*b) {
                Ok(n) => n,
                Err(e) => return self.nack(Some(self.cmd_of_erase()), e.to_string()),
            },
            EraseKind::Pages(p) => {
                // Checked before.
                let _ = self.mem.erase_pages(p);
                p.len()
            }
        };
        self.counters.erases += 1;
        self.counters.pages_erased += pages as u64;
        self.event(Stm32Event::Erased(kind));
        let busy = self.cfg.erase_time.saturating_mul(pages as u32);
        self.finish(vec![ACK], busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stm32::Stm32Faults;

    fn part(cfg: Stm32SimConfig) -> Bootloader {
        Bootloader::new(cfg, tokio::sync::mpsc::unbounded_channel().0)
    }

    /// Feeds `bytes`; returns everything answered.
    fn feed(b: &mut Bootloader, bytes: &[u8]) -> Vec<u8> {
        bytes
            .iter()
            .filter_map(|&x| b.push(x))
            .flat_map(|o| o.reply)
            .collect()
    }

    fn addr(a: u32) -> Vec<u8> {
        let mut v = a.to_be_bytes().to_vec();
        v.push(xor(&v));
        v
    }

    #[test]
    fn sync_then_second_sync_is_a_command_byte() {
        let mut b = part(Stm32SimConfig::default());
        assert_eq!(feed(&mut b, &[0x00, 0x7F]), [ACK]);
        // A second 0x7F waits for its "complement"; a third makes the pair: NACK.
        assert!(feed(&mut b, &[0x7F]).is_empty());
        assert_eq!(feed(&mut b, &[0x7F]), [NACK]);
        assert_eq!(feed(&mut b, &[0x02, 0xFD]), [ACK, 1, 0x04, 0x10, ACK]);
    }

    #[test]
    fn write_pads_short_tail_and_erase_is_timed() {
        let mut b = part(Stm32SimConfig::default());
        feed(&mut b, &[SYNC]);
        let mut w = vec![0x31, 0xCE];
        w.extend(addr(0x0800_0000));
        let data = [1u8, 2, 3, 4, 5];
        w.push(4);
        w.extend(data);
        w.push(xor(&[4, 1, 2, 3, 4, 5]));
        assert_eq!(feed(&mut b, &w), [ACK, ACK, ACK]);
        assert_eq!(&b.memory().flash()[..8], [1, 2, 3, 4, 5, 0xFF, 0xFF, 0xFF]);
        let outs: Vec<Output> = [0x43, 0xBC, 1, 0, 1, 0]
            .iter()
            .filter_map(|&x| b.push(x))
            .collect();
        assert_eq!(outs[1].busy, Duration::from_millis(2));
        assert_eq!(b.memory().flash()[0], 0xFF);
    }

    #[test]
    fn silent_after_and_unknown_commands() {
        let mut b = part(Stm32SimConfig {
            faults: Stm32Faults {
                silent_after: Some(2),
                ..Stm32Faults::default()
            },
            ..Stm32SimConfig::default()
        });
        feed(&mut b, &[SYNC]);
        assert_eq!(feed(&mut b, &[0x44, 0xBB]), [NACK]);
        assert_eq!(feed(&mut b, &[0x01, 0xFE]), [ACK, 0x22, 0, 0, ACK]);
        assert!(feed(&mut b, &[0x01, 0xFE]).is_empty());
        assert_eq!(b.mode(), Stm32Mode::Silent);
    }
}
