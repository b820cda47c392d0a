//! The `otagw` command line: one file per subcommand (CONVENTIONS 14).

pub mod ble;
pub mod campaign;
pub mod config;
pub mod doctor;
pub mod flash;
pub mod identify;
pub mod plugin;
pub mod plugins;
pub mod ports;
pub mod run;
pub mod status;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::plugin::{Limits, PluginHost};

/// Exit statuses (sysexits.h where one fits).
pub mod exit {
    /// The work failed: a flash, a device in `status`, a broken plugin.
    pub const FAILED: u8 = 1;
    /// The command line is wrong.
    pub const USAGE: u8 = 64;
    /// An input file (image, configuration, plugin) does not exist.
    pub const NO_INPUT: u8 = 66;
    /// The gateway (its API) cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// The gateway refused the API token (missing or wrong).
    pub const NO_PERMISSION: u8 = 77;
    /// Anything else that went wrong inside otagw.
    pub const SOFTWARE: u8 = 70;
    /// The configuration is invalid.
    pub const CONFIG: u8 = 78;
}

/// A service otagw needs does not answer (exit status 69).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The command line asks for something wrong (exit status 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The gateway's API refused a request: 401/403 exit 77, another 4xx
/// (the request was wrong, or the campaign's state does not allow it) 64,
/// anything else 70.
#[derive(Debug, thiserror::Error)]
#[error("the gateway refused ({status}): {message}")]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

const EXIT_HELP: &str = "Exit status: 0 done; 1 the work failed (a flash, a device in `status`, \
a broken plugin, a leaf of a campaign); 64 the command line is wrong (or the gateway refused it); \
66 an input file does not exist; 69 the gateway cannot be reached; 70 an error inside otagw; 77 \
the gateway refused the API token; 78 the configuration is invalid; 130/143 stopped by Ctrl-C / \
SIGTERM.";

/// otagw: OTA edge gateway for leaf devices behind serial, TCP and BLE links.
#[derive(Debug, Parser)]
#[command(name = "otagw", version, about, after_help = EXIT_HELP)]
pub struct Cli {
    /// How log lines are written to stderr: `text` (colour only on a
    /// terminal, and never with NO_COLOR set) or `json` (one object a
    /// line, for log shippers). RUST_LOG filters them (default: the
    /// daemon's job lines at info, everything else at warn).
    #[arg(long, global = true, value_enum, env = "OTAGW_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Libraries' lines an operator should not see at the default level: the
/// embedded broker logs every client's disconnect as an error, and a
/// routing error for a connection that already left.
const QUIET: &str = "rumqttd::server::broker=off,rumqttd::router::routing=off";

/// Send log lines to stderr in `format`; RUST_LOG overrides `default`.
fn init_logging(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).init()
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon. It prints the addresses it serves: the
    /// embedded broker, the API, and the dashboard (open it in a browser;
    /// log in with the contents of [api] token_file to steer campaigns).
    Run(run::RunArgs),
    /// Flash one leaf by hand, without any cloud.
    Flash(flash::FlashArgs),
    /// Read the running version of one leaf.
    Identify(identify::IdentifyArgs),
    /// List the plugins in a directory (families, contract, transports,
    /// options with defaults and docs) and what is wrong with the broken ones.
    Plugins(plugins::PluginsArgs),
    /// Write a new device-family plugin (`otagw plugin new NAME`).
    Plugin(plugin::PluginArgs),
    /// Print the default configuration.
    Config(config::ConfigArgs),
    /// Validate a configuration file.
    Check(config::CheckArgs),
    /// Check a deployment: configuration, plugins, every device's link and
    /// permissions, the BLE adapter, the upstream broker, the clock, disk
    /// space; says what to do about each problem (exit 1 on any).
    Doctor(doctor::DoctorArgs),
    /// Show every leaf's family, version, state, progress and last error.
    Status(status::StatusArgs),
    /// Bluetooth LE: find devices near the adapter (`otagw ble scan`).
    Ble(ble::BleArgs),
    /// Upgrade leaves through the running gateway: a campaign of a
    /// selection (family, tags, bus, devices, version), canary first, then
    /// waves, pausing on failures (`--follow` shows it to its end).
    Upgrade(campaign::UpgradeArgs),
    /// List the campaigns, or show one with every leaf (`otagw campaigns ID`).
    Campaigns(campaign::CampaignsArgs),
    /// Steer a campaign: pause, resume, stop, approve (the next group),
    /// retry (the failed leaves).
    Campaign(campaign::CampaignArgs),
    /// List this machine's serial ports (USB adapter, serial number, the
    /// stable /dev/serial/by-id name) to find a leaf's link.
    Ports(ports::PortsArgs),
}

