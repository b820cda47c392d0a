//! `otagw config default` prints the commented default configuration;
//! `otagw check --config FILE` validates a configuration (exit 64 if bad):
//! the file itself, then every device against the plugins of `plugins_dir`
//! (a plugin for its family, and its options as the family's schema and the
//! plugin's own `check-options` take them). Every problem is printed, one a
//! line, naming the device.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::{Config, DEFAULT};
use crate::plugin::{PluginError, PluginHost};

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
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    let problems = check_devices(&cfg).await?;
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!(
            "{}: {} problem{}; the daemon would refuse the devices named above",
            a.config.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        return Ok(ExitCode::from(super::exit::CONFIG));
    }
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

/// Every device's family has a plugin and its options are valid for it.
pub(crate) async fn check_devices(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let dir = &cfg.gateway.plugins_dir;
    if !dir.is_dir() {
        return Ok(vec![format!(
            "plugins_dir {} is not a directory: create it and put the device-family \
             plugins (*.wasm) there",
            dir.display()
        )]);
    }
    // The daemon's compile cache, when it exists: `check` creates nothing.
    let cache = Some(cfg.gateway.data_dir.join("compiled")).filter(|c| c.is_dir());
    let host = PluginHost::new(cfg.plugins.limits(cfg.jobs.max_parallel), cache)?;
    let report = host.load_dir(dir).await?;
    let mut problems: Vec<String> = report
        .failed
        .iter()
        .map(|e| format!("{e} (devices of its family cannot be flashed)"))
        .collect();
    for d in &cfg.devices {
        let who = format!("device {}/{}", d.product_key, d.device_name);
        let mut session = match host.session(&d.family, None).await {
            Ok(s) => s,
            Err(PluginError::UnknownFamily(f)) => {
                let loaded: Vec<String> = host
                    .families()
                    .iter()
                    .map(|p| p.info.name.clone())
                    .collect();
                problems.push(format!(
                    "{who}: no plugin for family {f:?} in {} (loaded: {})",
                    dir.display(),
                    if loaded.is_empty() {
                        "none".into()
                    } else {
                        loaded.join(", ")
                    }
                ));
                continue;
            }
            Err(e) => {
                problems.push(format!("{who}: {e}"));
                continue;
            }
        };
        match session.check_options(&d.options_vec()).await {
            Ok(()) => {}
            Err(PluginError::Options {
                problems: found, ..
            }) => {
                problems.extend(found.into_iter().map(|p| format!("{who}: {p}")));
            }
            Err(e) => problems.push(format!("{who}: {e}")),
        }
    }
    Ok(problems)
}
