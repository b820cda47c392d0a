//! `otagw ble scan`: who advertises within reach of the BLE adapter, so a
//! technician can find the address to put in a `ble://` link.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::LinkArgs;
use crate::link::ble::Advertiser;

#[derive(Debug, Args)]
pub struct BleArgs {
    #[command(subcommand)]
    pub command: BleCommand,
}

#[derive(Debug, Subcommand)]
pub enum BleCommand {
    /// List the devices advertising near the adapter: address (with its
    /// type), signal strength, name and advertised services, strongest first.
    Scan(ScanArgs),
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// How long to listen, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub seconds: u64,
    /// Print JSON (one array of devices) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub links: LinkArgs,
}

pub async fn run(a: BleArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        BleCommand::Scan(s) => scan(s).await,
    }
}

async fn scan(a: ScanArgs) -> anyhow::Result<ExitCode> {
    if a.links.ble_adapter.is_none() {
        eprintln!(
            "error: ble scan needs a BLE adapter: pass --ble-adapter hci+tcp://HOST:PORT or \
             hci+serial:///dev/ttyACM0?baud=1000000 (or set OTAGW_BLE_ADAPTER); the gateway's \
             is `[ble] adapter` in its configuration"
        );
        return Ok(ExitCode::from(2));
    }
    let found = match a.links.opener().scan(Duration::from_secs(a.seconds)).await {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: ble scan failed: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        print!("{}", table(&found));
        if found.is_empty() {
            eprintln!(
                "nothing advertised within {} s: is the device powered and in range, and \
                 advertising (a device that is connected elsewhere does not)?",
                a.seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The mcumgr SMP service, named in the table because it is what the smp
/// family connects to.
const SMP_SERVICE: &str = "8d53dc1d-1db7-4cd3-868b-8a527460aa84";

/// Devices as an aligned text table; a link URL is `ble://ADDRESS`, with
/// `?addr_type=public` for a public address.
pub fn table(found: &[Advertiser]) -> String {
    let header = ["ADDRESS", "TYPE", "RSSI", "NAME", "SERVICES"];
    let rows: Vec<[String; 5]> = found
        .iter()
        .map(|d| {
            let services: Vec<String> = d
                .services
                .iter()
                .map(|u| {
                    let s = u.to_string();
                    if s == SMP_SERVICE {
                        format!("smp ({s})")
                    } else {
                        s
                    }
                })
                .collect();
            [
                d.address.clone(),
                format!(
                    "{}{}",
                    d.addr_type,
                    if d.connectable { "" } else { " (no connect)" }
                ),
                if d.rssi == 127 {
                    "-".into()
                } else {
                    format!("{} dBm", d.rssi)
                },
                match &d.name {
                    Some(n) if d.name_shortened => format!("{n}…"),
                    Some(n) => n.clone(),
                    None => "-".into(),
                },
                if services.is_empty() {
                    "-".into()
                } else {
                    services.join(", ")
                },
            ]
        })
        .collect();
    super::aligned(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_smp_service_and_aligns() {
        let t = table(&[
            Advertiser {
                address: "C0:00:00:00:00:01".into(),
                addr_type: "random",
                name: Some("leaf1".into()),
                name_shortened: false,
                rssi: -40,
                services: vec![crate::link::gatt::parse_uuid(SMP_SERVICE).unwrap()],
                connectable: true,
            },
            Advertiser {
                address: "0A:00:00:00:00:02".into(),
                addr_type: "public",
                name: None,
                name_shortened: false,
                rssi: 127,
                services: vec![],
                connectable: false,
            },
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("ADDRESS            TYPE"), "{t}");
        assert!(
            lines[1].contains("-40 dBm") && lines[1].contains("smp (8d53dc1d"),
            "{t}"
        );
        assert!(
            lines[2].contains("public (no connect)") && lines[2].contains(" - "),
            "{t}"
        );
        let name_col = lines[0].find("NAME").unwrap();
        assert_eq!(&lines[1][name_col..name_col + 5], "leaf1", "{t}");
    }
}
