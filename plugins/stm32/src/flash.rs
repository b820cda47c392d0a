//! The three operations of the family over a [`Session`]: `verify` (before any
//! device is touched), `flash` (enter, sync, GET / GET ID, erase, write,
//! read back, GO) and `identify` (read a version string from flash).
//!
//! What it is not: byte-level protocol ([`crate::protocol`]) or option parsing
//! ([`crate::options`]).

use otagw_plugin_sdk::{
    DeviceInfo, Error, FlashReport, ImageInfo, Level, LinkFault, LinkKind, Phase, Port,
    SerialConfig, Source,
};

use crate::options::{FLASH_BASE, Layout, LineParity, LineSeq, LineStep, Settings};
use crate::parts::{self, Part};
use crate::protocol::{Fail, MAX_BLOCK, Session, cmd};

/// Pages per erase command, so a big erase reports progress and each command
/// stays well within `erase_timeout_ms`.
const ERASE_BATCH: usize = 32;

/// Bytes actually written for an image of `size` bytes: padded to a multiple of 4.
fn padded(size: u64) -> u64 {
    size.div_ceil(4) * 4
}

/// Checks that need no device: not empty, fits `flash_size` from `address`
/// when that is set, starts with `header_magic` when that is set.
pub fn verify<S: Source + ?Sized>(image: &mut S, s: &Settings) -> Result<ImageInfo, Error> {
    let size = image.size();
    if size == 0 {
        return Err(Error::Verify("the image is empty: nothing to write".into()));
    }
    if let Some(flash) = s.flash_size {
        check_fit(size, s.address, flash, "(flash_size)")?;
    }
    check_header(image, s)?;
    let fit = match s.flash_size {
        Some(f) => format!(" of the {} flash", parts::human(u64::from(f))),
        None => String::new(),
    };
    Ok(ImageInfo {
        version: None,
        payload_size: size,
        summary: format!("{size} bytes for 0x{:08X}{fit}", s.address),
        warnings: Vec::new(),
    })
}

fn check_fit(size: u64, address: u32, flash: u32, whose: &str) -> Result<(), Error> {
    let end = u64::from(address - FLASH_BASE) + padded(size);
    if end > u64::from(flash) {
        return Err(Error::Verify(format!(
            "image of {size} bytes does not fit the {} flash {whose} from 0x{address:08X}",
            parts::human(u64::from(flash))
        )));
    }
    Ok(())
}

