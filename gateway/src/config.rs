//! The typed configuration: TOML, unknown keys rejected, validated as a whole
//! when loaded. Loading binds and opens nothing.
//!
//! `gateway/config/default.toml` is the commented default (`otagw config
//! default`); it parses into the same types, which a test checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::link::LinkUrl;

/// The commented default configuration.
pub const DEFAULT: &str = include_str!("../config/default.toml");

/// Memory the gateway needs besides its plugins, in MiB, with room to spare
/// (the fan-out benchmark measured 63 MiB of RSS with 256 leaves at once).
pub const GATEWAY_MEMORY_MIB: u64 = 128;

/// The memory limit of this process's cgroup (cgroup v2 `memory.max`, which
/// systemd's MemoryMax sets), in bytes; `None` when unlimited or unknown.
pub fn own_memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    memory_limit_in(&cgroup, Path::new("/sys/fs/cgroup"))
}

/// [`own_memory_limit`] from the text of `/proc/self/cgroup` and the cgroup
/// v2 mount point.
fn memory_limit_in(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let path = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim()
        .trim_start_matches('/');
    let max = std::fs::read_to_string(root.join(path).join("memory.max")).ok()?;
    max.trim().parse().ok()
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub upstream: Option<UpstreamConfig>,
    #[serde(default)]
    pub local_broker: LocalBrokerConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub plugins: PluginLimitsConfig,
    #[serde(default)]
    pub ble: BleConfig,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Buses several leaves share (`[[bus]]`), named by `[[device]] bus`.
    #[serde(default, rename = "bus")]
    pub buses: Vec<BusConfig>,
}

/// `[[bus]]`: a bus several leaves share (RS-485 multidrop, a serial device
/// server's port): at most `max_parallel` of its leaves are upgraded at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub name: String,
    #[serde(default = "one")]
    pub max_parallel: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub product_key: String,
    pub device_name: String,
    pub device_secret: Option<String>,
    pub data_dir: PathBuf,
    pub plugins_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    None,
    Password,
    Aliyun,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: String,
    pub auth: AuthKind,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: Option<String>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    pub ca_file: Option<PathBuf>,
    /// The largest MQTT message taken from the broker, in KiB.
    #[serde(default = "default_max_message_kib")]
    pub max_message_kib: usize,
    /// aliyun: a leaf removed from this file is logged out at the next start;
    /// with this, it is also removed from the gateway's topology.
    #[serde(default)]
    pub delete_removed_leaves: bool,
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(60)
}

fn default_max_message_kib() -> usize {
    crate::upstream::DEFAULT_MAX_PACKET >> 10
}

pub const MAX_MESSAGE_KIB: std::ops::RangeInclusive<usize> = 16..=(256 << 10);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalBrokerConfig {
    /// `None` (the key absent in a present section is not allowed; leave the
    /// section out for the default) disables the broker where allowed.
    pub listen: Option<SocketAddr>,
}

impl Default for LocalBrokerConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 1883))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: Option<SocketAddr>,
    /// The token that changing requests (campaigns) must carry; made at the
    /// first start when missing (default: `<data_dir>/api-token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM) ...
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// ... and its private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            token_file: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// The file name of the API token in the data directory, by default.
pub const API_TOKEN_FILE: &str = "api-token";

impl Config {
    /// Where the API token is read from (and made at the first start).
    pub fn api_token_path(&self) -> PathBuf {
        self.api
            .token_file
            .clone()
            .unwrap_or_else(|| self.gateway.data_dir.join(API_TOKEN_FILE))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    #[serde(default = "default_parallel")]
    pub max_parallel: usize,
    /// Unclean stops of the gateway (crash, kill, power loss) while one leaf
    /// is being flashed that its job survives; one more fails it with -4.
    #[serde(default = "default_flash_restarts")]
    pub flash_restarts: u32,
    /// What an upgrade notice from the platform does: `immediate` (a job
    /// at once) or `plan` (it joins a campaign run by `[jobs.plan]`).
    #[serde(default)]
    pub policy: Policy,
    /// The plan of campaigns made from platform notices (`policy = "plan"`).
    #[serde(default)]
    pub plan: PlanConfig,
}

/// What an upgrade notice from the platform does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// A job starts at once (bounded by max_parallel and the buses).
    #[default]
    Immediate,
    /// Notices for one package collect into a campaign that runs the plan.
    Plan,
}

/// `[jobs.plan]`: canary first, then waves, with thresholds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// The canary group: a count ("2") or a share ("10%"); "0": none.
    #[serde(default = "default_canary")]
    pub canary: String,
    /// The waves after it, each a count or a share of the leaves after the
    /// canary; the last repeats until every leaf has a group.
    #[serde(default = "default_waves")]
    pub waves: Vec<String>,
    /// The share of a group that must succeed before the next one starts;
    /// a group that ends below it waits for `otagw campaign approve`.
    #[serde(default = "default_success")]
    pub success_threshold: u8,
    /// Pause the campaign when device or plugin failures exceed this share
    /// of a group ...
    #[serde(default = "default_error")]
    pub error_threshold: u8,
    /// ... once at least this many of the group have finished.
    #[serde(default = "one_u32")]
    pub min_executed: u32,
    /// Wait for `otagw campaign approve` before every group after the first.
    #[serde(default)]
    pub approve: bool,
    /// At most this many starts per minute (none: no limit).
    #[serde(default)]
    pub rate_per_minute: Option<u32>,
    /// How long notices for one package are collected into its campaign
    /// before the plan is drawn up; later ones join its last group.
    #[serde(default = "default_collect", with = "humantime_serde")]
    pub collect: Duration,
}

