//! Test support (compiled for tests only): a simulated AN3155 bootloader on
//! a virtual clock, with NOR flash (a byte is written only when erased),
//! every checksum checked, and fault injection. Images in memory are the
//! SDK's `MemImage`.

use std::collections::{HashMap, VecDeque};

use otagw_plugin_sdk::{Level, LinkFault, LinkKind, Parity, Phase, Port, SerialConfig};

use crate::protocol::{ACK, NACK, SYNC, cmd, xor};

/// Fault injection.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Never answer anything.
    pub mute: bool,
    /// Answer the first 0x7F with NACK (as if already synced).
    pub sync_nack: bool,
    /// NACK the data of a write at this address, this many times.
    pub nack_write: HashMap<u32, u32>,
    /// Perform a write at this address but lose its ACK, this many times.
    pub lose_write_ack: HashMap<u32, u32>,
    /// Stop answering from the write at this address on.
    pub mute_from_write: Option<u32>,
    /// After writing, this address holds 0x00 (a weak cell).
    pub corrupt: Option<u32>,
    /// `configure` answers unsupported (a pseudo-terminal and even parity).
    pub no_parity: bool,
    /// `set_lines` answers unsupported.
    pub no_lines: bool,
}

/// Where the bootloader is in a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Unsynced,
    Cmd,
    Address(u8),
    ReadLen(u32),
    WriteData(u32),
    Erase,
    ExtErase,
}

/// The simulated bootloader and the port to it.
pub struct Sim {
    pub now: u64,
    pub kind: LinkKind,
    pub flash: Vec<u8>,
    pub base: u32,
    pub page_size: usize,
    pub pid: u16,
    pub version: u8,
    pub commands: Vec<u8>,
    pub faults: Faults,
    st: St,
    inbuf: Vec<u8>,
    out: VecDeque<(u64, u8)>,
    /// Time a page erase takes.
    pub erase_ms_per_page: u64,
    // Records.
    pub written: Vec<u8>,
    pub configured: Vec<(u32, Parity)>,
    pub lines: Vec<(u64, bool, bool)>,
    pub erased: Vec<Vec<u16>>,
    pub mass_erases: u32,
    pub writes: Vec<(u32, usize)>,
    pub reads: Vec<(u32, usize)>,
    pub go: Vec<u32>,
    pub syncs: u32,
    pub logs: Vec<(Level, String)>,
    pub progress: Vec<(u64, u64, Phase)>,
}

impl Sim {
    /// An STM32F103 high-density-like part: 512 KiB, 2 KiB pages, extended erase.
    pub fn new() -> Sim {
        Sim {
            now: 0,
            kind: LinkKind::Serial,
            flash: vec![0xFF; 512 * 1024],
            base: 0x0800_0000,
            page_size: 2048,
            pid: 0x414,
            version: 0x31,
            commands: vec![
                0x00, 0x01, 0x02, 0x11, 0x21, 0x31, 0x44, 0x63, 0x73, 0x82, 0x92,
            ],
            faults: Faults::default(),
            st: St::Unsynced,
            inbuf: Vec::new(),
            out: VecDeque::new(),
            erase_ms_per_page: 20,
            written: Vec::new(),
            configured: Vec::new(),
            lines: Vec::new(),
            erased: Vec::new(),
            mass_erases: 0,
            writes: Vec::new(),
            reads: Vec::new(),
            go: Vec::new(),
            syncs: 0,
            logs: Vec::new(),
            progress: Vec::new(),
        }
    }

    /// The same with the standard ERASE (0x43) instead of EXTENDED ERASE.
    pub fn standard_erase() -> Sim {
        let mut s = Sim::new();
        s.commands = vec![
            0x00, 0x01, 0x02, 0x11, 0x21, 0x31, 0x43, 0x63, 0x73, 0x82, 0x92,
        ];
        s
    }

    fn reply(&mut self, bytes: &[u8], delay: u64) {
        let t = self.now + 1 + delay;
        self.out.extend(bytes.iter().map(|&b| (t, b)));
    }

