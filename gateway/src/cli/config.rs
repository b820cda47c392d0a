//! `otagw config default` prints the commented default configuration;
//! `otagw check --config FILE` validates a configuration (exit 64 if bad).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::{Config, DEFAULT};

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the commented default configuration.
    Default,
}

pub async fn run(a: ConfigArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        ConfigCommand::Default => print!("{DEFAULT}"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
}

pub async fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(&a.config)?;
    println!(
        "{}: ok ({} device{}, {})",
        a.config.display(),
        cfg.devices.len(),
        if cfg.devices.len() == 1 { "" } else { "s" },
        match &cfg.upstream {
            Some(u) => format!("upstream {}", u.url),
            None => "standalone".into(),
        }
    );
    Ok(ExitCode::SUCCESS)
}
