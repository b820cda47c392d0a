//! `otagw-leaf-sim`: simulated leaf devices for tests and demos of the otagw gateway.
//!
//! A simulator is a real protocol peer, byte for byte, reached over a real pseudo-terminal or a
//! TCP port; it is not a mock of the gateway's link layer and it never talks to the gateway's
//! code directly. Today it plays the device side of XMODEM / XMODEM-1K / YMODEM.
//!
//! # Layout
//! - [`xmodem`]: the device: settings, faults, what tests observe ([`xmodem::SimHandle`]) and the
//!   session logic, generic over `AsyncRead + AsyncWrite`.
//!   - `xmodem/frame.rs`: pure framing helpers (CRC-16, checksum, block 0, `FWVER:` marker).
//!   - `xmodem/device.rs`: application mode and the receiver's rules.
//! - [`transport`]: [`PtySim`] and [`TcpSim`], which run a device on a pty or a TCP port.
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

pub mod transport;
pub mod xmodem;

pub use transport::{PtySim, TcpSim};
pub use xmodem::{Faults, Mode, Protocol, Received, SimHandle, XmodemSimConfig};