    /// Consume as much of `inbuf` as makes complete frames.
    fn process(&mut self) {
        loop {
            let need = match self.st {
                St::Unsynced => 1,
                St::Cmd | St::ReadLen(_) => 2,
                St::Address(_) => 5,
                St::WriteData(_) => match self.inbuf.first() {
                    Some(&n) => usize::from(n) + 3,
                    None => 1,
                },
                St::Erase => match self.inbuf.first() {
                    Some(0xFF) => 2,
                    Some(&n) => usize::from(n) + 3,
                    None => 1,
                },
                St::ExtErase => match self.inbuf.get(..2) {
                    Some(&[a, b]) => {
                        let n = u16::from_be_bytes([a, b]);
                        if n >= 0xFFF0 {
                            3
                        } else {
                            2 + 2 * (usize::from(n) + 1) + 1
                        }
                    }
                    _ => 2,
                },
            };
            if self.inbuf.len() < need {
                return;
            }
            let frame: Vec<u8> = self.inbuf.drain(..need).collect();
            self.handle(&frame);
        }
    }

    fn handle(&mut self, f: &[u8]) {
        match self.st {
            St::Unsynced => {
                if f[0] == SYNC {
                    self.syncs += 1;
                    self.st = St::Cmd;
                    self.reply(&[ACK], 0);
                }
            }
            St::Cmd => {
                if f[1] != !f[0] || !self.commands.contains(&f[0]) {
                    self.reply(&[NACK], 0);
                    return;
                }
                match f[0] {
                    cmd::GET => {
                        let mut a = vec![ACK, self.commands.len() as u8, self.version];
                        a.extend(&self.commands);
                        a.push(ACK);
                        self.reply(&a, 0);
                    }
                    cmd::GET_VERSION => self.reply(&[ACK, self.version, 0, 0, ACK], 0),
                    cmd::GET_ID => {
                        let p = self.pid.to_be_bytes();
                        self.reply(&[ACK, 1, p[0], p[1], ACK], 0);
                    }
                    cmd::READ_MEMORY | cmd::GO | cmd::WRITE_MEMORY => {
                        self.st = St::Address(f[0]);
                        self.reply(&[ACK], 0);
                    }
                    cmd::ERASE => {
                        self.st = St::Erase;
                        self.reply(&[ACK], 0);
                    }
                    cmd::EXTENDED_ERASE => {
                        self.st = St::ExtErase;
                        self.reply(&[ACK], 0);
                    }
                    _ => self.reply(&[NACK], 0),
                }
            }
            St::Address(code) => {
                self.st = St::Cmd;
                let a = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
                if xor(&f[..4]) != f[4] {
                    self.reply(&[NACK], 0);
                    return;
                }
                let in_flash = a >= self.base && a < self.base + self.flash.len() as u32;
                match code {
                    cmd::GO => {
                        self.go.push(a);
                        self.reply(&[ACK], 0);
                        self.st = St::Unsynced;
                    }
                    _ if !in_flash => self.reply(&[NACK], 0),
                    cmd::READ_MEMORY => {
                        self.st = St::ReadLen(a);
                        self.reply(&[ACK], 0);
                    }
                    _ => {
                        if self.faults.mute_from_write == Some(a) {
                            self.faults.mute = true;
                            return;
                        }
                        self.st = St::WriteData(a);
                        self.reply(&[ACK], 0);
                    }
                }
            }
            St::ReadLen(a) => {
                self.st = St::Cmd;
                if f[1] != !f[0] {
                    self.reply(&[NACK], 0);
                    return;
                }
                let n = usize::from(f[0]) + 1;
                let off = (a - self.base) as usize;
                if off + n > self.flash.len() {
                    self.reply(&[NACK], 0);
                    return;
                }
                self.reads.push((a, n));
                let mut ans = vec![ACK];
                ans.extend_from_slice(&self.flash[off..off + n]);
                self.reply(&ans, 0);
            }
            St::WriteData(a) => {
                self.st = St::Cmd;
                let n = usize::from(f[0]) + 1;
                let data = &f[1..1 + n];
                if xor(&f[..1 + n]) != f[1 + n] || n % 4 != 0 {
                    self.reply(&[NACK], 0);
                    return;
                }
                if let Some(c) = self.faults.nack_write.get_mut(&a)
                    && *c > 0
                {
                    *c -= 1;
                    self.reply(&[NACK], 0);
                    return;
                }
                let off = (a - self.base) as usize;
                if off + n > self.flash.len() || self.flash[off..off + n].iter().any(|&b| b != 0xFF)
                {
                    self.reply(&[NACK], 0);
                    return;
                }
                self.flash[off..off + n].copy_from_slice(data);
                if let Some(c) = self.faults.corrupt
                    && c >= a
                    && c < a + n as u32
                {
                    self.flash[(c - self.base) as usize] = 0;
                }
                self.writes.push((a, n));
                if let Some(c) = self.faults.lose_write_ack.get_mut(&a)
                    && *c > 0
                {
                    *c -= 1;
                    return;
                }
                self.reply(&[ACK], 2);
            }
            St::Erase => {
                self.st = St::Cmd;
                if f[0] == 0xFF {
                    if f[1] != 0 {
                        self.reply(&[NACK], 0);
                        return;
                    }
                    self.mass_erase();
                    return;
                }
                let (last, body) = f.split_last().unwrap_or((&0, &[]));
                if xor(body) != *last {
                    self.reply(&[NACK], 0);
                    return;
                }
                let pages: Vec<u16> = body[1..].iter().map(|&p| u16::from(p)).collect();
                self.erase_pages(pages);
            }
            St::ExtErase => {
                self.st = St::Cmd;
                let (last, body) = f.split_last().unwrap_or((&0, &[]));
                if xor(body) != *last {
                    self.reply(&[NACK], 0);
                    return;
                }
                let n = u16::from_be_bytes([f[0], f[1]]);
                if n == 0xFFFF {
                    self.mass_erase();
                    return;
                }
                let pages: Vec<u16> = body[2..]
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                self.erase_pages(pages);
            }
        }
    }

