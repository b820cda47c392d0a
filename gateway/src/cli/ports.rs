//! `otagw ports`: the serial ports of this machine, to find the one a leaf
//! is on (as `probe-rs list` and `esptool` do): the path to write in a
//! link, the USB adapter's vendor, product and serial number where the
//! kernel knows them, and the stable `/dev/serial/by-id` name that points at
//! it (it survives replugging; ttyUSB numbers do not).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct PortsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    pub path: String,
    /// "usb", "pci", "bluetooth" or "other".
    pub kind: String,
    /// `vvvv:pppp`, for USB adapters.
    pub usb_id: Option<String>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub serial_number: Option<String>,
    /// The `/dev/serial/by-id` links to it.
    pub by_id: Vec<String>,
}

/// The links in `dir` (normally `/dev/serial/by-id`), by what they point at.
fn links(dir: &Path) -> BTreeMap<PathBuf, Vec<String>> {
    let mut out: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if let Ok(target) = std::fs::canonicalize(e.path()) {
            out.entry(target)
                .or_default()
                .push(e.path().display().to_string());
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// The serial ports the system lists, with their by-id links.
pub fn list() -> Vec<Port> {
    let by_id = links(Path::new("/dev/serial/by-id"));
    let mut ports: Vec<Port> = tokio_serial::available_ports()
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let mut port = Port {
                path: p.port_name.clone(),
                kind: "other".into(),
                usb_id: None,
                manufacturer: None,
                product: None,
                serial_number: None,
                by_id: std::fs::canonicalize(&p.port_name)
                    .ok()
                    .and_then(|c| by_id.get(&c).cloned())
                    .unwrap_or_default(),
            };
            match p.port_type {
                tokio_serial::SerialPortType::UsbPort(u) => {
                    port.kind = "usb".into();
                    port.usb_id = Some(format!("{:04x}:{:04x}", u.vid, u.pid));
                    port.manufacturer = u.manufacturer;
                    port.product = u.product;
                    port.serial_number = u.serial_number;
                }
                tokio_serial::SerialPortType::PciPort => port.kind = "pci".into(),
                tokio_serial::SerialPortType::BluetoothPort => port.kind = "bluetooth".into(),
                tokio_serial::SerialPortType::Unknown => {}
            }
            port
        })
        .collect();
    ports.sort_by(|a, b| a.path.cmp(&b.path));
    ports
}

pub fn run(a: PortsArgs) -> anyhow::Result<ExitCode> {
    let ports = list();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ports)?);
        return Ok(ExitCode::SUCCESS);
    }
    if ports.is_empty() {
        eprintln!(
            "no serial ports found: plug the adapter in and look at `dmesg` (USB adapters \
             appear as /dev/ttyUSB* or /dev/ttyACM*); a serial device server is reached as \
             tcp://HOST:PORT instead"
        );
        return Ok(ExitCode::from(super::exit::FAILED));
    }
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 6]> = ports
        .iter()
        .map(|p| {
            [
                format!("serial://{}", p.path),
                p.kind.clone(),
                dash(&p.usb_id),
                {
                    let adapter = [&p.manufacturer, &p.product]
                        .iter()
                        .filter_map(|s| s.as_deref())
                        .collect::<Vec<_>>()
                        .join(" ");
                    if adapter.is_empty() {
                        "-".into()
                    } else {
                        adapter
                    }
                },
                dash(&p.serial_number),
                if p.by_id.is_empty() {
                    "-".into()
                } else {
                    p.by_id.join(" ")
                },
            ]
        })
        .collect();
    print!(
        "{}",
        super::aligned(
            &[
                "LINK",
                "TYPE",
                "USB ID",
                "ADAPTER",
                "SERIAL",
                "BY-ID (stable name)"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_id_links_are_found_by_their_target() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("ttyUSB3");
        std::fs::write(&dev, b"").unwrap();
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id).unwrap();
        let link = by_id.join("usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0");
        std::os::unix::fs::symlink("../ttyUSB3", &link).unwrap();
        let found = links(&by_id);
        assert_eq!(
            found.get(&std::fs::canonicalize(&dev).unwrap()),
            Some(&vec![link.display().to_string()])
        );
        assert!(links(&dir.path().join("none")).is_empty());
    }
}
