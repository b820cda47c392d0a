//! The AN3155 USART bootloader protocol, host side: the 0x7F autobaud sync,
//! each command (code and complement, ACK 0x79 / NACK 0x1F), XOR checksums,
//! and the retry loop shared by every operation.
//!
//! What it is not: the flashing plan (which pages, which blocks, in which
//! order): that is [`crate::flash`]. Nothing here knows about images.

use otagw_plugin_sdk::{Error, Inbox, Level, LinkFault, Port};

use crate::options::Settings;

/// Positive answer.
pub const ACK: u8 = 0x79;
/// Negative answer.
pub const NACK: u8 = 0x1F;
/// The autobaud byte that starts a session.
pub const SYNC: u8 = 0x7F;

/// Command codes (AN3155 §3).
pub mod cmd {
    pub const GET: u8 = 0x00;
    pub const GET_VERSION: u8 = 0x01;
    pub const GET_ID: u8 = 0x02;
    pub const READ_MEMORY: u8 = 0x11;
    pub const GO: u8 = 0x21;
    pub const WRITE_MEMORY: u8 = 0x31;
    pub const ERASE: u8 = 0x43;
    pub const EXTENDED_ERASE: u8 = 0x44;
}

/// Longest single block of READ MEMORY and WRITE MEMORY.
pub const MAX_BLOCK: usize = 256;

/// XOR of all bytes.
pub fn xor(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

/// A 4-byte address, MSB first, and its XOR checksum.
pub fn address_frame(address: u32) -> [u8; 5] {
    let a = address.to_be_bytes();
    [a[0], a[1], a[2], a[3], xor(&a)]
}

/// The data frame of WRITE MEMORY: N-1, the data, XOR of both.
pub fn write_frame(data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 2);
    f.push((data.len() - 1) as u8);
    f.extend_from_slice(data);
    f.push(xor(&f));
    f
}

/// The frame of an erase of `pages`: EXTENDED ERASE (2-byte count-1 and page
/// numbers, MSB first) or ERASE (1-byte), each followed by the XOR checksum.
pub fn erase_frame(pages: &[u16], extended: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(3 + pages.len() * 2);
    if extended {
        f.extend_from_slice(&((pages.len() - 1) as u16).to_be_bytes());
        for p in pages {
            f.extend_from_slice(&p.to_be_bytes());
        }
    } else {
        f.push((pages.len() - 1) as u8);
        f.extend(pages.iter().map(|&p| p as u8));
    }
    f.push(xor(&f));
    f
}

/// The frame of a mass erase: the special code 0xFFFF and its checksum
/// (EXTENDED ERASE) or 0xFF 0x00 (ERASE).
pub fn mass_erase_frame(extended: bool) -> Vec<u8> {
    if extended {
        vec![0xFF, 0xFF, 0x00]
    } else {
        vec![0xFF, 0x00]
    }
}