    fn mass_erase(&mut self) {
        self.flash.fill(0xFF);
        self.mass_erases += 1;
        let d = self.erase_ms_per_page * (self.flash.len() / self.page_size) as u64;
        self.reply(&[ACK], d);
    }

    fn erase_pages(&mut self, pages: Vec<u16>) {
        let count = self.flash.len() / self.page_size;
        if pages.iter().any(|&p| usize::from(p) >= count) {
            self.reply(&[NACK], 0);
            return;
        }
        for &p in &pages {
            let s = usize::from(p) * self.page_size;
            self.flash[s..s + self.page_size].fill(0xFF);
        }
        let d = self.erase_ms_per_page * pages.len() as u64;
        self.erased.push(pages);
        self.reply(&[ACK], d);
    }

    /// The flash from the base, `len` bytes.
    pub fn flash_at(&self, address: u32, len: usize) -> &[u8] {
        let off = (address - self.base) as usize;
        &self.flash[off..off + len]
    }
}

impl Default for Sim {
    fn default() -> Self {
        Sim::new()
    }
}

impl Port for Sim {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.written.extend_from_slice(data);
        if self.faults.mute {
            return Ok(());
        }
        if self.faults.sync_nack && data == [SYNC] {
            self.faults.sync_nack = false;
            self.st = St::Cmd;
            self.syncs += 1;
            self.reply(&[NACK], 0);
            return Ok(());
        }
        self.inbuf.extend_from_slice(data);
        self.process();
        Ok(())
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        if self.faults.mute {
            self.out.clear();
        }
        match self.out.front() {
            Some(&(t, _)) if t <= self.now + u64::from(timeout_ms) => {
                self.now = self.now.max(t);
                let mut got = Vec::new();
                while got.len() < max as usize {
                    match self.out.front() {
                        Some(&(t, b)) if t <= self.now => {
                            got.push(b);
                            self.out.pop_front();
                        }
                        _ => break,
                    }
                }
                Ok(got)
            }
            _ => {
                self.now += u64::from(timeout_ms);
                Ok(Vec::new())
            }
        }
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        let n = self.out.iter().filter(|(t, _)| *t <= self.now).count();
        self.out.retain(|(t, _)| *t > self.now);
        Ok(n as u32)
    }

    fn configure(&mut self, config: SerialConfig) -> Result<(), LinkFault> {
        if self.kind != LinkKind::Serial {
            return Err(LinkFault::Unsupported("not a serial link".into()));
        }
        if self.faults.no_parity && config.parity != Parity::None {
            return Err(LinkFault::Unsupported(
                "the port does not keep even parity (pseudo-terminal?)".into(),
            ));
        }
        self.configured.push((config.baud, config.parity));
        Ok(())
    }

    fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkFault> {
        if self.faults.no_lines {
            return Err(LinkFault::Unsupported("no modem lines".into()));
        }
        self.lines.push((self.now, dtr, rts));
        Ok(())
    }

    fn kind(&mut self) -> LinkKind {
        self.kind.clone()
    }

    fn now_ms(&mut self) -> u64 {
        self.now
    }

    fn sleep(&mut self, ms: u32) {
        self.now += u64::from(ms);
    }

    fn progress(&mut self, done: u64, total: u64, phase: Phase) {
        self.progress.push((done, total, phase));
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}