fn default_canary() -> String {
    "1".into()
}
fn default_waves() -> Vec<String> {
    vec!["50%".into()]
}
fn default_success() -> u8 {
    100
}
fn default_error() -> u8 {
    50
}
fn one_u32() -> u32 {
    1
}
fn default_collect() -> Duration {
    Duration::from_secs(30)
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            canary: default_canary(),
            waves: default_waves(),
            success_threshold: default_success(),
            error_threshold: default_error(),
            min_executed: one_u32(),
            approve: false,
            rate_per_minute: None,
            collect: default_collect(),
        }
    }
}

fn default_parallel() -> usize {
    8
}

fn default_flash_restarts() -> u32 {
    crate::ota::job::DEFAULT_FLASH_RESTARTS
}

/// The ranges the numbers of the configuration must be in.
pub const MAX_PARALLEL: std::ops::RangeInclusive<usize> = 1..=1024;
pub const FLASH_RESTARTS: std::ops::RangeInclusive<u32> = 0..=100;
pub const CACHE_MIB: std::ops::RangeInclusive<u64> = 1..=(1 << 24);
pub const PLUGIN_MEMORY_MIB: std::ops::RangeInclusive<usize> = 1..=2048;

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_parallel: default_parallel(),
            flash_restarts: default_flash_restarts(),
            policy: Policy::default(),
            plan: PlanConfig::default(),
        }
    }
}

/// `[ble]`: the Bluetooth LE adapter `ble://` devices are reached through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BleConfig {
    /// `hci+tcp://HOST:PORT` (H4 over TCP),
    /// `hci+serial:///dev/ttyACM0?baud=1000000` (an H4 UART) or `bluez://hci0`
    /// (the host's BlueZ, in builds with the `bluez` feature); none: no BLE.
    pub adapter: Option<String>,
    /// BLE connections at once on the adapter (1 to 4), separate from
    /// `[jobs] max_parallel`.
    #[serde(default = "default_ble_connections")]
    pub max_connections: usize,
    /// How long scanning, connecting and discovery may take.
    #[serde(default = "default_ble_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

fn default_ble_connections() -> usize {
    1
}

fn default_ble_timeout() -> Duration {
    crate::link::BLE_CONNECT_TIMEOUT
}

