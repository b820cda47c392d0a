//! `otagw identify`: read the running version of one leaf.

use std::process::ExitCode;

use clap::Args;

use super::{LinkArgs, PluginArgs, TargetArgs, parse_option};

#[derive(Debug, Args)]
pub struct IdentifyArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Device option for the plugin, key=value (repeatable).
    #[arg(long = "option", short = 'o', value_parser = parse_option)]
    pub options: Vec<(String, String)>,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub links: LinkArgs,
}

pub async fn run(mut a: IdentifyArgs) -> anyhow::Result<ExitCode> {
    let target = match a.target.resolve(&a.options, &mut a.plugins)? {
        Ok(t) => t,
        Err(usage) => {
            eprintln!("error: {usage}");
            return Ok(ExitCode::from(super::exit::USAGE));
        }
    };
    let host = a.plugins.load().await?;
    if let Err(code) = super::require_family(&host, &target.family, &a.plugins.plugins_dir) {
        return Ok(ExitCode::from(code));
    }
    match crate::flash::identify_with(
        &host,
        &a.links.opener(),
        &target.family,
        &target.link,
        &target.options,
    )
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
            eprintln!("error: identify {} failed: {e}", target.link);
            Ok(ExitCode::FAILURE)
        }
    }
}
