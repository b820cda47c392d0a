//! The simulated STM32 ROM bootloader on the device side of a UART (ST AN3155): its settings
//! ([`Stm32SimConfig`], [`Stm32Faults`]), what tests observe ([`Stm32Handle`],
//! [`Stm32Event`], [`Stm32Counters`]) and the session loop ([`serve`]) over any
//! `AsyncRead + AsyncWrite` link.
//!
//! It is the DEVICE side only: a part reset with BOOT0 high, waiting for the host's 0x7F. It
//! opens no links itself (see [`crate::transport`]) and knows nothing of the gateway.
//!
//! - `bootloader.rs`: the command interpreter, sans-I/O (bytes in, answers out).
//! - `memory.rs`: the memory map: NOR flash at 0x0800_0000, RAM at 0x2000_0000, system memory
//!   and option bytes (read only).
//!
//! # Serial settings
//! The real bootloader runs at 8E1 (even parity) with autobaud. A pseudo-terminal cannot do
//! parity (setting it fails with EINVAL), so on a pty the simulator simply exchanges bytes:
//! hosts must open it at 8N1 (e.g. stm32loader `--parity none`). The baud rate is not
//! checked; [`Stm32SimConfig::line_rate`] can make answers as slow as a real 8E1 wire (11
//! bits a byte).
//!
//! # Commands (AN3155)
//! - Sync: before it, any byte other than 0x7F is ignored (autobaud sees garbage); 0x7F →
//!   ACK (0x79).
//! - GET (0x00 0xFF) → ACK, N (= number of commands), bootloader version, the commands this
//!   part implements (0x00 0x01 0x02 0x11 0x21 0x31 and 0x43 or 0x44), ACK. The read/write
//!   protection commands are not implemented, so they are not listed (and are NACKed).
//! - GET VERSION (0x01 0xFE) → ACK, version, the two configured option bytes, ACK.
//! - GET ID (0x02 0xFD) → ACK, 1, PID (big endian), ACK.
//! - READ MEMORY (0x11 0xEE) → ACK; address (4, big endian) + XOR → ACK; N + !N → ACK and
//!   N+1 bytes. The address must be mapped (flash, RAM, system memory, option bytes), the
//!   whole range in one region (else NACK after N).
//! - WRITE MEMORY (0x31 0xCE) → ACK; address + XOR → ACK when it is in flash (4-byte aligned)
//!   or in RAM above the bootloader's first `ram_reserved` bytes (else NACK); N, N+1 bytes,
//!   XOR of N and the bytes → ACK when written. Flash is NOR: a byte that needs a 0 → 1 bit
//!   change is refused (NACK); bytes are programmed in order and those before the refused one
//!   stay programmed. A length that is not a multiple of 4 is accepted: the last word is
//!   padded with 0xFF, which leaves those cells unchanged (tools such as stm32loader pad
//!   themselves; AN3155 asks the host for a multiple of 4).
//! - ERASE (0x43 0xBC) on a part configured with [`EraseCommand::Standard`]: N then N+1 page
//!   numbers (1 byte each) then XOR of all → ACK after `erase_time` × pages; 0xFF 0x00 is the
//!   global erase. EXTENDED ERASE (0x44 0xBB) on a part with [`EraseCommand::Extended`]: N (2
//!   bytes) then N+1 page numbers (2 bytes each) then XOR of all; or a special code and its
//!   XOR checksum: 0xFFFF mass erase, 0xFFFE bank 1, 0xFFFD bank 2 (NACK unless `dual_bank`),
//!   other 0xFFFx codes NACK. The other erase command is NACKed. A page that does not exist
//!   NACKs the whole command (nothing erased). A mass erase takes `erase_time` × all pages.
//! - GO (0x21 0xDE) → ACK; address + XOR → ACK when it is in flash or RAM, and the
//!   "application" runs: the part leaves the bootloader and ignores every byte until
//!   [`Stm32Handle::reset`].
//! - A wrong complement, an unknown command and any wrong checksum → NACK (0x1F) and the part
//!   waits for the next command.
//! - After the sync, 0x7F is an ordinary command byte, as on real parts: a second 0x7F gets
//!   no answer until the next byte arrives, which completes a command pair whose complement
//!   is wrong → NACK. (Hosts that re-sync see "nothing, then NACK".)
//! - There is no inter-byte timeout: a command cut in half waits for the rest (a new TCP
//!   session drops it).

mod bootloader;
pub mod memory;

use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use bootloader::Bootloader;
pub use bootloader::{ACK, NACK, SYNC, cmd};
pub use memory::{FLASH_BASE, MemError, RAM_BASE, Region};

use crate::transport::SessionEnd;