/// Where plugins live and how they are bounded: shared by every subcommand
/// that runs plugins.
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// Directory of device-family plugins (*.wasm).
    #[arg(long, env = "OTAGW_PLUGINS_DIR", default_value = "/etc/otagw/plugins")]
    pub plugins_dir: PathBuf,
    /// Directory for compiled plugins; compiling again is skipped when it holds them.
    #[arg(
        long,
        env = "OTAGW_CACHE_DIR",
        default_value = "/var/lib/otagw/compiled"
    )]
    pub cache_dir: PathBuf,
    /// Memory one plugin instance may use, in MiB.
    #[arg(long, default_value_t = 64)]
    pub plugin_memory_mib: usize,
    /// Seconds a plugin may compute without calling the host.
    #[arg(long, default_value_t = 5)]
    pub plugin_cpu_secs: u64,
    /// Seconds a whole job may take.
    #[arg(long, default_value_t = 3600)]
    pub job_deadline_secs: u64,
    /// What runs plugin code: native code where this machine has a compiler
    /// backend, the Pulley interpreter elsewhere (armv7); or force one.
    #[arg(long, default_value = "auto", value_parser = ["auto", "native", "pulley"])]
    pub plugin_engine: String,
}

impl PluginArgs {
    pub fn limits(&self) -> anyhow::Result<Limits> {
        Ok(Limits {
            engine: crate::plugin::EngineKind::from_config(&self.plugin_engine)
                .map_err(|e| anyhow::anyhow!("--plugin-engine: {e}"))?,
            memory: self.plugin_memory_mib << 20,
            cpu: std::time::Duration::from_secs(self.plugin_cpu_secs),
            job: std::time::Duration::from_secs(self.job_deadline_secs),
            ..Limits::default()
        })
    }

    /// Build the host and load the plugins directory, reporting broken plugins.
    pub async fn load(&self) -> anyhow::Result<PluginHost> {
        let cache = match std::fs::create_dir_all(&self.cache_dir) {
            Ok(()) => Some(self.cache_dir.clone()),
            Err(e) => {
                tracing::warn!(dir = %self.cache_dir.display(), "no compile cache ({e}); plugins are compiled on every start");
                None
            }
        };
        let host = PluginHost::new(self.limits()?, cache)?;
        let report = host.load_dir(&self.plugins_dir).await?;
        for e in &report.failed {
            eprintln!("warning: {e}");
        }
        Ok(host)
    }
}

/// Fail with the families that are there when `family` has no plugin
/// (a usage error: the command line names it).
pub fn require_family(host: &PluginHost, family: &str, dir: &std::path::Path) -> Result<(), u8> {
    if host.get(family).is_some() {
        return Ok(());
    }
    let known: Vec<String> = host
        .families()
        .iter()
        .map(|p| p.info.name.clone())
        .collect();
    eprintln!(
        "error: no plugin for device family {family:?} in {}; {} (`otagw plugins` lists them)",
        dir.display(),
        if known.is_empty() {
            "it holds none".to_string()
        } else {
            format!("the families there are: {}", known.join(", "))
        }
    );
    Err(exit::USAGE)
}

/// Which leaf `otagw flash` and `otagw identify` work on: a device of the
/// gateway's configuration by name, or a family and a link given here.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// A device of the configuration (its device_name, or pk/dn): its
    /// family, link and options come from there (needs --config).
    pub device: Option<String>,
    /// The gateway's configuration, for DEVICE (and its plugins_dir).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Device family (the plugin's name), e.g. xmodem.
    #[arg(long)]
    pub family: Option<String>,
    /// Link to the device: serial:///dev/ttyUSB0?baud=115200, tcp://host:port
    /// or ble://AA:BB:CC:DD:EE:FF (with --ble-adapter).
    #[arg(long)]
    pub link: Option<String>,
}

