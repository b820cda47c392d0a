//! `otagw flash`: a technician flashes one leaf by hand, with a progress bar.
//! Exit status 0 only when the device took the image.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{LinkArgs, PluginArgs, parse_option};
use crate::plugin::{FileImage, JobMeta};
use crate::progress::JobEvent;

#[derive(Debug, Args)]
pub struct FlashArgs {
    /// Device family (the plugin's name), e.g. xmodem.
    #[arg(long)]
    pub family: String,
    /// Link to the device: serial:///dev/ttyUSB0?baud=115200, tcp://host:port
    /// or ble://AA:BB:CC:DD:EE:FF (with --ble-adapter).
    #[arg(long)]
    pub link: String,
    /// Firmware image file.
    #[arg(long)]
    pub image: PathBuf,
    /// Version the image carries, told to the plugin.
    #[arg(long)]
    pub version: Option<String>,
    /// Firmware module.
    #[arg(long, default_value = "default")]
    pub module: String,
    /// Device option for the plugin, key=value (repeatable).
    #[arg(long = "option", short = 'o', value_parser = parse_option)]
    pub options: Vec<(String, String)>,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub links: LinkArgs,
}

pub async fn run(a: FlashArgs) -> anyhow::Result<ExitCode> {
    let image = FileImage::open(&a.image)
        .with_context(|| format!("cannot open image {}", a.image.display()))?;
    let host = a.plugins.load().await?;
    if let Err(code) = super::require_family(&host, &a.family, &a.plugins.plugins_dir) {
        return Ok(ExitCode::from(code));
    }
    let meta = JobMeta {
        version: a.version.clone(),
        module: a.module.clone(),
        options: a.options.clone(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let render = {
        let bar = bar.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    JobEvent::Progress { done, total, phase } => {
                        bar.set_length(total);
                        bar.set_position(done);
                        bar.set_message(phase.as_str());
                    }
                    JobEvent::Log { level, message } => {
                        bar.println(format!("{level:?}: {message}").to_lowercase_level());
                    }
                }
            }
        })
    };
    let result = crate::flash::flash_with(
        &host,
        &a.links.opener(),
        &a.family,
        &a.link,
        Arc::new(image),
        &meta,
        Some(tx),
    )
    .await;
    let _ = render.await;
    bar.finish_and_clear();
    match result {
        Ok(o) => {
            println!(
                "flashed {} bytes to {} ({} retries): {}",
                o.report.bytes_sent, a.link, o.report.retries, o.report.summary
            );
            match o.device {
                // The daemon's rule: a device that does not run the version
                // it was given did not take the image.
                Some(d) if a.version.as_ref().is_some_and(|v| *v != d.version) => {
                    eprintln!(
                        "error: the device reports version {} after the flash, not {} \
                         (--version): the image was sent but the device does not run it \
                         (it may have rolled back or rejected it at boot; check its console)",
                        d.version,
                        a.version.as_deref().unwrap_or_default()
                    );
                    return Ok(ExitCode::from(super::exit::FAILED));
                }
                Some(d) => println!(
                    "device reports version {}{}",
                    d.version,
                    d.model.map(|m| format!(" (model {m})")).unwrap_or_default()
                ),
                None => println!("the {} family cannot read the version back", a.family),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "error: flashing {} failed (step {}): {e}",
                a.link,
                e.step_code()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

trait LevelCase {
    fn to_lowercase_level(self) -> String;
}

impl LevelCase for String {
    /// "Info: message" → "info: message"
    fn to_lowercase_level(self) -> String {
        match self.split_once(':') {
            Some((l, rest)) => format!("{}:{rest}", l.to_lowercase()),
            None => self,
        }
    }
}