impl Default for BleConfig {
    fn default() -> Self {
        Self {
            adapter: None,
            max_connections: default_ble_connections(),
            connect_timeout: default_ble_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "default_cache_mib")]
    pub max_size_mib: u64,
    /// The largest image a notice may announce; default: the cache size.
    /// A larger notice is answered -2 and nothing is downloaded.
    pub max_image_mib: Option<u64>,
    /// Where image files are kept; default `<data_dir>/images`. A tmpfs
    /// (images are downloaded again after a reboot) or a bigger partition.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

impl CacheConfig {
    /// The largest image in bytes (validated: no overflow).
    pub fn max_image_bytes(&self) -> u64 {
        self.max_image_mib
            .unwrap_or(self.max_size_mib)
            .saturating_mul(1 << 20)
    }
}

fn default_cache_mib() -> u64 {
    1024
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size_mib: default_cache_mib(),
            max_image_mib: None,
            dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimitsConfig {
    /// What runs plugin code: "auto" (native code where Cranelift has a
    /// backend, the Pulley interpreter elsewhere, e.g. armv7), "native" or
    /// "pulley".
    #[serde(default = "default_engine")]
    pub engine: String,
    #[serde(default = "default_plugin_memory")]
    pub memory_mib: usize,
    #[serde(default = "default_plugin_cpu", with = "humantime_serde")]
    pub cpu: Duration,
    #[serde(default = "default_job_deadline", with = "humantime_serde")]
    pub job_deadline: Duration,
    /// Hot reload: load new and changed plugin files while running.
    #[serde(default = "default_true")]
    pub watch: bool,
    /// How long a plugin file must stay unchanged before it is loaded (a
    /// copy in progress is never read).
    #[serde(default = "default_settle", with = "humantime_serde")]
    pub settle: Duration,
    /// How often the directory is listed besides file system events.
    #[serde(default = "default_rescan", with = "humantime_serde")]
    pub rescan: Duration,
    /// Public keys (`otagw plugin keygen`, `wasmsign2 keygen`) whose
    /// signatures make a plugin trusted.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// How many of them must have signed (k of n).
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    /// Whether a file dropped into plugins_dir must be signed to load.
    #[serde(default)]
    pub require_signatures: bool,
    /// Whether a plugin may go below the highest security version that
    /// passed probation here.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// A remotely updated plugin is on probation for its next
    /// `probation_jobs` jobs or `probation_time`, whichever ends first;
    /// `probation_faults` plugin faults (traps, limits) in that time roll
    /// it back.
    #[serde(default = "default_probation_jobs")]
    pub probation_jobs: u32,
    #[serde(default = "default_probation_time", with = "humantime_serde")]
    pub probation_time: Duration,
    #[serde(default = "default_probation_faults")]
    pub probation_faults: u32,
}

fn default_probation_jobs() -> u32 {
    crate::plugin::ledger::ProbationPolicy::default().jobs
}
fn default_probation_time() -> Duration {
    crate::plugin::ledger::ProbationPolicy::default().time
}
fn default_probation_faults() -> u32 {
    crate::plugin::ledger::ProbationPolicy::default().faults
}

fn default_threshold() -> usize {
    1
}

fn default_true() -> bool {
    true
}
fn default_settle() -> Duration {
    Duration::from_secs(1)
}
fn default_rescan() -> Duration {
    Duration::from_secs(10)
}

fn default_engine() -> String {
    "auto".into()
}

fn default_plugin_memory() -> usize {
    64
}
fn default_plugin_cpu() -> Duration {
    Duration::from_secs(5)
}
fn default_job_deadline() -> Duration {
    Duration::from_secs(3600)
}

impl Default for PluginLimitsConfig {
    fn default() -> Self {
        Self {
            engine: default_engine(),
            memory_mib: default_plugin_memory(),
            cpu: default_plugin_cpu(),
            job_deadline: default_job_deadline(),
            watch: true,
            settle: default_settle(),
            rescan: default_rescan(),
            trusted_keys: Vec::new(),
            threshold: default_threshold(),
            require_signatures: false,
            allow_downgrade: false,
            probation_jobs: default_probation_jobs(),
            probation_time: default_probation_time(),
            probation_faults: default_probation_faults(),
        }
    }
}

impl PluginLimitsConfig {
    /// How remote plugin updates are watched.
    pub fn probation(&self) -> crate::plugin::ledger::ProbationPolicy {
        crate::plugin::ledger::ProbationPolicy {
            jobs: self.probation_jobs,
            time: self.probation_time,
            faults: self.probation_faults,
        }
    }

    pub fn limits(&self, max_parallel: usize) -> crate::plugin::Limits {
        crate::plugin::Limits {
            // Validated.
            engine: crate::plugin::EngineKind::from_config(&self.engine)
                .unwrap_or_else(|_| crate::plugin::EngineKind::for_this_target()),
            // Validated: within PLUGIN_MEMORY_MIB, so this fits any usize.
            memory: self.memory_mib.saturating_mul(1 << 20),
            cpu: self.cpu,
            job: self.job_deadline,
            // Room for every running job plus loading and identify sessions.
            max_instances: u32::try_from(max_parallel)
                .unwrap_or(u32::MAX)
                .saturating_mul(2)
                .max(8),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub product_key: String,
    pub device_name: String,
    pub device_secret: Option<String>,
    pub family: String,
    pub link: String,
    pub version: String,
    #[serde(default = "default_module")]
    pub module: String,
    /// The family's device options (`otagw plugins --family F` lists them).
    /// Values may be written as TOML strings, numbers or booleans
    /// (`retries = 5`, `erase = true`); the family's schema checks them.
    #[serde(default, deserialize_with = "option_values")]
    pub options: BTreeMap<String, String>,
    /// Labels to select leaves by in a rollout (`otagw upgrade --tag`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The `[[bus]]` this leaf shares with others; none: its link is a bus
    /// of its own (one job at a time).
    pub bus: Option<String>,
}

/// Device option values as text, whichever TOML scalar they were written as.
fn option_values<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Float(f64),
        Boolean(bool),
        Other(toml::Value),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let text = match v {
                Scalar::Text(s) => s,
                Scalar::Integer(n) => n.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Boolean(b) => b.to_string(),
                Scalar::Other(other) => {
                    return Err(serde::de::Error::custom(format!(
                        "device option `{k}` = {other}: write a string, a number or true/false"
                    )));
                }
            };
            Ok((k, text))
        })
        .collect()
}

fn default_module() -> String {
    "default".into()
}

impl DeviceConfig {
    pub fn options_vec(&self) -> Vec<(String, String)> {
        self.options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// `v` of the setting `what` must be within `range`.
fn within<T: PartialOrd + std::fmt::Display>(
    what: &str,
    v: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), String> {
    if range.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "{what} = {v} is out of range: it must be within {}..={}",
            range.start(),
            range.end()
        ))
    }
}