/// A leaf, resolved.
#[derive(Debug)]
pub struct Target {
    pub family: String,
    pub link: String,
    /// The configuration's options, then those of the command line.
    pub options: Vec<(String, String)>,
}

impl TargetArgs {
    /// The leaf, with `options` from the command line over the
    /// configuration's; `plugins` takes the configuration's directories.
    /// A usage error (exit 64) says what is missing.
    pub fn resolve(
        &self,
        options: &[(String, String)],
        plugins: &mut PluginArgs,
    ) -> anyhow::Result<Result<Target, String>> {
        let (mut family, mut link, mut opts) = (None, None, Vec::new());
        match (&self.device, &self.config) {
            (Some(name), None) => {
                return Ok(Err(format!(
                    "device {name:?} is looked up in the gateway's configuration: add --config FILE"
                )));
            }
            (Some(name), Some(path)) => {
                let cfg = crate::config::Config::load(path)?;
                let found = cfg.devices.iter().find(|d| {
                    d.device_name == *name
                        || format!("{}/{}", d.product_key, d.device_name) == *name
                });
                let Some(d) = found else {
                    let names: Vec<&str> =
                        cfg.devices.iter().map(|d| d.device_name.as_str()).collect();
                    return Ok(Err(format!(
                        "no device {name:?} in {} (its devices: {})",
                        path.display(),
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    )));
                };
                family = Some(d.family.clone());
                link = Some(d.link.clone());
                opts = d.options_vec();
                plugins.plugins_dir = cfg.gateway.plugins_dir.clone();
                plugins.cache_dir = cfg.gateway.data_dir.join("compiled");
            }
            (None, _) => {}
        }
        let family = self.family.clone().or(family);
        let link = self.link.clone().or(link);
        let (Some(family), Some(link)) = (family, link) else {
            return Ok(Err(
                "say which device: DEVICE --config FILE (a device of the gateway's \
                 configuration), or --family FAMILY --link URL"
                    .into(),
            ));
        };
        for (k, v) in options {
            opts.retain(|(key, _)| key != k);
            opts.push((k.clone(), v.clone()));
        }
        Ok(Ok(Target {
            family,
            link,
            options: opts,
        }))
    }
}

/// How `otagw flash` and `otagw identify` reach links beyond serial and TCP.
#[derive(Debug, Args)]
pub struct LinkArgs {
    /// The Bluetooth LE adapter for ble:// links: hci+tcp://HOST:PORT (an HCI
    /// controller over TCP), hci+serial:///dev/ttyACM0?baud=1000000 (an HCI
    /// UART, e.g. an nRF52840 dongle with Zephyr's hci_uart), or bluez://hci0
    /// (the host's BlueZ; only in builds with the `bluez` feature).
    #[arg(long, env = "OTAGW_BLE_ADAPTER")]
    pub ble_adapter: Option<String>,
    /// How long finding and connecting to a BLE device may take, in seconds.
    #[arg(long, default_value_t = 30)]
    pub ble_timeout_secs: u64,
}

impl LinkArgs {
    pub fn opener(&self) -> crate::link::Opener {
        match &self.ble_adapter {
            Some(spec) => crate::link::Opener::with_ble(
                spec,
                1,
                std::time::Duration::from_secs(self.ble_timeout_secs),
            ),
            None => crate::link::Opener::default(),
        }
    }
}

/// Rows under a header as an aligned text table: columns two spaces apart,
/// the last one unpadded.
pub fn aligned<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(*header);
    for r in rows {
        line(r.each_ref().map(String::as_str));
    }
    out
}

