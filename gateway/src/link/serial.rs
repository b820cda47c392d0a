//! Serial links through tokio-serial: local UARTs, USB adapters, RS-485
//! converters and pseudo-terminals.
//!
//! A pseudo-terminal rejects parity (EINVAL) and has no modem lines (ENOTTY):
//! both come back as refusals that the link reports as "unsupported".

use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

use super::{Parity, SerialConfig, StopBits, Transport};

/// Open `path` at `initial` settings. Parity is applied afterwards through
/// `configure`, so a port that cannot do it still opens.
pub fn open(path: &str, initial: &SerialConfig) -> std::io::Result<SerialStream> {
    let mut port = tokio_serial::new(path, initial.baud)
        .open_native_async()
        .map_err(std::io::Error::from)?;
    // Leaf devices are often shared with a technician's terminal: no TIOCEXCL.
    #[cfg(unix)]
    let _ = port.set_exclusive(false);
    // Data bits and stop bits are best effort here; the plugin's defaults are
    // applied (and refusals reported) before it runs.
    let _ = port.configure(&SerialConfig {
        parity: Parity::None,
        ..*initial
    });
    Ok(port)
}

impl Transport for SerialStream {
    fn configure(&mut self, c: &SerialConfig) -> Result<(), String> {
        let data_bits = match c.data_bits {
            5 => tokio_serial::DataBits::Five,
            6 => tokio_serial::DataBits::Six,
            7 => tokio_serial::DataBits::Seven,
            8 => tokio_serial::DataBits::Eight,
            n => return Err(format!("{n} data bits")),
        };
        let parity = match c.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Odd => tokio_serial::Parity::Odd,
            Parity::Even => tokio_serial::Parity::Even,
        };
        let stop_bits = match c.stop_bits {
            StopBits::One => tokio_serial::StopBits::One,
            StopBits::Two => tokio_serial::StopBits::Two,
        };
        let p = self;
        p.set_baud_rate(c.baud).map_err(|e| e.to_string())?;
        p.set_data_bits(data_bits).map_err(|e| e.to_string())?;
        p.set_stop_bits(stop_bits).map_err(|e| e.to_string())?;
        p.set_parity(parity).map_err(|e| e.to_string())?;
        // Some drivers accept the ioctl and silently keep the old parity
        // (pseudo-terminals among them): read it back.
        match p.parity() {
            Ok(got) if got == parity => Ok(()),
            Ok(got) => Err(format!("the port kept parity {got:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), String> {
        self.write_data_terminal_ready(dtr)
            .map_err(|e| e.to_string())?;
        self.write_request_to_send(rts).map_err(|e| e.to_string())
    }
}
