//! `otagw identify`: read the running version of one leaf.

use std::process::ExitCode;

use clap::Args;

use super::{LinkArgs, PluginArgs, parse_option};

#[derive(Debug, Args)]
pub struct IdentifyArgs {
    /// Device family (the plugin's name).
    #[arg(long)]
    pub family: String,
    /// Link to the device: serial:///dev/ttyUSB0?baud=115200, tcp://host:port
    /// or ble://AA:BB:CC:DD:EE:FF (with --ble-adapter).
    #[arg(long)]
    pub link: String,
    /// Device option for the plugin, key=value (repeatable).
    #[arg(long = "option", short = 'o', value_parser = parse_option)]
    pub options: Vec<(String, String)>,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub links: LinkArgs,
}

pub async fn run(a: IdentifyArgs) -> anyhow::Result<ExitCode> {
    let host = a.plugins.load().await?;
    if let Err(code) = super::require_family(&host, &a.family, &a.plugins.plugins_dir) {
        return Ok(ExitCode::from(code));
    }
    match crate::flash::identify_with(&host, &a.links.opener(), &a.family, &a.link, &a.options)
        .await
    {
        Ok(d) => {
            println!("version {}", d.version);
            if let Some(m) = d.model {
                println!("model {m}");
            }
            if let Some(h) = d.hardware_id {
                println!("hardware_id {h}");
            }
            if let Some(n) = d.serial_number {
                println!("serial_number {n}");
            }
            for (name, value) in d.attributes {
                println!("{name} {value}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: identify {} failed: {e}", a.link);
            Ok(ExitCode::FAILURE)
        }
    }
}