/// Which erase command the part implements (the other one is NACKed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EraseCommand {
    /// ERASE (0x43): one-byte page numbers (bootloader versions below 3.0, e.g. STM32F1).
    #[default]
    Standard,
    /// EXTENDED ERASE (0x44): two-byte page numbers (bootloader 3.0 and later).
    Extended,
}

/// Faults to inject. Each names a 1-based number k counted over the device's life and fires
/// once in that life, so a retry succeeds; the silence, once it starts, lasts for ever.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stm32Faults {
    /// The k-th WRITE MEMORY whose data arrived intact is NACKed after its checksum; nothing is
    /// written.
    pub nack_write: Option<u32>,
    /// The k-th command (any command pair after the sync, valid or not) is answered, then the
    /// part never sends another byte.
    pub silent_after: Option<u32>,
    /// One byte (the middle one) of the k-th READ MEMORY answer is inverted; flash is intact.
    pub corrupt_read: Option<u32>,
}

/// A malformed fault specification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Stm32FaultParseError {
    /// An unknown fault name.
    #[error("fault `{0}`: unknown (nack-write=K, silent=K, corrupt-read=K)")]
    Unknown(String),
    /// A number that does not parse, or 0, or a missing one.
    #[error("fault `{0}`: expected a number from 1")]
    Number(String),
}

impl Stm32Faults {
    /// Adds one fault: `nack-write=K`, `silent=K` (or `silent-after=K`), `corrupt-read=K`
    /// (`_` works as `-`).
    pub fn add(&mut self, spec: &str) -> Result<(), Stm32FaultParseError> {
        let (name, value) = spec.split_once('=').unwrap_or((spec, ""));
        let k = match value.trim().parse::<u32>() {
            Ok(k) if k > 0 => Some(k),
            _ => return Err(Stm32FaultParseError::Number(spec.to_owned())),
        };
        match name.trim().replace('_', "-").as_str() {
            "nack-write" => self.nack_write = k,
            "silent" | "silent-after" => self.silent_after = k,
            "corrupt-read" => self.corrupt_read = k,
            _ => return Err(Stm32FaultParseError::Unknown(spec.to_owned())),
        }
        Ok(())
    }
}

impl FromStr for Stm32Faults {
    type Err = Stm32FaultParseError;

    /// A comma-separated list (see [`Stm32Faults::add`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut faults = Self::default();
        for spec in s.split(',').filter(|p| !p.trim().is_empty()) {
            faults.add(spec)?;
        }
        Ok(faults)
    }
}

/// Settings of one simulated part. The default is an STM32F1 medium-density-like part: PID
/// 0x410, bootloader 2.2, standard erase, 128 KiB flash in 2 KiB pages.
#[derive(Clone, Debug)]
pub struct Stm32SimConfig {
    /// Product ID answered by GET ID.
    pub pid: u16,
    /// Bootloader version (0x22 = 2.2) answered by GET and GET VERSION.
    pub bootloader_version: u8,
    /// The two option bytes GET VERSION answers.
    pub option_bytes: [u8; 2],
    /// Which erase command the part implements.
    pub erase: EraseCommand,
    /// Flash size in bytes, a multiple of `page_size`.
    pub flash_size: usize,
    /// Flash page size in bytes.
    pub page_size: usize,
    /// Two banks (each half of flash) for the bank erase codes of EXTENDED ERASE.
    pub dual_bank: bool,
    /// Flash contents at power-up, from 0x0800_0000 (the rest erased).
    pub initial_flash: Option<Vec<u8>>,
    /// RAM size in bytes.
    pub ram_size: usize,
    /// The first RAM bytes the bootloader uses itself: writes there are NACKed.
    pub ram_reserved: usize,
    /// System memory (read only; F1: 0x1FFF_F000, 2 KiB). Where the F1 signature addresses
    /// (0x1FFF_F7E0 flash size in KiB, 0x1FFF_F7E8 unique ID) fall inside, they hold those.
    pub system_base: u32,
    /// System memory size in bytes.
    pub system_size: usize,
    /// Option bytes (read only; F1: 0x1FFF_F800, 16 bytes, level 0).
    pub option_base: u32,
    /// Option bytes size.
    pub option_size: usize,
    /// Time to erase one page (the ACK of an erase comes this much per page later).
    pub erase_time: Duration,
    /// Simulated line rate (bits per second, 11 bits a byte as at 8E1): each answer waits as
    /// long as the bytes before it and itself take on such a wire.
    pub line_rate: Option<u32>,
    /// Faults to inject.
    pub faults: Stm32Faults,
}

impl Default for Stm32SimConfig {
    fn default() -> Self {
        Self {
            pid: 0x410,
            bootloader_version: 0x22,
            option_bytes: [0, 0],
            erase: EraseCommand::Standard,
            flash_size: 128 * 1024,
            page_size: 2048,
            dual_bank: false,
            initial_flash: None,
            ram_size: 20 * 1024,
            ram_reserved: 0x200,
            system_base: 0x1FFF_F000,
            system_size: 0x800,
            option_base: 0x1FFF_F800,
            option_size: 16,
            erase_time: Duration::from_millis(1),
            line_rate: None,
            faults: Stm32Faults::default(),
        }
    }
}