/// Parse `key=value` (values may contain '=').
pub fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// The whole `otagw` program: logging, the runtime, [`main_with_args`].
/// `main.rs` calls only this.
pub fn main() -> std::process::ExitCode {
    let cli = match parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // The daemon says each job's start, phases and end; the one-shot
    // commands print what they do themselves.
    let default = match cli.command {
        Command::Run(_) => format!("warn,otagw=info,{QUIET}"),
        // `flash` shows the plugin's lines itself, above its progress bar.
        Command::Flash(_) => format!("warn,otagw::progress=off,{QUIET}"),
        _ => format!("warn,{QUIET}"),
    };
    init_logging(cli.log_format, &default);
    // `flash` and `identify` are one job on one link: on a current-thread
    // runtime a link read that has to wait wakes the job on the same thread
    // instead of another one (~10 µs a block; measured against lrzsz in
    // BENCHMARKS.md). The daemon runs many jobs and uses every core.
    let rt = if matches!(cli.command, Command::Flash(_) | Command::Identify(_)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    match rt {
        Ok(rt) => rt.block_on(run_to_exit(cli)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole `otagw` program after the runtime is up: parse `args`, run,
/// and map the outcome to an exit status (64 for a usage or setup error).
pub async fn main_with_args<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match parse(args) {
        Ok(cli) => run_to_exit(cli).await,
        Err(code) => code,
    }
}

/// Parse the command line; on an error (or `--help`) print it and return the
/// exit status.
fn parse<I, T>(args: I) -> Result<Cli, std::process::ExitCode>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            std::process::ExitCode::from(64)
        } else {
            std::process::ExitCode::SUCCESS
        }
    })
}

/// An error and its causes on one line, each cause once: many of our
/// errors already say their source ("cannot read X: No such file").
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

/// The exit status of a command that failed with `e`.
pub fn exit_status(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<crate::config::ConfigError>() {
            return exit::CONFIG;
        }
        if cause.is::<Unavailable>() {
            return exit::UNAVAILABLE;
        }
        if cause.is::<Usage>() {
            return exit::USAGE;
        }
        if let Some(r) = cause.downcast_ref::<Refused>() {
            return match r.status {
                401 | 403 => exit::NO_PERMISSION,
                400..=499 => exit::USAGE,
                _ => exit::SOFTWARE,
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::NotFound
        {
            return exit::NO_INPUT;
        }
        match cause.downcast_ref::<crate::plugin::PluginError>() {
            Some(crate::plugin::PluginError::NoDir(_)) => return exit::NO_INPUT,
            Some(crate::plugin::PluginError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return exit::NO_INPUT;
            }
            _ => {}
        }
    }
    exit::SOFTWARE
}

/// Run `cli` and map the outcome to an exit status.
async fn run_to_exit(cli: Cli) -> std::process::ExitCode {
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::from(exit_status(&e))
        }
    }
}

/// Run a parsed command; the process exit status is the result.
pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Run(a) => run::run(a).await,
        Command::Flash(a) => flash::run(a).await,
        Command::Identify(a) => identify::run(a).await,
        Command::Plugins(a) => plugins::run(a).await,
        Command::Plugin(a) => plugin::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Ble(a) => ble::run(a).await,
        Command::Ports(a) => ports::run(a),
        Command::Upgrade(a) => campaign::upgrade(a).await,
        Command::Campaigns(a) => campaign::campaigns(a).await,
        Command::Campaign(a) => campaign::campaign(a).await,
        Command::Config(a) => config::run(a).await,
        Command::Check(a) => config::check(a).await,
        Command::Doctor(a) => doctor::run(a).await,
    }
}

/// Ctrl-C (SIGINT) and SIGTERM, caught from the moment this is made: a stop
/// that comes before anything waits for it is kept, never the default action
/// (which ends the process at once). Make it before telling anyone (systemd's
/// READY) that the process runs.
pub(crate) struct StopSignal {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl StopSignal {
    pub(crate) fn catch() -> StopSignal {
        use tokio::signal::unix::{SignalKind, signal};
        StopSignal {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Wait for either; the exit status a stopped command gives: 130 or 143
    /// (128 + the signal).
    pub(crate) async fn wait(mut self) -> u8 {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.int) => 130,
            _ = next(&mut self.term) => 143,
        }
    }
}

#[cfg(test)]
mod signal_tests {
    use super::StopSignal;

    /// A SIGTERM that comes after `catch` but before anything waits is kept
    /// for the wait; without the handler in place it would end this test
    /// process at once (the default action), failing the whole run.
    #[tokio::test]
    async fn a_stop_before_anyone_waits_is_kept() {
        let caught = StopSignal::catch();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success());
        let code = tokio::time::timeout(std::time::Duration::from_secs(10), caught.wait()).await;
        assert_eq!(code, Ok(143));
    }
}