fn check_header<S: Source + ?Sized>(image: &mut S, s: &Settings) -> Result<(), Error> {
    let Some(magic) = &s.header_magic else {
        return Ok(());
    };
    let head = image.read(0, magic.len() as u32);
    if head != *magic {
        return Err(Error::Verify(format!(
            "header: the image starts with {}, header_magic expects {}",
            hex(&head),
            hex(magic)
        )));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing".into();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Line settings, reset sequence, sync. Returns the session, synced.
fn enter<'a, P: Port + ?Sized>(port: &'a mut P, s: &'a Settings) -> Result<Session<'a, P>, Error> {
    configure(port, s)?;
    let mut note = String::new();
    if !s.reset_sequence.is_empty() {
        match run_lines(port, &s.reset_sequence, "reset_sequence")? {
            true => {}
            false => {
                note = "; reset_sequence could not be applied: the link has no DTR/RTS".into();
            }
        }
    }
    let mut session = Session::new(port, s);
    session.drain();
    session.sync(&note)?;
    Ok(session)
}

/// 8E1 (or 8N1 with `parity = none`) at `baud` on serial links. On TCP the
/// serial device server owns the line settings.
fn configure<P: Port + ?Sized>(port: &mut P, s: &Settings) -> Result<(), Error> {
    let wanted = match s.parity {
        LineParity::Even => "8E1",
        LineParity::None => "8N1",
    };
    if port.kind() != LinkKind::Serial {
        port.log(
            Level::Info,
            &format!(
                "not a serial link: the serial device server's port must be set to {} {wanted}",
                s.baud
            ),
        );
        return Ok(());
    }
    match port.configure(SerialConfig::eight_bits(s.baud, s.parity.parity())) {
        Ok(()) => Ok(()),
        Err(LinkFault::Unsupported(m)) => match s.parity {
            LineParity::Even => Err(Error::Options(format!(
                "option `parity` = even: the link cannot do even parity ({m}); the STM32 \
                 bootloader needs 8E1 on a real UART; parity = none is only for simulators \
                 on pseudo-terminals"
            ))),
            LineParity::None => {
                port.log(
                    Level::Debug,
                    &format!(
                        "the link refused {} 8N1 ({m}); keeping its settings",
                        s.baud
                    ),
                );
                Ok(())
            }
        },
        Err(e) => Err(Error::Transfer(format!(
            "setting the line to {} {wanted}: {e}",
            s.baud
        ))),
    }
}

/// Run a DTR/RTS sequence. `Ok(false)` when the link has no modem lines (the
/// rest of the sequence is skipped, with a warning).
fn run_lines<P: Port + ?Sized>(port: &mut P, seq: &LineSeq, name: &str) -> Result<bool, Error> {
    for step in &seq.steps {
        match *step {
            LineStep::Set { dtr, rts } => match port.set_lines(dtr, rts) {
                Ok(()) => {}
                Err(LinkFault::Unsupported(m)) => {
                    port.log(
                        Level::Warn,
                        &format!("{name}: the link has no DTR/RTS ({m}); sequence skipped"),
                    );
                    return Ok(false);
                }
                Err(e) => {
                    return Err(Error::Transfer(format!("{name}: setting DTR/RTS: {e}")));
                }
            },
            LineStep::Sleep(ms) => port.sleep(ms),
        }
    }
    Ok(true)
}

/// What the bootloader said about itself.
struct Target {
    version: u8,
    commands: Vec<u8>,
    pid: Option<u16>,
}

impl Target {
    fn has(&self, code: u8) -> bool {
        self.commands.contains(&code)
    }

    fn require(&self, code: u8, name: &str) -> Result<(), Error> {
        if self.has(code) {
            Ok(())
        } else {
            Err(Error::Device(format!(
                "the bootloader does not offer {name} (0x{code:02X}); it lists {}",
                hex(&self.commands)
            )))
        }
    }

    fn part(&self) -> Option<&'static Part> {
        self.pid.and_then(parts::lookup)
    }

    fn pid_text(&self) -> String {
        match self.pid {
            Some(p) => format!("PID 0x{p:03X}"),
            None => "an unknown PID".into(),
        }
    }
}

fn discover<P: Port + ?Sized>(session: &mut Session<'_, P>) -> Result<Target, Error> {
    let (version, commands) = session.attempt("GET (0x00)", |s, _| s.get())?;
    let mut t = Target {
        version,
        commands,
        pid: None,
    };
    if t.has(cmd::GET_ID) {
        t.pid = Some(session.attempt("GET ID (0x02)", |s, _| s.get_id())?);
    }
    let part = t
        .part()
        .map(|p| format!(" ({})", p.name))
        .unwrap_or_default();
    let msg = format!(
        "bootloader v{}.{}, {}{part}, commands {}",
        t.version >> 4,
        t.version & 0xF,
        t.pid_text(),
        hex(&t.commands)
    );
    session.log(Level::Info, &msg);
    Ok(t)
}

/// Flash the image: enter, sync, learn the part, erase, write, read back, GO.
pub fn flash<P: Port + ?Sized, S: Source + ?Sized>(
    port: &mut P,
    image: &mut S,
    s: &Settings,
) -> Result<FlashReport, Error> {
    let size = image.size();
    if size == 0 {
        return Err(Error::Verify("the image is empty: nothing to write".into()));
    }
    check_header(image, s)?;
    let mut session = enter(port, s)?;
    let target = discover(&mut session)?;

    // Fit.
    let flash_size = match (s.flash_size, target.part()) {
        (Some(f), _) => Some((f, "(flash_size)".to_string())),
        (None, Some(p)) => Some((p.flash_size, format!("of {}", target.pid_text()))),
        (None, None) => {
            session.log(
                Level::Info,
                &format!(
                    "flash size of {} unknown (set flash_size): no fit check",
                    target.pid_text()
                ),
            );
            None
        }
    };
    if let Some((f, whose)) = &flash_size {
        check_fit(size, s.address, *f, whose)?;
    }

    target.require(cmd::WRITE_MEMORY, "WRITE MEMORY")?;
    if s.verify_readback {
        target.require(cmd::READ_MEMORY, "READ MEMORY (needed by verify_readback)")?;
    }
    if s.go {
        target.require(cmd::GO, "GO")?;
    }
    let extended = if target.has(cmd::EXTENDED_ERASE) {
        true
    } else if target.has(cmd::ERASE) {
        false
    } else {
        return Err(Error::Device(format!(
            "the bootloader offers neither ERASE (0x43) nor EXTENDED ERASE (0x44); it lists {}",
            hex(&target.commands)
        )));
    };

    // Erase.
    let written = padded(size);
    let layout = match (&s.page_size, target.part()) {
        (Some(l), _) => l.clone(),
        (None, Some(p)) => Layout::parse(p.layout)
            .map_err(|why| Error::Other(format!("the part table's layout of {}: {why}", p.name)))?,
        (None, None) => Layout::uniform(2048),
    };
    erase(&mut session, s, &layout, written, extended)?;

    // Write.
    let total = size;
    let mut done = 0u64;
    session.port.progress(0, total, Phase::Transfer);
    while done < size {
        let len = (size - done).min(MAX_BLOCK as u64) as usize;
        let mut block = image.read_exact(done, len)?;
        block.resize(block.len().div_ceil(4) * 4, 0xFF);
        let address = s.address + done as u32;
        let readable = target.has(cmd::READ_MEMORY);
        // After a lost answer to the data the block may be in flash already,
        // and NOR flash refuses to be written twice: read it back first.
        let mut maybe_written = false;
        session.attempt(&format!("write memory at 0x{address:08X}"), |sess, _| {
            if maybe_written && readable {
                match sess.read_memory(address, block.len()) {
                    Ok(got) if got == block => return Ok(()),
                    Ok(_) => {}
                    Err(f) => return Err(f),
                }
            }
            let r = sess.write_memory(address, &block);
            if let Err(Fail::Silent("data", _) | Fail::Garbled("data", _)) = &r {
                maybe_written = true;
            }
            r
        })?;
        done += len as u64;
        session.port.progress(done, total, Phase::Transfer);
    }

    // Read back.
    if s.verify_readback {
        readback(&mut session, image, s, size)?;
    }

    // Leave.
    let mut how = String::from("left in the bootloader (go = false)");
    if s.go {
        session.attempt(&format!("GO (0x21) to 0x{:08X}", s.address), |sess, _| {
            sess.go(s.address)
        })?;
        how = format!("started at 0x{:08X}", s.address);
    }
    let retries = session.retries;
    if !s.run_sequence.is_empty() {
        run_lines(session.port, &s.run_sequence, "run_sequence")?;
    }
    session.port.progress(1, 1, Phase::Finish);
    let verified = if s.verify_readback { ", read back" } else { "" };
    Ok(FlashReport {
        bytes_sent: size,
        retries,
        summary: format!(
            "{size} bytes at 0x{:08X} on {} ({} erase, {}){verified}, {how}, {retries} retries",
            s.address,
            target.pid_text(),
            if s.mass_erase {
                "mass".to_string()
            } else {
                layout.describe()
            },
            if extended { "extended" } else { "standard" },
        ),
    })
}

fn erase<P: Port + ?Sized>(
    session: &mut Session<'_, P>,
    s: &Settings,
    layout: &Layout,
    written: u64,
    extended: bool,
) -> Result<(), Error> {
    let name = if extended {
        "extended erase (0x44)"
    } else {
        "erase (0x43)"
    };
    if s.mass_erase {
        session.port.progress(0, 1, Phase::Erase);
        session.attempt(&format!("{name} of the whole flash"), |sess, _| {
            sess.erase(None, extended)
        })?;
        session.port.progress(1, 1, Phase::Erase);
        return Ok(());
    }
    let from = u64::from(s.address - FLASH_BASE);
    let pages = layout.pages(from, from + written);
    if let Some(&(_, start, _)) = pages.first()
        && start < from
    {
        session.log(
            Level::Warn,
            &format!(
                "address 0x{:08X} is not at a page start: erasing from 0x{:08X}",
                s.address,
                u64::from(FLASH_BASE) + start
            ),
        );
    }
    let limit = if extended { 0xFFEF } else { 0xFF };
    let numbers: Vec<u16> = pages
        .iter()
        .map(|&(i, _, _)| {
            if i > limit {
                Err(Error::Options(format!(
                    "option `page_size`: the image reaches page {i}, which {name} cannot \
                     name (at most {limit}); check page_size or use mass_erase"
                )))
            } else {
                Ok(i as u16)
            }
        })
        .collect::<Result<_, _>>()?;
    let total = numbers.len() as u64;
    session.port.progress(0, total, Phase::Erase);
    let mut done = 0u64;
    for batch in numbers.chunks(ERASE_BATCH) {
        let what = if batch.len() == 1 {
            format!("{name} of page {}", batch[0])
        } else {
            format!("{name} of pages {}..{}", batch[0], batch[batch.len() - 1])
        };
        session.attempt(&what, |sess, _| sess.erase(Some(batch), extended))?;
        done += batch.len() as u64;
        session.port.progress(done, total, Phase::Erase);
    }
    Ok(())
}

fn readback<P: Port + ?Sized, S: Source + ?Sized>(
    session: &mut Session<'_, P>,
    image: &mut S,
    s: &Settings,
    size: u64,
) -> Result<(), Error> {
    let mut done = 0u64;
    session.port.progress(0, size, Phase::Verify);
    while done < size {
        let len = (size - done).min(MAX_BLOCK as u64) as usize;
        let want = image.read_exact(done, len)?;
        let address = s.address + done as u32;
        let got = session.attempt(&format!("read memory at 0x{address:08X}"), |sess, _| {
            sess.read_memory(address, len)
        })?;
        if let Some(i) = (0..len).find(|&i| got[i] != want[i]) {
            return Err(Error::Device(format!(
                "read-back mismatch at 0x{:08X}: the flash holds 0x{:02X}, the image 0x{:02X}",
                address + i as u32,
                got[i],
                want[i]
            )));
        }
        done += len as u64;
        session.port.progress(done, size, Phase::Verify);
    }
    Ok(())
}

/// Enter the bootloader, read the version string at `version_address`, leave
/// (GO and `run_sequence`). Also what the bootloader tells, one try each:
/// the part (GET ID: the model, and the product ID as `hardware_id`, e.g.
/// `0x413`) and its own version (GET: the attribute `bootloader_version`,
/// e.g. `3.1`).
pub fn identify<P: Port + ?Sized>(port: &mut P, s: &Settings) -> Result<DeviceInfo, Error> {
    let Some(address) = s.version_address else {
        return Err(Error::Unsupported(
            "stm32: set version_address (and version_length) to read the version from flash".into(),
        ));
    };
    let mut session = enter(port, s)?;
    let mut info = DeviceInfo::default();
    match session.get() {
        Ok((v, _)) => info.attributes.push((
            "bootloader_version".to_string(),
            format!("{}.{}", v >> 4, v & 0xF),
        )),
        Err(_) => session.drain(),
    }
    match session.get_id() {
        Ok(pid) => {
            info.model = Some(match parts::lookup(pid) {
                Some(p) => format!("{} (PID 0x{pid:03X})", p.name),
                None => format!("STM32 PID 0x{pid:03X}"),
            });
            info.hardware_id = Some(format!("0x{pid:03X}"));
        }
        Err(_) => session.drain(),
    }
    let len = s.version_length as usize;
    let raw = session.attempt(&format!("read memory at 0x{address:08X}"), |sess, _| {
        sess.read_memory(address, len)
    })?;
    let end = raw
        .iter()
        .position(|&b| b == 0 || b == 0xFF)
        .unwrap_or(raw.len());
    info.version = String::from_utf8_lossy(&raw[..end]).trim().to_string();
    if s.go
        && let Err(e) = session.attempt(&format!("GO (0x21) to 0x{:08X}", s.address), |sess, _| {
            sess.go(s.address)
        })
    {
        session.log(
            Level::Warn,
            &format!("identify: leaving the bootloader: {e}"),
        );
    }
    if !s.run_sequence.is_empty() {
        run_lines(session.port, &s.run_sequence, "run_sequence")?;
    }
    if info.version.is_empty() {
        return Err(Error::Device(format!(
            "identify: no version string at 0x{address:08X}: read {len} bytes starting {}",
            hex(&raw[..raw.len().min(8)])
        )));
    }
    Ok(info)
}

#[cfg(test)]
mod tests;
