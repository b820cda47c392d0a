//! `otagw plugins`: what the plugins directory holds, and why broken plugins
//! are skipped. Exit status 1 when any plugin is broken.

use std::process::ExitCode;

use clap::Args;

use super::PluginArgs;

#[derive(Debug, Args)]
pub struct PluginsArgs {
    #[command(flatten)]
    pub plugins: PluginArgs,
}

pub async fn run(a: PluginsArgs) -> anyhow::Result<ExitCode> {
    let host =
        crate::plugin::PluginHost::new(a.plugins.limits(), Some(a.plugins.cache_dir.clone()))?;
    let report = host.load_dir(&a.plugins.plugins_dir).await?;
    for p in &report.loaded {
        println!(
            "{:<12} {:<8} {:<9} {:>7.1} ms  {}  {}",
            p.info.name,
            p.info.version,
            format!("{:?}", p.loaded_from).to_lowercase(),
            p.load_time.as_secs_f64() * 1e3,
            p.path.display(),
            p.info.description
        );
    }
    for e in &report.failed {
        println!("broken: {e}");
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