/// An invalid [`Stm32SimConfig`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Stm32ConfigError {
    /// Flash size or page size zero, or not a multiple of the page size.
    #[error("flash of {flash} bytes is not a whole number of {page}-byte pages")]
    Geometry {
        /// Flash size.
        flash: usize,
        /// Page size.
        page: usize,
    },
    /// More pages than the erase command can name.
    #[error("{0} pages: more than the erase command can address")]
    TooManyPages(usize),
    /// A dual-bank part needs an even number of pages.
    #[error("dual bank with an odd number of pages ({0})")]
    OddBanks(usize),
    /// The initial flash image is larger than flash.
    #[error("initial flash of {0} bytes is larger than flash")]
    InitialFlash(usize),
    /// Flash would overlap another region or run past 4 GiB.
    #[error("flash of {0} bytes overlaps another region")]
    Overlap(usize),
}

impl Stm32SimConfig {
    fn validate(&self) -> Result<(), Stm32ConfigError> {
        let (flash, page) = (self.flash_size, self.page_size);
        if flash == 0 || page == 0 || !flash.is_multiple_of(page) {
            return Err(Stm32ConfigError::Geometry { flash, page });
        }
        let pages = flash / page;
        let max = match self.erase {
            EraseCommand::Standard => 256,
            EraseCommand::Extended => 0xFFF0,
        };
        if pages > max {
            return Err(Stm32ConfigError::TooManyPages(pages));
        }
        if self.dual_bank && !pages.is_multiple_of(2) {
            return Err(Stm32ConfigError::OddBanks(pages));
        }
        if let Some(init) = &self.initial_flash
            && init.len() > flash
        {
            return Err(Stm32ConfigError::InitialFlash(init.len()));
        }
        if flash > (0x1000_0000 - FLASH_BASE) as usize {
            return Err(Stm32ConfigError::Overlap(flash));
        }
        Ok(())
    }
}

/// What an erase erased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EraseKind {
    /// These pages (numbers from 0 at 0x0800_0000).
    Pages(Vec<u32>),
    /// All of flash (global / mass erase).
    Mass,
    /// One bank (1 or 2).
    Bank(u8),
}

/// Something the part did, in order. Queued without limit; [`Stm32Handle::next_event`] takes
/// them one by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stm32Event {
    /// 0x7F arrived before any command: ACKed.
    Synced,
    /// A command pair with a valid complement arrived (before it is handled).
    Command {
        /// The command code.
        code: u8,
    },
    /// The part answered NACK.
    Nack {
        /// The command in progress (None when the command pair itself was bad).
        command: Option<u8>,
        /// Why.
        reason: String,
    },
    /// A READ MEMORY was answered.
    Read {
        /// Start address.
        address: u32,
        /// Bytes.
        len: usize,
    },
    /// A WRITE MEMORY was carried out.
    Written {
        /// Start address.
        address: u32,
        /// Bytes the host sent.
        len: usize,
    },
    /// An erase was carried out (the ACK follows after the erase time).
    Erased(EraseKind),
    /// GO: the application runs from `address`.
    Go {
        /// The jump address.
        address: u32,
    },
    /// [`Stm32Handle::reset`] was called.
    Reset,
    /// A fault fired.
    Fault(String),
}

/// Counters over the device's life.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stm32Counters {
    /// Syncs ACKed.
    pub syncs: u64,
    /// Command pairs received after a sync (valid or not).
    pub commands: u64,
    /// NACKs sent.
    pub nacks: u64,
    /// WRITE MEMORY commands carried out.
    pub writes: u64,
    /// Bytes they carried.
    pub write_bytes: u64,
    /// Erase commands carried out (page lists, mass and bank erases).
    pub erases: u64,
    /// Pages they erased.
    pub pages_erased: u64,
    /// Mass (global) erases among them.
    pub mass_erases: u64,
    /// READ MEMORY commands answered.
    pub reads: u64,
    /// Bytes they returned.
    pub read_bytes: u64,
    /// The address of the last GO.
    pub go_address: Option<u32>,
}

/// What the part is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stm32Mode {
    /// In the ROM bootloader; `synced` once 0x7F was ACKed.
    Bootloader {
        /// Whether the sync happened.
        synced: bool,
    },
    /// GO was carried out: the application runs and the bootloader hears nothing.
    Application {
        /// Where it jumped.
        address: u32,
    },
    /// The `silent_after` fault fired.
    Silent,
}