impl Config {
    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate configuration text read from `path`: relative
    /// paths in it (data_dir, plugins_dir, cache dir, trusted_keys, ca_file) are taken
    /// relative to the file's directory, not to wherever the gateway was
    /// started (`/` under systemd).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new("")));
        cfg.validate().map_err(|what| ConfigError::Invalid {
            path: path.to_path_buf(),
            what,
        })?;
        Ok(cfg)
    }

    /// The most memory the gateway may need at once, in MiB: every job's
    /// plugin at its memory limit, plus the gateway itself
    /// ([`GATEWAY_MEMORY_MIB`]).
    pub fn memory_budget_mib(&self) -> u64 {
        (self.jobs.max_parallel as u64).saturating_mul(self.plugins.memory_mib as u64)
            + GATEWAY_MEMORY_MIB
    }

    /// What to say when this process runs under a memory limit (`limit`,
    /// bytes: systemd's MemoryMax, see [`own_memory_limit`]) below
    /// [`Config::memory_budget_mib`]: the kernel would kill the gateway
    /// before a plugin reaches its own limit.
    pub fn memory_limit_warning(&self, limit: Option<u64>) -> Option<String> {
        let limit_mib = limit? >> 20;
        let budget = self.memory_budget_mib();
        (limit_mib < budget).then(|| {
            format!(
                "this service may use {limit_mib} MiB (systemd's MemoryMax), less than the \
                 {budget} MiB its configuration allows ([jobs] max_parallel {} x [plugins] \
                 memory_mib {} + {GATEWAY_MEMORY_MIB} MiB for the gateway): raise MemoryMax \
                 (`systemctl edit otagw`) or lower max_parallel or memory_mib",
                self.jobs.max_parallel, self.plugins.memory_mib
            )
        })
    }

    /// What is allowed but probably not meant: listeners beyond loopback
    /// with no authentication.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(a) = self.api.listen
            && !a.ip().is_loopback()
        {
            out.push(format!(
                "[api] listen = \"{a}\" is reachable beyond this machine and the API's reads \
                 need no token: anyone on that network sees every device, job and campaign \
                 (changes need the API token; listen on 127.0.0.1 unless a firewall or proxy \
                 guards it)"
            ));
        }
        if let Some(b) = self.local_broker.listen
            && !b.ip().is_loopback()
        {
            out.push(format!(
                "[local_broker] listen = \"{b}\" is reachable beyond this machine and the \
                 embedded broker has no authentication: anyone on that network can {} \
                 (listen on 127.0.0.1 unless the leaves need it)",
                if self.upstream.is_none() {
                    "push upgrade notices (standalone mode)"
                } else {
                    "publish and subscribe on it"
                }
            ));
        }
        out
    }

    /// Make every relative path in the configuration relative to `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let at = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        at(&mut self.gateway.data_dir);
        at(&mut self.gateway.plugins_dir);
        if let Some(d) = self.cache.dir.as_mut() {
            at(d);
        }
        for p in [
            &mut self.api.token_file,
            &mut self.api.tls_cert,
            &mut self.api.tls_key,
        ]
        .into_iter()
        .flatten()
        {
            at(p);
        }
        self.plugins.trusted_keys.iter_mut().for_each(at);
        if let Some(u) = self.upstream.as_mut()
            && let Some(ca) = u.ca_file.as_mut()
        {
            at(ca);
        }
    }

    fn validate(&self) -> Result<(), String> {
        let g = &self.gateway;
        if g.product_key.is_empty() || g.device_name.is_empty() {
            return Err("[gateway] product_key and device_name must not be empty".into());
        }
        match &self.upstream {
            None => {
                if self.local_broker.listen.is_none() {
                    return Err(
                        "standalone mode (no [upstream]) needs [local_broker] listen: the embedded broker is the upstream"
                            .into(),
                    );
                }
            }
            Some(u) => {
                if let Some(ca) = &u.ca_file
                    && !ca.is_file()
                {
                    return Err(format!(
                        "[upstream] ca_file {} does not exist (the PEM file of the CA that \
                         signed the broker's certificate; leave ca_file out to trust the \
                         system's CAs)",
                        ca.display()
                    ));
                }
                let url = url::Url::parse(&u.url)
                    .map_err(|e| format!("[upstream] url {:?}: {e}", u.url))?;
                if !matches!(url.scheme(), "mqtt" | "mqtts") || url.host_str().is_none() {
                    return Err(format!(
                        "[upstream] url {:?} must be mqtt://host[:port] or mqtts://host[:port]",
                        u.url
                    ));
                }
                within(
                    "[upstream] max_message_kib",
                    u.max_message_kib,
                    MAX_MESSAGE_KIB,
                )?;
                let ka = u.keep_alive.as_secs();
                if !(30..=1200).contains(&ka) {
                    return Err(format!(
                        "[upstream] keep_alive {ka}s must be within 30s..1200s"
                    ));
                }
                match u.auth {
                    AuthKind::Password if u.username.is_none() || u.password.is_none() => {
                        return Err(
                            "[upstream] auth = \"password\" needs username and password".into()
                        );
                    }
                    AuthKind::Aliyun => {
                        if g.device_secret.is_none() {
                            return Err(
                                "[upstream] auth = \"aliyun\" needs [gateway] device_secret".into(),
                            );
                        }
                        if let Some(d) = self.devices.iter().find(|d| d.device_secret.is_none()) {
                            return Err(format!(
                                "[upstream] auth = \"aliyun\" needs device_secret for every device; {}/{} has none",
                                d.product_key, d.device_name
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        within("[jobs] max_parallel", self.jobs.max_parallel, MAX_PARALLEL)?;
        within(
            "[jobs] flash_restarts",
            self.jobs.flash_restarts,
            FLASH_RESTARTS,
        )?;
        within("[cache] max_size_mib", self.cache.max_size_mib, CACHE_MIB)?;
        if let Some(m) = self.cache.max_image_mib {
            within(
                "[cache] max_image_mib",
                m,
                1..=self.cache.max_size_mib.max(1),
            )?;
        }
        within(
            "[plugins] memory_mib",
            self.plugins.memory_mib,
            PLUGIN_MEMORY_MIB,
        )?;
        crate::plugin::EngineKind::from_config(&self.plugins.engine)
            .map_err(|e| format!("[plugins] {e}"))?;
        if self.plugins.cpu.is_zero() || self.plugins.job_deadline.is_zero() {
            return Err("[plugins] cpu and job_deadline must be longer than 0s".into());
        }
        if self.plugins.rescan.is_zero() {
            return Err("[plugins] rescan must be longer than 0s".into());
        }
        let keys = self.plugins.trusted_keys.len();
        if self.plugins.require_signatures && keys == 0 {
            return Err(
                "[plugins] require_signatures needs trusted_keys (the public keys whose \
                        signatures are trusted; make one with `otagw plugin keygen`)"
                    .into(),
            );
        }
        if keys > 0 {
            within("[plugins] threshold", self.plugins.threshold, 1..=keys)?;
        }
        if self.plugins.probation().watches() && self.plugins.probation_faults == 0 {
            return Err(
                "[plugins] probation_faults must be at least 1 (or set probation_jobs = 0 \
                        and probation_time = \"0s\" to install updates without probation)"
                    .into(),
            );
        }
        for k in &self.plugins.trusted_keys {
            crate::plugin::signing::public_key(k)
                .map_err(|e| format!("[plugins] trusted_keys: {e}"))?;
        }
        if let Some(a) = &self.ble.adapter {
            crate::link::check_ble_adapter(a).map_err(|e| format!("[ble] adapter: {e}"))?;
        }
        within("[ble] max_connections", self.ble.max_connections, 1..=4)?;
        if self.ble.connect_timeout.is_zero() {
            return Err("[ble] connect_timeout must be longer than 0s".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &self.devices {
            let who = format!("{}/{}", d.product_key, d.device_name);
            if d.product_key.is_empty() || d.device_name.is_empty() {
                return Err(format!(
                    "device {who:?}: product_key and device_name must not be empty"
                ));
            }
            if !seen.insert((
                d.product_key.clone(),
                d.device_name.clone(),
                d.module.clone(),
            )) {
                return Err(format!(
                    "device {who} module {} is configured twice",
                    d.module
                ));
            }
            if d.product_key == g.product_key && d.device_name == g.device_name {
                return Err(format!("device {who} is the gateway itself"));
            }
            if d.link.starts_with("ble://") {
                crate::link::ble::BleUrl::parse(&d.link)
                    .map_err(|e| format!("device {who}: {e}"))?;
                if self.ble.adapter.is_none() {
                    return Err(format!(
                        "device {who} is on {} but no [ble] adapter is configured \
                         (adapter = \"hci+tcp://HOST:PORT\" or \"hci+serial:///dev/ttyACM0\")",
                        d.link
                    ));
                }
            } else {
                LinkUrl::parse(&d.link).map_err(|e| format!("device {who}: {e}"))?;
            }
            if d.family.is_empty() {
                return Err(format!("device {who}: family must not be empty"));
            }
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            return Err(
                "[api] tls_cert and tls_key go together: give both (PEM files) or neither".into(),
            );
        }
        self.validate_buses()?;
        crate::rollout::plan::PlanSpec::from_config(&self.jobs.plan)
            .map_err(|e| format!("[jobs.plan] {e}"))?;
        Ok(())
    }

    /// `[[bus]]` entries, the buses devices name, and tags.
    fn validate_buses(&self) -> Result<(), String> {
        let mut declared = BTreeMap::new();
        for b in &self.buses {
            if b.name.trim().is_empty() {
                return Err("[[bus]] name must not be empty".into());
            }
            if b.name == crate::devices::BLE_BUS {
                return Err(format!(
                    "[[bus]] name {:?} is the BLE adapter's own bus: its limit is [ble] \
                     max_connections",
                    b.name
                ));
            }
            within(
                &format!("[[bus]] {:?} max_parallel", b.name),
                b.max_parallel,
                MAX_PARALLEL,
            )?;
            if declared.insert(b.name.as_str(), b.max_parallel).is_some() {
                return Err(format!("[[bus]] {:?} is declared twice", b.name));
            }
        }
        // One physical link is on one bus.
        let mut links: BTreeMap<String, (String, Option<&str>)> = BTreeMap::new();
        for d in &self.devices {
            let who = format!("{}/{}", d.product_key, d.device_name);
            if d.tags.iter().any(|t| t.trim().is_empty()) {
                return Err(format!("device {who}: a tag must not be empty"));
            }
            if let Some(b) = &d.bus {
                if d.link.starts_with("ble://") {
                    return Err(format!(
                        "device {who}: a BLE device is on the adapter's bus ([ble] \
                         max_connections); remove bus = {b:?}"
                    ));
                }
                if !declared.contains_key(b.as_str()) {
                    let known: Vec<&str> = declared.keys().copied().collect();
                    return Err(format!(
                        "device {who}: bus = {b:?} is not declared; add [[bus]] name = {b:?} \
                         (declared: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ));
                }
            }
            let key = crate::devices::link_key(&d.link);
            match links.get(&key) {
                Some((other, bus)) if *bus != d.bus.as_deref() => {
                    return Err(format!(
                        "devices {other} and {who} share the link {} but not the bus: give \
                         both the same bus (one port is one bus)",
                        d.link
                    ));
                }
                Some(_) => {}
                None => {
                    links.insert(key, (who, d.bus.as_deref()));
                }
            }
        }
        Ok(())
    }

    /// How many leaves of `bus` may be upgraded at once.
    pub fn bus_capacity(&self, bus: &str) -> usize {
        if bus == crate::devices::BLE_BUS {
            return self.ble.max_connections;
        }
        self.buses
            .iter()
            .find(|b| b.name == bus)
            .map_or(1, |b| b.max_parallel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
[gateway]
product_key = "gwpk"
device_name = "gw"
data_dir = "/tmp/x"
plugins_dir = "/tmp/p"
"#;

    #[test]
    fn the_default_config_parses() {
        // README's "Running the gateway": the file in gw/, plugins in gw/plugins.
        let cfg = Config::parse(DEFAULT, Path::new("gw/otagw.toml")).expect("default config");
        assert_eq!(cfg.gateway.plugins_dir, Path::new("gw/plugins"));
        assert_eq!(cfg.gateway.data_dir, Path::new("gw/data"));
        let cfg = parse(DEFAULT).expect("default config");
        assert!(cfg.upstream.is_none(), "standalone by default");
        assert_eq!(cfg.devices.len(), 1);
        assert_eq!(cfg.devices[0].options["enter_command"], "update\r");
        assert_eq!(cfg.plugins.cpu, Duration::from_secs(5));
    }

    fn leaf(dn: &str, link: &str, extra: &str) -> String {
        format!(
            "\n[[device]]\nproduct_key = \"p\"\ndevice_name = \"{dn}\"\nfamily = \"xmodem\"\n\
             link = \"{link}\"\nversion = \"1\"\n{extra}\n"
        )
    }

    #[test]
    fn buses_are_declared_shared_by_whole_links_and_bounded() {
        let bus = "\n[[bus]]\nname = \"rs485-1\"\nmax_parallel = 2\n";
        let ok = format!(
            "{MINIMAL}{bus}{}{}{}",
            leaf(
                "a",
                "serial:///dev/ttyS1",
                "bus = \"rs485-1\"\ntags = [\"press\"]"
            ),
            leaf("b", "serial:///dev/ttyS2", "bus = \"rs485-1\""),
            leaf("c", "tcp://h:1", ""),
        );
        let cfg = parse(&ok).unwrap();
        assert_eq!(cfg.bus_capacity("rs485-1"), 2);
        assert_eq!(cfg.bus_capacity("tcp:h:1"), 1, "a link alone: one job");
        assert_eq!(
            cfg.bus_capacity(crate::devices::BLE_BUS),
            cfg.ble.max_connections
        );
        let leaves = crate::devices::Devices::new(&cfg.devices);
        let buses: Vec<&str> = leaves.all().iter().map(|l| l.bus.as_str()).collect();
        assert_eq!(buses, ["rs485-1", "rs485-1", "tcp:h:1"]);
        assert_eq!(leaves.all()[0].tags, ["press"]);
        let refused = |text: String, says: &str| {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(says), "{err:?} does not say {says:?}");
        };
        refused(
            format!("{MINIMAL}{}", leaf("a", "tcp://h:1", "bus = \"rs485-9\"")),
            "bus = \"rs485-9\" is not declared; add [[bus]]",
        );
        refused(
            format!(
                "{MINIMAL}{bus}{}{}",
                leaf("a", "serial:///dev/ttyS1?baud=9600", "bus = \"rs485-1\""),
                leaf("b", "serial:///dev/ttyS1?baud=9600", ""),
            ),
            "share the link serial:///dev/ttyS1?baud=9600 but not the bus",
        );
        refused(format!("{MINIMAL}{bus}{bus}"), "declared twice");
        refused(
            format!("{MINIMAL}\n[[bus]]\nname = \"x\"\nmax_parallel = 0\n"),
            "max_parallel = 0 is out of range",
        );
        refused(
            format!("{MINIMAL}\n[[bus]]\nname = \"ble\"\n"),
            "the BLE adapter's own bus",
        );
        refused(
            format!("{MINIMAL}{}", leaf("a", "tcp://h:1", "tags = [\"\"]")),
            "a tag must not be empty",
        );
    }

    #[test]
    fn the_plan_of_platform_notices_is_checked() {
        let cfg = parse(&format!("{MINIMAL}\n[jobs]\npolicy = \"plan\"\n\n[jobs.plan]\ncanary = \"10%\"\nwaves = [\"2\", \"50%\"]\ncollect = \"5s\"\n")).unwrap();
        assert_eq!(cfg.jobs.policy, Policy::Plan);
        let plan = crate::rollout::PlanSpec::from_config(&cfg.jobs.plan).unwrap();
        assert_eq!(plan.canary, Some(crate::rollout::Size::Percent(10)));
        assert_eq!(plan.waves.len(), 2);
        assert_eq!(cfg.jobs.plan.collect, Duration::from_secs(5));
        let no_canary = parse(&format!("{MINIMAL}\n[jobs.plan]\ncanary = \"0\"\n")).unwrap();
        assert_eq!(
            crate::rollout::PlanSpec::from_config(&no_canary.jobs.plan)
                .unwrap()
                .canary,
            None
        );
        for (bad, says) in [
            ("waves = [\"0%\"]", "[jobs.plan] waves"),
            ("canary = \"half\"", "[jobs.plan] canary"),
            ("success_threshold = 0", "success_threshold"),
            ("min_executed = 0", "min_executed"),
        ] {
            let err = parse(&format!("{MINIMAL}\n[jobs.plan]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert_eq!(parse(MINIMAL).unwrap().jobs.policy, Policy::Immediate);
    }

    #[test]
    fn the_api_token_lives_in_data_dir_unless_configured() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.api_token_path(), Path::new("/tmp/x/api-token"));
        let cfg = Config::parse(
            &format!("{MINIMAL}\n[api]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"secret/token\"\n"),
            Path::new("/etc/otagw/otagw.toml"),
        )
        .unwrap();
        assert_eq!(cfg.api_token_path(), Path::new("/etc/otagw/secret/token"));
        let err = parse(&format!(
            "{MINIMAL}\n[api]\nlisten = \"127.0.0.1:1\"\ntls_cert = \"a.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("tls_cert and tls_key go together"), "{err}");
    }

    #[test]
    fn option_values_may_be_numbers_and_booleans() {
        let text = format!(
            "{MINIMAL}\n[[device]]\nproduct_key = \"p\"\ndevice_name = \"d\"\nfamily = \"xmodem\"\n\
             link = \"tcp://h:1\"\nversion = \"1\"\n\
             options = {{ retries = 5, small_tail = false, filename = \"a.bin\" }}\n"
        );
        let cfg = parse(&text).unwrap();
        let o = &cfg.devices[0].options;
        assert_eq!(o["retries"], "5");
        assert_eq!(o["small_tail"], "false");
        assert_eq!(o["filename"], "a.bin");
        let err = parse(&text.replace("retries = 5", "retries = [5]"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`retries`") && err.contains("a number"),
            "{err}"
        );
    }

    #[test]
    fn ble_devices_need_an_adapter_and_valid_addresses() {
        let device = "[[device]]\nproduct_key = \"p\"\ndevice_name = \"d\"\nfamily = \"smp\"\n\
                      link = \"ble://C4:11:22:33:44:55\"\nversion = \"1\"\n";
        let err = parse(&format!("{MINIMAL}\n{device}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no [ble] adapter"), "{err}");
        let ble = "[ble]\nadapter = \"hci+tcp://127.0.0.1:9000\"\nmax_connections = 2\n";
        let cfg = parse(&format!("{MINIMAL}\n{ble}\n{device}")).unwrap();
        assert_eq!(cfg.ble.max_connections, 2);
        assert_eq!(cfg.ble.connect_timeout, Duration::from_secs(30));
        let err = parse(&format!(
            "{MINIMAL}\n{ble}\n{}",
            device.replace("44:55", "44")
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a Bluetooth address"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[ble]\nadapter = \"bluetooth\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[ble] adapter"), "{err}");
        let err = parse(&format!("{MINIMAL}\n{}", ble.replace("= 2", "= 9")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_connections"), "{err}");
        // BlueZ: only in builds with the feature, and then checked.
        let bluez = parse(&format!("{MINIMAL}\n[ble]\nadapter = \"bluez://hci0\"\n"));
        #[cfg(feature = "bluez")]
        assert!(bluez.is_ok(), "{bluez:?}");
        #[cfg(not(feature = "bluez"))]
        assert!(
            bluez
                .unwrap_err()
                .to_string()
                .contains("without BlueZ support"),
            "a build without the feature says so"
        );
        let err = parse(&format!(
            "{MINIMAL}\n[ble]\nadapter = \"bluez://hci0?x=1\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("[ble] adapter"), "{err}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let public = crate::plugin::signing::keygen(&dir.path().join("k")).unwrap();
        let text = MINIMAL
            .replace("data_dir = \"/tmp/x\"", "data_dir = \"state\"")
            .replace("plugins_dir = \"/tmp/p\"", "plugins_dir = \"plugins\"")
            + "\n[plugins]\ntrusted_keys = [\"k.pub\"]\n";
        let cfg = Config::parse(&text, &dir.path().join("otagw.toml")).unwrap();
        assert_eq!(cfg.gateway.data_dir, dir.path().join("state"));
        assert_eq!(cfg.gateway.plugins_dir, dir.path().join("plugins"));
        assert_eq!(cfg.plugins.trusted_keys, vec![public]);
        // Absolute ones stay as written.
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.gateway.plugins_dir, Path::new("/tmp/p"));
    }

    #[test]
    fn a_missing_ca_file_and_open_listeners_are_reported() {
        let err = parse(&format!(
            "{MINIMAL}\n[upstream]\nurl = \"mqtts://example.com:8883\"\nauth = \"none\"\nca_file = \"/nonexistent/ca.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ca_file /nonexistent/ca.pem does not exist"),
            "{err}"
        );

        assert!(parse(MINIMAL).unwrap().warnings().is_empty());
        let open = parse(&format!(
            "{MINIMAL}\n[api]\nlisten = \"0.0.0.0:8080\"\n[local_broker]\nlisten = \"0.0.0.0:1883\"\n"
        ))
        .unwrap();
        let w = open.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("[api] listen") && w[1].contains("push upgrade notices"),
            "{w:?}"
        );
    }

    #[test]
    fn probation_settings_are_checked() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(
            cfg.plugins.probation(),
            crate::plugin::ledger::ProbationPolicy::default()
        );
        let err = parse(&format!("{MINIMAL}\n[plugins]\nprobation_faults = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("probation_faults must be at least 1"), "{err}");
        let off = parse(&format!(
            "{MINIMAL}\n[plugins]\nprobation_faults = 0\nprobation_jobs = 0\nprobation_time = \"0s\"\nallow_downgrade = true\n"
        ))
        .unwrap();
        assert!(!off.plugins.probation().watches());
        assert!(off.plugins.allow_downgrade);
    }

    #[test]
    fn signature_settings_are_checked() {
        let err = parse(&format!(
            "{MINIMAL}\n[plugins]\nrequire_signatures = true\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("require_signatures needs trusted_keys"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}\n[plugins]\ntrusted_keys = [\"/nonexistent/k.pub\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("trusted_keys") && err.contains("k.pub"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let public = crate::plugin::signing::keygen(&dir.path().join("k")).unwrap();
        let ok = format!(
            "{MINIMAL}\n[plugins]\ntrusted_keys = [{:?}]\nrequire_signatures = true\n",
            public.display().to_string()
        );
        let cfg = parse(&ok).unwrap();
        assert_eq!(cfg.plugins.threshold, 1);
        let err = parse(&format!("{ok}threshold = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("threshold"), "{err}");
    }

    #[test]
    fn unknown_keys_are_an_error() {
        let err = parse(&format!("{MINIMAL}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = parse(&format!(
            "{MINIMAL}\n[api]\nlisten = \"127.0.0.1:1\"\nport = 3\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn validation_names_the_problem() {
        let dev = |link: &str| {
            format!(
                "{MINIMAL}\n[[device]]\nproduct_key=\"p\"\ndevice_name=\"d\"\nfamily=\"xmodem\"\nlink=\"{link}\"\nversion=\"1\"\n"
            )
        };
        assert!(parse(&dev("serial:///dev/ttyS0")).is_ok());
        let err = parse(&dev("com1")).unwrap_err().to_string();
        assert!(err.contains("p/d") && err.contains("bad link URL"), "{err}");
        let twice = format!("{}{}", dev("tcp://h:1"), &dev("tcp://h:2")[MINIMAL.len()..]);
        assert!(parse(&twice).unwrap_err().to_string().contains("twice"));
        let aliyun = format!(
            "{}\n[upstream]\nurl=\"mqtt://h:1883\"\nauth=\"aliyun\"\n",
            dev("tcp://h:1")
        );
        assert!(
            parse(&aliyun)
                .unwrap_err()
                .to_string()
                .contains("device_secret")
        );
        let ka =
            format!("{MINIMAL}\n[upstream]\nurl=\"mqtt://h\"\nauth=\"none\"\nkeep_alive=\"5s\"\n");
        assert!(parse(&ka).unwrap_err().to_string().contains("keep_alive"));
        let scheme = format!("{MINIMAL}\n[upstream]\nurl=\"http://h\"\nauth=\"none\"\n");
        assert!(parse(&scheme).unwrap_err().to_string().contains("mqtt://"));
    }

    #[test]
    fn a_memory_limit_below_what_the_config_allows_is_named() {
        let cfg = parse(MINIMAL).unwrap();
        let budget = cfg.memory_budget_mib();
        assert_eq!(
            budget,
            cfg.jobs.max_parallel as u64 * cfg.plugins.memory_mib as u64 + GATEWAY_MEMORY_MIB
        );
        assert_eq!(cfg.memory_limit_warning(None), None);
        assert_eq!(cfg.memory_limit_warning(Some(budget << 20)), None);
        let w = cfg.memory_limit_warning(Some((budget - 1) << 20)).unwrap();
        assert!(
            w.contains("raise MemoryMax") && w.contains(&format!("{budget} MiB")),
            "{w}"
        );

        // cgroup v2 as systemd sets it up, read from a copy.
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/otagw.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(unit.join("memory.max"), "805306368\n").unwrap();
        let own = "0::/system.slice/otagw.service\n";
        assert_eq!(memory_limit_in(own, root.path()), Some(768 << 20));
        std::fs::write(unit.join("memory.max"), "max\n").unwrap();
        assert_eq!(memory_limit_in(own, root.path()), None);
        assert_eq!(memory_limit_in("1:name=systemd:/\n", root.path()), None);
    }

    #[test]
    fn the_plugin_engine_is_chosen_per_target_unless_configured() {
        use crate::plugin::EngineKind;
        let auto = parse(MINIMAL).unwrap();
        assert_eq!(auto.plugins.limits(1).engine, EngineKind::for_this_target());
        let pulley = parse(&format!("{MINIMAL}\n[plugins]\nengine = \"pulley\"\n")).unwrap();
        assert_eq!(pulley.plugins.limits(1).engine, EngineKind::Pulley);
        let native = parse(&format!("{MINIMAL}\n[plugins]\nengine = \"native\"\n"));
        if cfg!(target_pointer_width = "32") {
            let err = native.unwrap_err().to_string();
            assert!(err.contains("use engine = \"pulley\""), "{err}");
            assert_eq!(EngineKind::for_this_target(), EngineKind::Pulley);
        } else {
            assert_eq!(native.unwrap().plugins.limits(1).engine, EngineKind::Native);
        }
    }

    #[test]
    fn numbers_out_of_range_are_refused_by_name() {
        for (section, key, value, expect) in [
            (
                "jobs",
                "max_parallel",
                "0",
                "max_parallel = 0 is out of range",
            ),
            ("jobs", "max_parallel", "5000", "within 1..=1024"),
            ("jobs", "flash_restarts", "101", "flash_restarts = 101"),
            ("cache", "max_size_mib", "0", "max_size_mib = 0"),
            ("cache", "max_size_mib", "99999999999", "max_size_mib"),
            ("plugins", "memory_mib", "0", "memory_mib = 0"),
            ("plugins", "memory_mib", "4096", "within 1..=2048"),
            ("plugins", "cpu", "\"0s\"", "longer than 0s"),
            (
                "plugins",
                "engine",
                "\"jit\"",
                "use \"auto\", \"native\" or \"pulley\"",
            ),
        ] {
            let text = format!("{MINIMAL}\n[{section}]\n{key} = {value}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expect), "{section}.{key}={value}: {err}");
        }
        // Negative numbers and numbers beyond u64 are parse errors, not wraps.
        let err = parse(&format!("{MINIMAL}\n[jobs]\nmax_parallel = -1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_parallel"), "{err}");
    }

    #[test]
    fn the_image_limit_defaults_to_the_cache_size_and_cannot_exceed_it() {
        let cfg = parse(&format!("{MINIMAL}\n[cache]\nmax_size_mib = 16\n")).unwrap();
        assert_eq!(cfg.cache.max_image_bytes(), 16 << 20);
        let cfg = parse(&format!(
            "{MINIMAL}\n[cache]\nmax_size_mib = 16\nmax_image_mib = 4\n"
        ))
        .unwrap();
        assert_eq!(cfg.cache.max_image_bytes(), 4 << 20);
        let err = parse(&format!(
            "{MINIMAL}\n[cache]\nmax_size_mib = 16\nmax_image_mib = 17\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_image_mib = 17"), "{err}");
        assert_eq!(
            parse(MINIMAL).unwrap().jobs.flash_restarts,
            crate::ota::job::DEFAULT_FLASH_RESTARTS
        );
    }
}
