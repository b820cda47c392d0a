//! `otagw run --config FILE`: the daemon. Prints the addresses it bound
//! (`broker: ADDR`, `api: ADDR`, `dashboard: URL`) on stdout, serves until SIGINT or SIGTERM,
//! then drains for up to `--grace` seconds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::Gateway;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (`otagw config default` prints one).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Seconds running jobs get to finish at shutdown.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
}

pub async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    // A bad configuration is a usage error (64, from main_with_args).
    let cfg = Config::load(&a.config)?;
    let gw = match Gateway::build(cfg).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(addr) = gw.broker_addr() {
        println!("broker: {addr}");
    }
    if let Some(addr) = gw.api_addr() {
        println!("api: {addr}");
    }
    if let Some(url) = gw.dashboard_url() {
        println!("dashboard: {url}");
    }
    // SIGHUP: read the configuration again; a bad one is refused with the
    // reason and the running one stays.
    {
        let reloader = gw.reloader();
        let path = a.config.clone();
        // Caught from here on, before READY: SIGHUP's default ends the process.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        tokio::spawn(async move {
            let Ok(mut hup) = hup else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!(config = %path.display(), "SIGHUP: reading the configuration again");
                match Config::load(&path) {
                    Ok(cfg) => reloader.reload(cfg).await,
                    Err(e) => tracing::error!(
                        "reload refused: {}; the running configuration stays (fix the file and send SIGHUP again)",
                        super::error_text(&anyhow::Error::new(e))
                    ),
                }
            }
        });
    }
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        let caught = super::StopSignal::catch();
        tokio::spawn(async move {
            caught.wait().await;
            tracing::info!("signal received");
            shutdown.cancel();
        });
    }
    match gw.run(shutdown, Duration::from_secs(a.grace)).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