/// Why one attempt of an operation failed.
#[derive(Debug)]
pub enum Fail {
    /// The bootloader answered NACK at this stage.
    Nack(&'static str),
    /// No answer within this many milliseconds.
    Silent(&'static str, u32),
    /// An answer that is neither ACK nor NACK.
    Garbled(&'static str, u8),
    /// Not worth retrying (the link broke).
    Fatal(Error),
}

/// One answer byte.
enum Reply {
    Ack,
    Nack,
    Other(u8),
    Silent,
}

/// A bootloader session over a [`Port`].
pub struct Session<'a, P: Port + ?Sized> {
    pub port: &'a mut P,
    pub settings: &'a Settings,
    /// Attempts beyond the first, over the whole session.
    pub retries: u32,
    rx: Inbox,
}

impl<'a, P: Port + ?Sized> Session<'a, P> {
    pub fn new(port: &'a mut P, settings: &'a Settings) -> Self {
        Session {
            port,
            settings,
            retries: 0,
            rx: Inbox::default(),
        }
    }

    /// Send 0x7F until the bootloader answers: ACK, or NACK when it was
    /// already synced (it takes the 0x7F for a command code). `note` is added
    /// to the timeout message.
    pub fn sync(&mut self, note: &str) -> Result<(), Error> {
        let t = self.settings.timeout_ms;
        let attempts = self.settings.retries + 1;
        for attempt in 0..attempts {
            if attempt > 0 {
                self.drain();
            }
            match self.sync_once()? {
                Some(true) => return Ok(()),
                Some(false) => {
                    self.log(
                        Level::Debug,
                        "sync: NACK to 0x7F, the bootloader was already synced",
                    );
                    return Ok(());
                }
                None => {}
            }
        }
        Err(Error::Timeout(format!(
            "no answer to the 0x7F sync within {t} ms, {attempts} attempts (is the device in its \
             bootloader? check reset_sequence / BOOT0){note}"
        )))
    }

    /// One 0x7F: `Some(true)` ACK, `Some(false)` NACK, `None` nothing useful.
    fn sync_once(&mut self) -> Result<Option<bool>, Error> {
        self.send("sync", &[SYNC])?;
        match self.reply(self.settings.timeout_ms, "sync")? {
            Reply::Ack => Ok(Some(true)),
            Reply::Nack => Ok(Some(false)),
            Reply::Other(b) => {
                self.log(
                    Level::Debug,
                    &format!("sync: unexpected 0x{b:02X} in answer to 0x7F"),
                );
                Ok(None)
            }
            Reply::Silent => Ok(None),
        }
    }

    /// Run `f` up to `retries + 1` times. After a NACK the input is drained;
    /// after a silence or a garbled answer the session is resynced first.
    /// `what` names the operation and its address in the error.
    pub fn attempt<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Self, u32) -> Result<T, Fail>,
    ) -> Result<T, Error> {
        let attempts = self.settings.retries + 1;
        let (mut nacks, mut silent, mut garbled) = (0u32, 0u32, 0u32);
        let mut last = String::new();
        let mut wait = 0;
        for attempt in 0..attempts {
            if attempt > 0 {
                self.retries += 1;
            }
            let more = attempt + 1 < attempts;
            match f(self, attempt) {
                Ok(v) => return Ok(v),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Nack(stage)) => {
                    nacks += 1;
                    last = format!("NACK at the {stage}");
                    self.drain();
                }
                Err(Fail::Silent(stage, ms)) => {
                    silent += 1;
                    wait = ms;
                    last = format!("no answer at the {stage}");
                    if more {
                        self.resync()?;
                    }
                }
                Err(Fail::Garbled(stage, b)) => {
                    garbled += 1;
                    last = format!("0x{b:02X} instead of ACK at the {stage}");
                    if more {
                        self.resync()?;
                    }
                }
            }
            if more {
                self.log(
                    Level::Debug,
                    &format!("{what}: {last}, attempt {} of {attempts}", attempt + 1),
                );
            }
        }
        Err(if nacks == attempts {
            Error::Device(format!("{what}: NACK after {attempts} attempts"))
        } else if silent == attempts {
            Error::Timeout(format!(
                "{what}: no answer within {wait} ms after {attempts} attempts (the device \
                 stopped answering)"
            ))
        } else if nacks > 0 {
            Error::Device(format!(
                "{what}: failed after {attempts} attempts ({nacks} NACK, {silent} without \
                 answer, {garbled} garbled; last: {last})"
            ))
        } else {
            Error::Transfer(format!(
                "{what}: failed after {attempts} attempts ({silent} without answer, {garbled} \
                 garbled; last: {last})"
            ))
        })
    }

    /// After a silence: up to two 0x7F until an ACK or a NACK. A bootloader
    /// waiting for a command takes the pair as a code with a wrong complement
    /// and NACKs; one still inside a command takes them as data and NACKs the
    /// bad checksum. Either way the next attempt starts clean. Failing to
    /// resync is left to the next attempt to report.
    fn resync(&mut self) -> Result<(), Error> {
        self.drain();
        for _ in 0..2 {
            if self.sync_once()?.is_some() {
                self.drain();
                return Ok(());
            }
        }
        self.log(Level::Debug, "resync: no answer to 0x7F 0x7F");
        self.drain();
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Commands: each is one attempt; callers wrap them in `attempt`.

    /// Send a command code and its complement; wait for the ACK.
    pub fn command(&mut self, code: u8) -> Result<(), Fail> {
        self.send_f("command", &[code, !code])?;
        self.expect_ack("command", self.settings.timeout_ms)
    }

    /// GET: the bootloader version and the command codes it supports.
    pub fn get(&mut self) -> Result<(u8, Vec<u8>), Fail> {
        self.command(cmd::GET)?;
        let n = self.bytes(1, "answer")?[0];
        let data = self.bytes(usize::from(n) + 1, "answer")?;
        self.expect_ack("end", self.settings.timeout_ms)?;
        Ok((data[0], data[1..].to_vec()))
    }

    /// GET ID: the product ID.
    pub fn get_id(&mut self) -> Result<u16, Fail> {
        self.command(cmd::GET_ID)?;
        let n = self.bytes(1, "answer")?[0];
        let data = self.bytes(usize::from(n) + 1, "answer")?;
        self.expect_ack("end", self.settings.timeout_ms)?;
        if data.len() < 2 {
            return Err(Fail::Garbled("answer", data[0]));
        }
        Ok(u16::from_be_bytes([data[0], data[1]]))
    }

    /// READ MEMORY of `len` (1..=256) bytes at `address`.
    pub fn read_memory(&mut self, address: u32, len: usize) -> Result<Vec<u8>, Fail> {
        debug_assert!((1..=MAX_BLOCK).contains(&len));
        self.command(cmd::READ_MEMORY)?;
        self.send_f("address", &address_frame(address))?;
        self.expect_ack("address", self.settings.timeout_ms)?;
        let n = (len - 1) as u8;
        self.send_f("length", &[n, !n])?;
        self.expect_ack("length", self.settings.timeout_ms)?;
        self.bytes(len, "data")
    }

    /// WRITE MEMORY of `data` (4..=256 bytes, a multiple of 4) at `address`.
    pub fn write_memory(&mut self, address: u32, data: &[u8]) -> Result<(), Fail> {
        debug_assert!(data.len().is_multiple_of(4) && (4..=MAX_BLOCK).contains(&data.len()));
        self.command(cmd::WRITE_MEMORY)?;
        self.send_f("address", &address_frame(address))?;
        self.expect_ack("address", self.settings.timeout_ms)?;
        self.send_f("data", &write_frame(data))?;
        self.expect_ack("data", self.settings.write_timeout_ms)
    }

    /// ERASE / EXTENDED ERASE of `pages`, or of everything (`None`).
    pub fn erase(&mut self, pages: Option<&[u16]>, extended: bool) -> Result<(), Fail> {
        let code = if extended {
            cmd::EXTENDED_ERASE
        } else {
            cmd::ERASE
        };
        self.command(code)?;
        let frame = match pages {
            Some(p) => erase_frame(p, extended),
            None => mass_erase_frame(extended),
        };
        self.send_f("page list", &frame)?;
        self.expect_ack("page list", self.settings.erase_timeout_ms)
    }

    /// GO to `address`.
    pub fn go(&mut self, address: u32) -> Result<(), Fail> {
        self.command(cmd::GO)?;
        self.send_f("address", &address_frame(address))?;
        self.expect_ack("address", self.settings.timeout_ms)
    }

    // -----------------------------------------------------------------------
    // Bytes.

    fn expect_ack(&mut self, stage: &'static str, timeout_ms: u32) -> Result<(), Fail> {
        match self.reply(timeout_ms, stage).map_err(Fail::Fatal)? {
            Reply::Ack => Ok(()),
            Reply::Nack => Err(Fail::Nack(stage)),
            Reply::Other(b) => Err(Fail::Garbled(stage, b)),
            Reply::Silent => Err(Fail::Silent(stage, timeout_ms)),
        }
    }

    fn reply(&mut self, timeout_ms: u32, stage: &str) -> Result<Reply, Error> {
        let deadline = self.port.now_ms() + u64::from(timeout_ms);
        Ok(match self.next_byte(deadline, stage)? {
            Some(ACK) => Reply::Ack,
            Some(NACK) => Reply::Nack,
            Some(b) => Reply::Other(b),
            None => Reply::Silent,
        })
    }

    /// Exactly `n` bytes within `timeout_ms` (for all of them).
    fn bytes(&mut self, n: usize, stage: &'static str) -> Result<Vec<u8>, Fail> {
        let t = self.settings.timeout_ms;
        let deadline = self.port.now_ms() + u64::from(t);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_byte(deadline, stage).map_err(Fail::Fatal)? {
                Some(b) => out.push(b),
                None => return Err(Fail::Silent(stage, t)),
            }
        }
        Ok(out)
    }

    fn next_byte(&mut self, deadline: u64, stage: &str) -> Result<Option<u8>, Error> {
        self.rx
            .next_byte(self.port, deadline, 512)
            .map_err(|e| Error::Transfer(format!("reading the {stage}: {e}")))
    }

    fn send(&mut self, stage: &str, data: &[u8]) -> Result<(), Error> {
        self.port
            .write(data)
            .map_err(|e| Error::Transfer(format!("sending the {stage}: {e}")))
    }

    fn send_f(&mut self, stage: &str, data: &[u8]) -> Result<(), Fail> {
        self.send(stage, data).map_err(Fail::Fatal)
    }

    /// Throw away stale input (ours and the link's).
    pub fn drain(&mut self) {
        self.rx.clear();
        match self.port.drain() {
            Ok(_) | Err(LinkFault::Unsupported(_)) => {}
            Err(e) => self.log(Level::Debug, &format!("drain: {e}")),
        }
    }

    pub fn log(&mut self, level: Level, message: &str) {
        self.port.log(level, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_checksums() {
        assert_eq!(
            address_frame(0x0800_4100),
            [0x08, 0x00, 0x41, 0x00, 0x08 ^ 0x41]
        );
        assert_eq!(write_frame(&[1, 2, 3, 4]), vec![3, 1, 2, 3, 4, 1 ^ 2 ^ 4]);
        assert_eq!(
            erase_frame(&[0, 1, 2], true),
            vec![
                0x00,
                0x02,
                0x00,
                0x00,
                0x00,
                0x01,
                0x00,
                0x02,
                0x02 ^ 0x01 ^ 0x02
            ]
        );
        assert_eq!(erase_frame(&[0x105], true), vec![0, 0, 1, 5, 1 ^ 5]);
        assert_eq!(erase_frame(&[3, 4], false), vec![1, 3, 4, 1 ^ 3 ^ 4]);
        assert_eq!(mass_erase_frame(true), vec![0xFF, 0xFF, 0x00]);
        assert_eq!(mass_erase_frame(false), vec![0xFF, 0x00]);
    }
}