/// What tests and the binary observe of a simulated STM32. Cheap to clone; all clones share
/// one device.
#[derive(Clone, Debug)]
pub struct Stm32Handle {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Stm32SimConfig,
    state: Mutex<Bootloader>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Stm32Event>>,
}

impl Stm32Handle {
    /// A part fresh out of reset into its bootloader.
    pub fn new(config: Stm32SimConfig) -> Result<Self, Stm32ConfigError> {
        config.validate()?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Self {
            inner: Arc::new(Shared {
                state: Mutex::new(Bootloader::new(config.clone(), tx)),
                config,
                events: tokio::sync::Mutex::new(rx),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, Bootloader> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's settings.
    pub fn config(&self) -> &Stm32SimConfig {
        &self.inner.config
    }

    /// The flash contents (from 0x0800_0000).
    pub fn flash(&self) -> Vec<u8> {
        self.state().memory().flash().to_vec()
    }

    /// The RAM contents (from 0x2000_0000).
    pub fn ram(&self) -> Vec<u8> {
        self.state().memory().ram().to_vec()
    }

    /// The counters.
    pub fn counters(&self) -> Stm32Counters {
        self.state().counters().clone()
    }

    /// WRITE MEMORY commands carried out.
    pub fn writes(&self) -> u64 {
        self.state().counters().writes
    }

    /// Erase commands carried out.
    pub fn erases(&self) -> u64 {
        self.state().counters().erases
    }

    /// READ MEMORY commands answered.
    pub fn reads(&self) -> u64 {
        self.state().counters().reads
    }

    /// The address of the last GO.
    pub fn go_address(&self) -> Option<u32> {
        self.state().counters().go_address
    }

    /// What the part is doing.
    pub fn mode(&self) -> Stm32Mode {
        self.state().mode()
    }

    /// Resets the part with BOOT0 high (what a host does with its reset lines): back in the
    /// bootloader, waiting for 0x7F; memories kept. A silenced part stays silent.
    pub fn reset(&self) {
        self.state().reset();
    }

    /// Waits for the next event (queued, none is lost).
    pub async fn next_event(&self) -> Stm32Event {
        match self.inner.events.lock().await.recv().await {
            Some(e) => e,
            // Unreachable: the state holds a sender.
            None => std::future::pending().await,
        }
    }
}

/// Runs the part on `io` until the link closes or `cancel` fires. The part's state lives in
/// `device` and outlives the session.
pub async fn serve<S>(device: &Stm32Handle, mut io: S, cancel: &CancellationToken) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    device.state().new_session();
    let rate = device.config().line_rate.filter(|&b| b > 0);
    let mut buf = vec![0u8; 4096];
    // Bytes heard since the last answer (for the line rate).
    let mut heard = 0u64;
    loop {
        let n = tokio::select! {
            biased;
            () = cancel.cancelled() => return SessionEnd::Shutdown,
            r = io.read(&mut buf) => match r {
                Ok(0) => return SessionEnd::PeerClosed,
                Ok(n) => n,
                Err(e) => return SessionEnd::LinkError(e),
            },
        };
        for &byte in &buf[..n] {
            heard += 1;
            let Some(out) = device.state().push(byte) else {
                continue;
            };
            let mut wait = out.busy;
            if let Some(bps) = rate {
                let bits = (heard + out.reply.len() as u64) * 11;
                wait += Duration::from_micros(bits * 1_000_000 / u64::from(bps));
            }
            heard = 0;
            let send = async {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                io.write_all(&out.reply).await?;
                io.flush().await
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => return SessionEnd::Shutdown,
                r = send => if let Err(e) = r {
                    return SessionEnd::LinkError(e);
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        let f: Stm32Faults = "nack-write=3, silent=7,corrupt_read=2".parse().unwrap();
        assert_eq!(
            f,
            Stm32Faults {
                nack_write: Some(3),
                silent_after: Some(7),
                corrupt_read: Some(2),
            }
        );
        assert!(matches!(
            "silent".parse::<Stm32Faults>(),
            Err(Stm32FaultParseError::Number(_))
        ));
        assert!(matches!(
            "drop=1".parse::<Stm32Faults>(),
            Err(Stm32FaultParseError::Unknown(_))
        ));
    }

    #[test]
    fn config_is_checked() {
        assert!(Stm32Handle::new(Stm32SimConfig::default()).is_ok());
        let bad = |cfg: Stm32SimConfig| Stm32Handle::new(cfg).unwrap_err();
        assert!(matches!(
            bad(Stm32SimConfig {
                page_size: 3000,
                ..Stm32SimConfig::default()
            }),
            Stm32ConfigError::Geometry { .. }
        ));
        assert_eq!(
            bad(Stm32SimConfig {
                flash_size: 1024 * 1024,
                page_size: 1024,
                ..Stm32SimConfig::default()
            }),
            Stm32ConfigError::TooManyPages(1024)
        );
    }
}
