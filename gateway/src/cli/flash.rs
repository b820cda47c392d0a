//! `otagw flash`: a technician flashes one leaf by hand, with a progress bar.
//! Exit status 0 only when the device took the image.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{LinkArgs, PluginArgs, TargetArgs, parse_option};
use crate::plugin::{FileImage, JobMeta};
use crate::progress::{JobEvent, LogLevel};

#[derive(Debug, Args)]
pub struct FlashArgs {
    #[command(flatten)]
    pub target: TargetArgs,
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
    /// Show the plugin's debug lines too.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub links: LinkArgs,
}

/// How progress is shown: a bar on a terminal; a line every 10 % (and at
/// each phase) when stderr is a pipe or a file, so a log of a long flash
/// says how far it got.
struct Progress {
    bar: Option<ProgressBar>,
    verbose: bool,
    /// Pipe mode: the phase and tenth last printed.
    last: Option<(&'static str, u64)>,
}

impl Progress {
    fn new(verbose: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            // A spinner until the plugin says how much there is to do: a bar
            // of 0 B/0 B would read as done.
            let bar = ProgressBar::new_spinner();
            bar.set_message("starting");
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            verbose,
            last: None,
        }
    }

    fn event(&mut self, ev: JobEvent) {
        match ev {
            JobEvent::Progress { done, total, phase } => match &self.bar {
                Some(bar) => {
                    if total > 0 && bar.length() != Some(total) {
                        bar.set_style(
                            // wide_bar takes what the terminal has left: no wrap at 80 columns.
                            ProgressStyle::with_template(
                                "{msg:>9} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        bar.set_length(total);
                    }
                    bar.set_position(done);
                    bar.set_message(phase.as_str());
                }
                None => {
                    let tenth = (done * 10).checked_div(total).unwrap_or(0);
                    let now = (phase.as_str(), tenth);
                    if self.last != Some(now) {
                        self.last = Some(now);
                        eprintln!(
                            "{} {}% ({} of {})",
                            phase.as_str(),
                            tenth * 10,
                            indicatif::HumanBytes(done),
                            indicatif::HumanBytes(total)
                        );
                    }
                }
            },
            JobEvent::Log { level, message } => {
                if level < LogLevel::Info && !self.verbose {
                    return;
                }
                let line = format!("{}: {message}", format!("{level:?}").to_lowercase());
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub async fn run(mut a: FlashArgs) -> anyhow::Result<ExitCode> {
    let target = match a.target.resolve(&a.options, &mut a.plugins)? {
        Ok(t) => t,
        Err(usage) => {
            eprintln!("error: {usage}");
            return Ok(ExitCode::from(super::exit::USAGE));
        }
    };
    let image = FileImage::open(&a.image)
        .with_context(|| format!("cannot open image {}", a.image.display()))?;
    let host = a.plugins.load().await?;
    if let Err(code) = super::require_family(&host, &target.family, &a.plugins.plugins_dir) {
        return Ok(ExitCode::from(code));
    }
    let meta = JobMeta {
        version: a.version.clone(),
        module: a.module.clone(),
        options: target.options.clone(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let verbose = a.verbose;
    let render = tokio::spawn(async move {
        let mut progress = Progress::new(verbose);
        while let Some(ev) = rx.recv().await {
            progress.event(ev);
        }
        progress.finish();
    });
    // Ctrl-C or SIGTERM: the link's reads stop, the plugin ends the
    // transfer its protocol's way (XMODEM sends CAN CAN) and returns; if it
    // does not within STOP_WAIT, otagw exits anyway.
    let stop = tokio_util::sync::CancellationToken::new();
    let caught = super::StopSignal::catch();
    let signal = tokio::spawn({
        let stop = stop.clone();
        async move {
            let code = caught.wait().await;
            eprintln!("stopping: the plugin ends the transfer (Ctrl-C again is not needed)");
            stop.cancel();
            code
        }
    });
    let opener = a.links.opener();
    let flashing = crate::flash::flash_with(
        &host,
        &opener,
        (&target.family, &target.link),
        Arc::new(image),
        &meta,
        Some(tx),
        stop.clone(),
    );
    tokio::pin!(flashing);
    let result = tokio::select! {
        r = &mut flashing => r,
        () = async {
            stop.cancelled().await;
            tokio::time::sleep(STOP_WAIT).await;
        } => {
            eprintln!("error: the plugin did not end within {STOP_WAIT:?} of the stop; exiting");
            return Ok(ExitCode::from(stopped_code(signal).await));
        }
    };
    if stop.is_cancelled() {
        let _ = render.await;
        eprintln!(
            "stopped: {} did not get the whole image ({}); it is probably still in its \
             bootloader or runs its old firmware: flash it again to finish",
            target.link,
            match &result {
                Ok(_) => "the transfer had ended".to_string(),
                Err(e) => e.to_string(),
            }
        );
        return Ok(ExitCode::from(stopped_code(signal).await));
    }
    signal.abort();
    let _ = render.await;
    match result {
        Ok(o) => {
            println!(
                "flashed {} bytes to {} ({} retries): {}",
                o.report.bytes_sent, target.link, o.report.retries, o.report.summary
            );
            if let Some(e) = &o.read_back_error {
                eprintln!(
                    "error: the plugin flashed the image and reported success ({}), but \
                     reading the version back failed: {e}. The image itself was not refused: \
                     check that the device boots it (its console, or `otagw identify` once it \
                     is up)",
                    o.report.summary
                );
                return Ok(ExitCode::from(super::exit::FAILED));
            }
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
                None => println!("the {} family cannot read the version back", target.family),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "error: flashing {} failed (step {}): {e}",
                target.link,
                e.step_code()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// How long the plugin gets to end a transfer after Ctrl-C or SIGTERM.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The exit status of a stopped flash: 128 + the signal.
async fn stopped_code(signal: tokio::task::JoinHandle<u8>) -> u8 {
    signal.await.unwrap_or(130)
}
