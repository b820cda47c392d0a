//! `otagw-leaf-sim`: simulated leaf devices for tests and demos of the otagw gateway.
//!
//! A simulator is a real protocol peer, byte for byte, reached over a real pseudo-terminal or a
//! TCP port; it is not a mock of the gateway's link layer and it never talks to the gateway's
//! code directly. It plays the device side of XMODEM / XMODEM-1K / YMODEM, and an MCUmgr SMP
//! device (serial transport, or raw SMP packets for a Bluetooth LE peripheral in front of it)
//! with MCUboot behind it, and the STM32 ROM bootloader's UART protocol (AN3155).
//!
//! # Layout
//! - [`xmodem`]: the device: settings, faults, what tests observe ([`xmodem::SimHandle`]) and the
//!   session logic, generic over `AsyncRead + AsyncWrite`.
//!   - `xmodem/frame.rs`: pure framing helpers (CRC-16, checksum, block 0, `FWVER:` marker).
//!   - `xmodem/device.rs`: application mode and the receiver's rules.
//! - [`smp`]: the SMP device: settings, faults, what tests observe ([`smp::SmpHandle`]) and
//!   the session loop.
//!   - `smp/frame.rs`: SMP header, console framing (base64, CRC-16, 127-byte frames) and the
//!     reassembly of raw packets (the Bluetooth LE form) by the header's length.
//!   - `smp/mcuboot.rs`: the MCUboot image format (parse and check, build).
//!   - `smp/device.rs`: command handlers and the slot model (swap, test, confirm, revert).
//! - [`stm32`]: the STM32 ROM bootloader: settings, faults, what tests observe
//!   ([`stm32::Stm32Handle`]) and the session loop.
//!   - `stm32/bootloader.rs`: the AN3155 command interpreter (sans-I/O).
//!   - `stm32/memory.rs`: the memory map: NOR flash, RAM, system memory, option bytes.
//! - [`transport`]: [`PtySim`] and [`TcpSim`], which run a [`transport::Device`] (either
//!   kind) on a pty or a TCP port.
//! - `main.rs`: the `leaf-sim` binary.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use otagw_leaf_sim::{PtySim, XmodemSimConfig};
//! let sim = PtySim::spawn(XmodemSimConfig::default())?;
//! println!("gateway link: {}", sim.url());
//! let image = sim.handle().next_image().await;
//! println!("got {} bytes", image.data.len());
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

pub(crate) mod pace;
pub mod smp;
pub mod stm32;
pub mod transport;
pub mod xmodem;

pub use smp::{SmpEvent, SmpFaults, SmpFraming, SmpHandle, SmpSimConfig};
pub use stm32::{EraseCommand, Stm32Event, Stm32Faults, Stm32Handle, Stm32SimConfig};
pub use transport::{Device, PtySim, TcpSim};
pub use xmodem::{Faults, Mode, Protocol, Received, SimHandle, XmodemSimConfig};
