//! The plugin host: runs device-family plugins (WebAssembly components) in a
//! sandbox on wasmtime.
//!
//! - [`PluginHost`] owns the engine, the linker (the contract's `host` interface
//!   and the bare `wasi:io`/`wasi:cli` std needs, nothing else) and the registry
//!   of loaded families. Loading compiles a component once and caches the result
//!   on disk, keyed by the wasm's sha256 and the engine's compatibility hash.
//! - [`PluginSession`] is one job: a fresh Store from the family's cached
//!   `InstancePre`, bounded in memory (a limiter), CPU (an epoch deadline that
//!   the guest renews by calling the host) and wall time (a job deadline). A trap,
//!   a limit or a deadline fails that session with a [`PluginError`] naming the
//!   plugin and the reason; nothing else is affected.
//!
//! This module does not know where images come from or where links lead.

pub mod bindings;
mod convert;
pub mod host;
pub mod install;
pub mod ledger;
mod loader;
pub mod signing;
pub mod update;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use wasmtime::component::{Linker, Resource};
use wasmtime::{Engine, Store, UpdateDeadline};

use crate::link::{Link, LinkKind, SerialConfig};
use crate::progress::JobEvent;
pub use bindings::Contract;
use bindings::{Family, FamilyPre};
pub use host::{FileImage, ImageHandle, ImageSource, PluginState};
use host::{Stop, human_bytes};
pub(crate) use loader::file_sha256;
pub use loader::{LoadReport, LoadedFrom};
pub use otagw_plugin_sdk::schema;

/// How plugin jobs run: the engine and the resource bounds of every job. Each
/// has a default fit for a gateway.
#[derive(Debug, Clone)]
pub struct Limits {
    /// What runs plugin code: machine code or the portable interpreter.
    pub engine: EngineKind,
    /// Linear memory one plugin instance may grow to.
    pub memory: usize,
    /// How long a plugin may compute without calling the host before it is
    /// stopped (a spinning plugin is caught within this plus one tick).
    pub cpu: Duration,
    /// Wall time for a whole job (verify + flash + identify).
    pub job: Duration,
    /// Plugin instances alive at once (the pooling allocator's size).
    pub max_instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            engine: EngineKind::for_this_target(),
            memory: 64 << 20,
            cpu: Duration::from_secs(5),
            job: Duration::from_secs(3600),
            max_instances: 256,
        }
    }
}

/// What runs plugin code. Chosen per target at build time
/// ([`EngineKind::for_this_target`]) unless `[plugins] engine` says otherwise.
///
/// - `Native`: Cranelift compiles each plugin to this machine's code once
///   (then the compile cache serves it). Cranelift has backends for x86-64,
///   aarch64, riscv64 and s390x only.
/// - `Pulley`: Cranelift compiles to Pulley bytecode, which wasmtime's
///   portable interpreter runs: the only choice on 32-bit ARM (armv7), and a
///   choice anywhere. Plugins spend their time waiting for a serial line, so
///   interpretation costs little (BENCHMARKS.md, 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Native,
    Pulley,
}

impl EngineKind {
    /// Native where Cranelift has a backend for this target, Pulley elsewhere.
    pub const fn for_this_target() -> Self {
        if Self::native_available() {
            EngineKind::Native
        } else {
            EngineKind::Pulley
        }
    }

    /// Whether Cranelift can compile to this machine's code.
    pub const fn native_available() -> bool {
        cfg!(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64",
            target_arch = "s390x"
        ))
    }

    /// Parse `[plugins] engine`: `auto`, `native` or `pulley`.
    pub fn from_config(name: &str) -> Result<Self, String> {
        match name {
            "auto" => Ok(Self::for_this_target()),
            "pulley" => Ok(EngineKind::Pulley),
            "native" if Self::native_available() => Ok(EngineKind::Native),
            "native" => Err(format!(
                "engine = \"native\" is not available on {}: Cranelift has no backend for it; \
                 use engine = \"pulley\" (or \"auto\")",
                std::env::consts::ARCH
            )),
            other => Err(format!(
                "engine = {other:?} is not an engine: use \"auto\", \"native\" or \"pulley\""
            )),
        }
    }

    /// The compiler's target for this engine: `None` for this machine,
    /// else the Pulley target of this machine's pointer width and byte order.
    fn target(self) -> Option<&'static str> {
        match self {
            EngineKind::Native => None,
            EngineKind::Pulley => Some(
                match (
                    cfg!(target_pointer_width = "64"),
                    cfg!(target_endian = "big"),
                ) {
                    (true, false) => "pulley64",
                    (true, true) => "pulley64be",
                    (false, false) => "pulley32",
                    (false, true) => "pulley32be",
                },
            ),
        }
    }

    /// What operators and cache file names see: `native-x86_64`,
    /// `pulley32`.
    pub fn label(self) -> String {
        match self.target() {
            Some(t) => t.to_string(),
            None => format!("native-{}", std::env::consts::ARCH),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineKind::Native => write!(f, "native code ({})", std::env::consts::ARCH),
            EngineKind::Pulley => write!(f, "the Pulley interpreter ({})", self.label()),
        }
    }
}

/// How often the epoch ticks; the CPU limit is counted in these.
const TICK: Duration = Duration::from_millis(50);

/// Why a plugin could not be loaded or a plugin job failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the plugins directory {0} does not exist: create it and copy the device families' \
         .wasm files there (or point plugins_dir / --plugins-dir at where they are)"
    )]
    NoDir(PathBuf),
    #[error("plugin {path} is not a valid component: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "plugin {path} is built for contract {found}; this gateway runs otagw:plugin {} \
         (rebuild the plugin against one of those, or update the gateway)",
        Contract::supported_range()
    )]
    Contract { path: PathBuf, found: String },
    #[error(
        "plugin {path} says it is built for contract {claimed} but exports otagw:plugin/plugin@{exported}"
    )]
    ContractMismatch {
        path: PathBuf,
        claimed: String,
        exported: Contract,
    },
    #[error("plugin {path} imports {}, which plugins may not use (only otagw:plugin/host, wasi:io and wasi:cli)", imports.join(", "))]
    ForbiddenImport { path: PathBuf, imports: Vec<String> },
    #[error("plugin {path} failed to start: {reason}")]
    Instantiate { path: PathBuf, reason: String },
    #[error("plugin {path} describes itself badly: {reason}")]
    Describe { path: PathBuf, reason: String },
    #[error(
        "plugin {path} is refused: {reason} ([plugins] require_signatures; sign it with \
         `otagw plugin sign --key KEY` for a key in trusted_keys)"
    )]
    Signature { path: PathBuf, reason: String },
    #[error("plugins {first} and {second} both claim family {family:?}")]
    Duplicate {
        family: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("no plugin for device family {0:?}")]
    UnknownFamily(String),
    #[error("the plugin engine could not be set up: {0}")]
    Engine(String),
    #[error(
        "plugin {plugin} exceeded its memory limit of {limit} in {call} (it asked for {wanted} bytes)"
    )]
    Memory {
        plugin: String,
        call: &'static str,
        limit: String,
        wanted: usize,
    },
    #[error(
        "plugin {plugin} ran for over {limit:?} without calling the host in {call}: stopped (CPU limit)"
    )]
    Cpu {
        plugin: String,
        call: &'static str,
        limit: Duration,
    },
    #[error("plugin {plugin} did not finish {call} within the job deadline of {limit:?}")]
    Deadline {
        plugin: String,
        call: &'static str,
        limit: Duration,
    },
    #[error("plugin {plugin} trapped in {call}: {reason}")]
    Trap {
        plugin: String,
        call: &'static str,
        reason: String,
    },
    #[error("device options for family {family} are not valid: {}; nothing was sent to the device (fix the device's options; `otagw check` lists them all)", problems.join("; "))]
    Options {
        family: String,
        problems: Vec<String>,
    },
    #[error("plugin {plugin} {call}: {error}")]
    Failed {
        plugin: String,
        call: &'static str,
        error: FlashError,
    },
    #[error("{0}")]
    Link(#[from] crate::link::LinkError),
}

/// The plugin's own account of a failure (the contract's `flash-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlashError {
    #[error("image rejected: {0}")]
    Verify(String),
    #[error("transfer failed: {0}")]
    Transfer(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("device timeout: {0}")]
    Timeout(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("device options: {0}")]
    Options(String),
    #[error("{0}")]
    Other(String),
}

impl PluginError {
    /// The upstream OTA step code this failure is reported with: -3 for an
    /// image the plugin rejected, -4 for a device or transfer failure, -1 for
    /// anything else (including a broken plugin).
    pub fn step_code(&self) -> i32 {
        match self {
            PluginError::Failed { error, .. } => match error {
                FlashError::Verify(_) => -3,
                FlashError::Transfer(_) | FlashError::Device(_) | FlashError::Timeout(_) => -4,
                FlashError::Unsupported(_) | FlashError::Options(_) | FlashError::Other(_) => -1,
            },
            PluginError::Link(_) => -4,
            _ => -1,
        }
    }
}

impl PluginError {
    /// Whether the plugin itself failed (a trap, a resource limit, a
    /// broken instance or contract) rather than the device, the link, the
    /// image or the configuration: what a plugin's probation after an update
    /// counts.
    pub fn is_plugin_fault(&self) -> bool {
        matches!(
            self,
            PluginError::Trap { .. }
                | PluginError::Memory { .. }
                | PluginError::Cpu { .. }
                | PluginError::Deadline { .. }
                | PluginError::Instantiate { .. }
                | PluginError::ContractMismatch { .. }
        )
    }
}

/// What a plugin says about itself (`describe`), whatever its contract version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyInfo {
    pub name: String,
    pub version: String,
    /// The contract version the plugin runs under (by what it exports).
    pub contract: Contract,
    /// The contract version it names in `describe` (a 0.2.x for 0.2).
    pub contract_claimed: String,
    pub description: String,
    pub transports: Vec<LinkKind>,
    /// Kinds of link the plugin names that this gateway does not offer.
    pub other_transports: Vec<String>,
    pub default_serial: Option<SerialConfig>,
    pub default_gatt: Option<GattDefaults>,
    /// The device options the family understands; `None` for plugins built
    /// against contract 0.1, which has no schema (their options reach them
    /// as written).
    pub options: Option<Vec<schema::OptionSpec>>,
}

/// The characteristics a family uses by default on BLE links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GattDefaults {
    pub service: String,
    pub write: String,
    pub write_with_response: bool,
    pub notify: String,
}

impl GattDefaults {
    /// The plan a BLE link opens with; `None` when a UUID is malformed (the
    /// loader refuses such plugins, so this does not happen to loaded ones).
    pub fn plan(&self) -> Option<crate::link::ble::GattPlan> {
        use crate::link::gatt::parse_uuid;
        Some(crate::link::ble::GattPlan {
            service: parse_uuid(&self.service).ok()?,
            write: parse_uuid(&self.write).ok()?,
            write_with_response: self.write_with_response,
            notify: parse_uuid(&self.notify).ok()?,
        })
    }
}

impl FamilyInfo {
    /// The options' schema as JSON (`null` without one): name, kind,
    /// default (a secret's shown masked), required, secret, doc.
    pub fn options_json(&self) -> serde_json::Value {
        match &self.options {
            None => serde_json::Value::Null,
            Some(specs) => specs
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "kind": s.kind.describe(),
                        "default": s.default.as_ref().map(|v| schema::shown(s, v)),
                        "required": s.required,
                        "secret": s.secret,
                        "doc": s.doc,
                    })
                })
                .collect(),
        }
    }

    /// How a BLE link of this family opens, when the family works over BLE.
    pub fn gatt_plan(&self) -> Option<crate::link::ble::GattPlan> {
        self.default_gatt.as_ref().and_then(GattDefaults::plan)
    }
}

/// A loaded plugin: its description and a pre-linked, ready-to-instantiate component.
/// Who may sign plugins (`[plugins] trusted_keys`, `threshold`), and
/// whether a file in the plugins directory must be signed to load
/// (`require_signatures`; remote updates always are checked).
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub keys: Vec<(PathBuf, wasmsign2::PublicKey)>,
    pub threshold: usize,
    pub require_local: bool,
}

impl Trust {
    /// Read the public keys of `[plugins] trusted_keys`.
    pub fn load(
        keys: &[PathBuf],
        threshold: usize,
        require_local: bool,
    ) -> Result<Trust, signing::SignError> {
        let keys = keys
            .iter()
            .map(|p| Ok((p.clone(), signing::public_key(p)?)))
            .collect::<Result<Vec<_>, signing::SignError>>()?;
        Ok(Trust {
            keys,
            threshold,
            require_local,
        })
    }
}

pub struct LoadedPlugin {
    pub info: FamilyInfo,
    pub path: PathBuf,
    pub sha256: String,
    pub loaded_from: LoadedFrom,
    pub load_time: Duration,
    pre: FamilyPre,
}

impl LoadedPlugin {
    /// The kinds of link it works over, as operators write them.
    pub fn transport_names(&self) -> Vec<String> {
        self.info
            .transports
            .iter()
            .map(|t| format!("{t:?}").to_lowercase())
            .chain(self.info.other_transports.iter().cloned())
            .collect()
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("info", &self.info)
            .field("path", &self.path)
            .field("loaded_from", &self.loaded_from)
            .finish_non_exhaustive()
    }
}

/// Owns the engine and the registry of loaded plugins.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<PluginState>,
    limits: Limits,
    cache_dir: Option<PathBuf>,
    plugins: RwLock<BTreeMap<String, Arc<LoadedPlugin>>>,
    /// Plugin files that did not load, with why (the last attempt of each).
    broken: RwLock<BTreeMap<PathBuf, String>>,
    /// Who may sign plugins, and whether the plugins directory needs it.
    trust: RwLock<Trust>,
    ticker_stop: Arc<AtomicBool>,
    compact: bool,
}

/// The engine's configuration: the target of `limits.engine`, epochs, no
/// component-model async, on 64-bit targets a pooling allocator sized for
/// `limits`; `reservation` overrides wasmtime's address space reservation per
/// linear memory.
fn engine_config(
    limits: &Limits,
    reservation: Option<u64>,
) -> Result<wasmtime::Config, PluginError> {
    let mut config = wasmtime::Config::new();
    if let Some(target) = limits.engine.target() {
        config
            .target(target)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
    }
    config.epoch_interruption(true);
    // Host calls are ~2.5x cheaper without the component-model-async machinery.
    config.concurrency_support(false);
    let mut pool = wasmtime::PoolingAllocationConfig::default();
    let n = limits.max_instances.max(1);
    pool.total_component_instances(n)
        .total_core_instances(n * 4)
        .total_memories(n * 2)
        .total_tables(n * 4)
        .max_memories_per_component(4)
        .max_tables_per_component(8)
        .max_memory_size(limits.memory)
        .total_stacks(n);
    // A 32-bit address space (3 GiB) holds no pool of `max_instances`
    // slots of `memory` each: there each instance maps its memory when it
    // starts, with wasmtime's 32-bit defaults (a small reservation, memories
    // that move as they grow); the store's limiter still bounds them.
    if cfg!(target_pointer_width = "64") {
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    if let Some(bytes) = reservation {
        config.memory_reservation(bytes);
    }
    Ok(config)
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("limits", &self.limits)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl PluginHost {
    /// Set up the engine. `cache_dir` holds compiled plugins (created if
    /// missing); `None` compiles every time.
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        // wasmtime's default reserves 4 GiB of address space per memory slot
        // (2 slots per instance), so plugin code needs no bounds checks: ~4 TiB
        // at `max_parallel = 256`. That is nothing on x86-64 (128 TiB), but an
        // arm64 kernel with 39-bit addresses has 512 GiB in all. Where the
        // pool does not fit, reserve only the memory limit per slot; plugin
        // code then checks bounds (~4 % more gateway CPU per job in the
        // fan-out benchmark, BENCHMARKS.md).
        let (engine, compact) = match Engine::new(&engine_config(&limits, None)?) {
            Ok(engine) => (engine, false),
            Err(first) => {
                let engine = Engine::new(&engine_config(&limits, Some(limits.memory as u64))?)
                    .map_err(|e| PluginError::Engine(format!("{e:#} (first: {first:#})")))?;
                tracing::warn!(
                    max_instances = limits.max_instances,
                    "the plugin pool does not fit this machine's address space ({first:#}); \
                     reserving only the memory limit per plugin (bounds-checked, slower)"
                );
                (engine, true)
            }
        };

        let mut linker = Linker::new(&engine);
        add_wasi_std_interfaces(&mut linker).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        bindings::add_to_linker(&mut linker).map_err(|e| PluginError::Engine(format!("{e:#}")))?;

        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|source| PluginError::Read {
                path: dir.clone(),
                source,
            })?;
        }

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("otagw-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PluginError::Engine(format!("epoch thread: {e}")))?;
        }

        Ok(Self {
            engine,
            linker,
            limits,
            cache_dir,
            plugins: RwLock::new(BTreeMap::new()),
            broken: RwLock::new(BTreeMap::new()),
            trust: RwLock::new(Trust::default()),
            ticker_stop,
            compact,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the instance pool reserves only the memory limit per plugin
    /// memory (the address space did not hold the default reservation; see
    /// [`PluginHost::new`]).
    pub fn compact_address_space(&self) -> bool {
        self.compact
    }

    /// The plugin of a family.
    pub fn get(&self, family: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(family)
            .cloned()
    }

    /// Set who may sign plugins (before loading the directory).
    pub fn set_trust(&self, trust: Trust) {
        *self.trust.write().unwrap_or_else(|e| e.into_inner()) = trust;
    }

    /// Who may sign plugins.
    pub fn trust(&self) -> Trust {
        self.trust.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Load a file of the plugins directory: with `require_signatures`, only
    /// when enough trusted keys signed it.
    pub async fn load_local(&self, path: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
        let trust = self.trust.read().unwrap_or_else(|e| e.into_inner()).clone();
        if trust.require_local {
            let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            signing::verify(&bytes, &trust.keys, trust.threshold).map_err(|e| {
                PluginError::Signature {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
        }
        self.load_file(path).await
    }

    /// Plugin files that failed to load, with the reason (cleared when the
    /// file loads or goes away).
    pub fn broken(&self) -> BTreeMap<PathBuf, String> {
        self.broken
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_broken(&self, path: &Path, why: Option<String>) {
        let mut broken = self.broken.write().unwrap_or_else(|e| e.into_inner());
        match why {
            Some(why) => broken.insert(path.to_path_buf(), why),
            None => broken.remove(path),
        };
    }

    /// Forget the family `path` provided, if any (its file went away or now
    /// provides another family); jobs that hold it finish on it.
    pub(crate) fn unregister_path(&self, path: &Path, except: Option<&str>) -> Vec<String> {
        let mut map = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = map
            .iter()
            .filter(|(name, p)| p.path == path && Some(name.as_str()) != except)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            map.remove(name);
        }
        gone
    }

    /// Every loaded plugin, by family name.
    pub fn families(&self) -> Vec<Arc<LoadedPlugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Start a job with a family's plugin: a fresh, bounded Store and instance.
    pub async fn session(
        &self,
        family: &str,
        events: Option<mpsc::UnboundedSender<JobEvent>>,
    ) -> Result<PluginSession, PluginError> {
        let plugin = self
            .get(family)
            .ok_or_else(|| PluginError::UnknownFamily(family.to_string()))?;
        PluginSession::start(self, plugin, events).await
    }

    fn new_store(
        &self,
        plugin: &str,
        events: Option<mpsc::UnboundedSender<JobEvent>>,
    ) -> Store<PluginState> {
        let state = PluginState::new(
            plugin.to_string(),
            self.limits.memory,
            events,
            self.limits.job,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        let cpu_ticks = (self.limits.cpu.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let st = ctx.data_mut();
            st.ticks_without_host += 1;
            if st.ticks_without_host > cpu_ticks {
                st.stop = Some(Stop::Cpu);
                return Err(wasmtime::Error::msg("CPU limit"));
            }
            // Yield so a busy plugin never holds a runtime thread for long.
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }
}

/// Link exactly the `wasi:io` and `wasi:cli` interfaces a std guest imports,
/// over an empty context. No filesystem, sockets, clocks or random: a plugin
/// importing those fails to load.
fn add_wasi_std_interfaces(l: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::p2::bindings::cli;

    struct Io;
    impl wasmtime::component::HasData for Io {
        type Data<'a> = &'a mut wasmtime::component::ResourceTable;
    }
    fn io(s: &mut PluginState) -> &mut wasmtime::component::ResourceTable {
        &mut s.table
    }
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<PluginState, Io>(l, io)?;
    wasmtime_wasi_io::bindings::wasi::io::poll::add_to_linker::<PluginState, Io>(l, io)?;
    wasmtime_wasi_io::bindings::wasi::io::streams::add_to_linker::<PluginState, Io>(l, io)?;
    let c = <PluginState as WasiCliView>::cli;
    cli::exit::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::environment::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::stdin::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::stdout::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::stderr::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::terminal_input::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::terminal_output::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::terminal_stdin::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::terminal_stdout::add_to_linker::<PluginState, WasiCli>(l, c)?;
    cli::terminal_stderr::add_to_linker::<PluginState, WasiCli>(l, c)?;
    Ok(())
}

/// What the gateway tells a plugin about a job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobMeta {
    pub version: Option<String>,
    pub module: String,
    pub options: Vec<(String, String)>,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub version: Option<String>,
    pub payload_size: u64,
    pub summary: String,
}

/// What `flash` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashReport {
    pub bytes_sent: u64,
    pub retries: u32,
    pub summary: String,
}

/// What `identify` read (the SDK's type: the same fields a plugin answers with).
pub use otagw_plugin_sdk::DeviceInfo;

/// One job's instance of a plugin.
pub struct PluginSession {
    plugin: Arc<LoadedPlugin>,
    store: Store<PluginState>,
    bindings: Family,
    deadline: tokio::time::Instant,
    limits: Limits,
    /// Set once a call failed in a way that leaves the instance unusable.
    poisoned: bool,
}

impl std::fmt::Debug for PluginSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSession")
            .field("plugin", &self.plugin.info.name)
            .finish_non_exhaustive()
    }
}

impl PluginSession {
    async fn start(
        host: &PluginHost,
        plugin: Arc<LoadedPlugin>,
        events: Option<mpsc::UnboundedSender<JobEvent>>,
    ) -> Result<Self, PluginError> {
        let mut store = host.new_store(&plugin.info.name, events);
        let bindings =
            plugin
                .pre
                .instantiate(&mut store)
                .await
                .map_err(|e| PluginError::Instantiate {
                    path: plugin.path.clone(),
                    reason: format!("{e:#}"),
                })?;
        Ok(Self {
            deadline: tokio::time::Instant::now() + host.limits.job,
            limits: host.limits.clone(),
            plugin,
            store,
            bindings,
            poisoned: false,
        })
    }

    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    /// Give this job a deadline of its own, `limit` from now (e.g. a slow
    /// link's longer one), instead of the host's default.
    pub fn set_deadline(&mut self, limit: Duration) {
        self.deadline = tokio::time::Instant::now() + limit;
        self.limits.job = limit;
    }

    /// Run one export under the job deadline and turn every way it can end
    /// into a typed result.
    async fn call<R, F>(&mut self, call: &'static str, f: F) -> Result<R, PluginError>
    where
        F: AsyncFnOnce(&Family, &mut Store<PluginState>) -> wasmtime::Result<Result<R, FlashError>>,
    {
        let name = self.plugin.info.name.clone();
        if self.poisoned {
            return Err(PluginError::Trap {
                plugin: name,
                call,
                reason: "the instance is unusable after an earlier failure".into(),
            });
        }
        let bindings = &self.bindings;
        let store = &mut self.store;
        let outcome = tokio::time::timeout_at(self.deadline, f(bindings, store)).await;
        match outcome {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(error))) => Err(PluginError::Failed {
                plugin: name,
                call,
                error,
            }),
            Ok(Err(trap)) => {
                self.poisoned = true;
                Err(self.classify(call, trap))
            }
            Err(_elapsed) => {
                self.poisoned = true;
                Err(PluginError::Deadline {
                    plugin: name,
                    call,
                    limit: self.limits.job,
                })
            }
        }
    }

    fn classify(&self, call: &'static str, err: wasmtime::Error) -> PluginError {
        let st = self.store.data();
        let plugin = st.plugin.clone();
        match st.stop.clone() {
            Some(Stop::Memory { wanted }) => PluginError::Memory {
                plugin,
                call,
                limit: human_bytes(self.limits.memory),
                wanted,
            },
            Some(Stop::Cpu) => PluginError::Cpu {
                plugin,
                call,
                limit: self.limits.cpu,
            },
            None => {
                let mut reason = match err.downcast_ref::<wasmtime::Trap>() {
                    Some(t) => t.to_string(),
                    None => format!("{err:#}"),
                };
                let said = st.captured_tail();
                if !said.is_empty() {
                    reason = format!("{reason}; the plugin said: {said}");
                }
                PluginError::Trap {
                    plugin,
                    call,
                    reason,
                }
            }
        }
    }

    fn push_image(
        &mut self,
        image: Arc<dyn ImageSource>,
    ) -> Result<Resource<ImageHandle>, PluginError> {
        self.store
            .data_mut()
            .table
            .push(ImageHandle(image))
            .map_err(|e| PluginError::Engine(e.to_string()))
    }

    /// Check a device's options for this job: against the family's schema
    /// (contract 0.2; unknown keys, types, ranges, required options), then
    /// with the plugin's own `check-options`. Nothing reaches the device or
    /// the plugin's job calls with options that fail here. Contract 0.1
    /// plugins have no schema and take their options as written.
    pub async fn check_options(&mut self, raw: &[(String, String)]) -> Result<(), PluginError> {
        self.options_for(raw).await.map(|_| ())
    }

    async fn options_for(&mut self, raw: &[(String, String)]) -> Result<JobOptions, PluginError> {
        let family = self.plugin.info.name.clone();
        let Some(specs) = &self.plugin.info.options else {
            return Ok(JobOptions::Written(raw.to_vec()));
        };
        let checked = schema::check(specs, raw).map_err(|problems| PluginError::Options {
            family: family.clone(),
            problems: problems.iter().map(ToString::to_string).collect(),
        })?;
        let typed = convert::options_to_wit(checked);
        let verdict = self
            .call("check-options", async |b, s| match b {
                Family::V0_2_0(b) => b
                    .otagw_plugin_plugin()
                    .call_check_options(s, &typed)
                    .await
                    .map(Ok),
                Family::V0_1_0(_) => Err(wasmtime::Error::msg(
                    "a contract 0.1 plugin has no check-options",
                )),
            })
            .await?;
        verdict.map_err(|problems| PluginError::Options {
            family,
            problems: problems
                .into_iter()
                .map(|p| match p.name {
                    Some(name) => format!("option `{name}`: {}", p.message),
                    None => p.message,
                })
                .collect(),
        })?;
        Ok(JobOptions::Typed(typed))
    }

    /// Check an image before any device is touched.
    pub async fn verify(
        &mut self,
        image: Arc<dyn ImageSource>,
        meta: &JobMeta,
    ) -> Result<ImageInfo, PluginError> {
        let options = self.options_for(&meta.options).await?;
        let img = self.push_image(image)?;
        let r = self
            .call("verify", async |b, s| {
                let image = Resource::new_borrow(img.rep());
                match (b, options) {
                    (Family::V0_1_0(b), JobOptions::Written(options)) => {
                        let meta = v0_1_meta(meta, options);
                        let r = b.otagw_plugin_plugin().call_verify(s, image, &meta).await?;
                        Ok(r.map(ImageInfo::from).map_err(FlashError::from))
                    }
                    (Family::V0_2_0(b), JobOptions::Typed(options)) => {
                        let meta = v0_2_meta(meta, options);
                        let r = b.otagw_plugin_plugin().call_verify(s, image, &meta).await?;
                        Ok(r.map(ImageInfo::from).map_err(FlashError::from))
                    }
                    _ => Err(mismatch()),
                }
            })
            .await;
        let _ = self.store.data_mut().table.delete(img);
        r
    }

    /// Put an image on the device behind `link`. The link comes back whatever happens.
    pub async fn flash(
        &mut self,
        link: Link,
        image: Arc<dyn ImageSource>,
        meta: &JobMeta,
    ) -> (Link, Result<FlashReport, PluginError>) {
        let options = match self.options_for(&meta.options).await {
            Ok(o) => o,
            Err(e) => return (link, Err(e)),
        };
        let link_res = self.push_link(link);
        let img = match self.push_image(image) {
            Ok(i) => i,
            Err(e) => return (self.take_link(link_res), Err(e)),
        };
        let r = self
            .call("flash", async |b, s| {
                let link = Resource::new_borrow(link_res.rep());
                let image = Resource::new_borrow(img.rep());
                match (b, options) {
                    (Family::V0_1_0(b), JobOptions::Written(options)) => {
                        let meta = v0_1_meta(meta, options);
                        let r = b
                            .otagw_plugin_plugin()
                            .call_flash(s, link, image, &meta)
                            .await?;
                        Ok(r.map(FlashReport::from).map_err(FlashError::from))
                    }
                    (Family::V0_2_0(b), JobOptions::Typed(options)) => {
                        let meta = v0_2_meta(meta, options);
                        let r = b
                            .otagw_plugin_plugin()
                            .call_flash(s, link, image, &meta)
                            .await?;
                        Ok(r.map(FlashReport::from).map_err(FlashError::from))
                    }
                    _ => Err(mismatch()),
                }
            })
            .await;
        let _ = self.store.data_mut().table.delete(img);
        let link = self.take_link(link_res);
        (link, r)
    }

    /// Read the running version from the device.
    pub async fn identify(
        &mut self,
        link: Link,
        options: &[(String, String)],
    ) -> (Link, Result<DeviceInfo, PluginError>) {
        let options = match self.options_for(options).await {
            Ok(o) => o,
            Err(e) => return (link, Err(e)),
        };
        let link_res = self.push_link(link);
        let r = self
            .call("identify", async |b, s| {
                let link = Resource::new_borrow(link_res.rep());
                match (b, options) {
                    (Family::V0_1_0(b), JobOptions::Written(options)) => {
                        let r = b
                            .otagw_plugin_plugin()
                            .call_identify(s, link, &options)
                            .await?;
                        Ok(r.map(convert::device_from_v0_1).map_err(FlashError::from))
                    }
                    (Family::V0_2_0(b), JobOptions::Typed(options)) => {
                        let r = b
                            .otagw_plugin_plugin()
                            .call_identify(s, link, &options)
                            .await?;
                        Ok(r.map(convert::device_from_v0_2).map_err(FlashError::from))
                    }
                    _ => Err(mismatch()),
                }
            })
            .await;
        let link = self.take_link(link_res);
        let plugin = self.plugin.info.name.clone();
        (
            link,
            r.and_then(|mut d| {
                // What the gateway informs: never an empty or garbled version
                // (a receiver in the middle of a transfer answered the version
                // command with nothing, campaign seed 1).
                d.version = checked_version(&d.version).map_err(|why| PluginError::Failed {
                    plugin,
                    call: "identify",
                    error: FlashError::Device(why),
                })?;
                Ok(d)
            }),
        )
    }

    /// Apply the plugin's default serial settings (the URL's win), then put the
    /// link in the table.
    fn push_link(&mut self, mut link: Link) -> Resource<Link> {
        if let Some(defaults) = self.plugin.info.default_serial {
            // A refusal here (parity on a pty) is not fatal: the plugin may
            // try other settings itself and handles the refusal then.
            if let Err(e) = link.apply_defaults(defaults) {
                tracing::warn!(plugin = %self.plugin.info.name, "{e}");
            }
        }
        match self.store.data_mut().table.push(link) {
            Ok(r) => r,
            Err(e) => unreachable_table(e),
        }
    }

    fn take_link(&mut self, r: Resource<Link>) -> Link {
        match self.store.data_mut().table.delete(r) {
            Ok(l) => l,
            Err(e) => unreachable_table(e),
        }
    }
}

/// The longest version the gateway informs (the platform's limit is 64).
pub const MAX_VERSION_LEN: usize = 64;

/// A version as a device reported it, trimmed; an error for an empty one, one
/// longer than [`MAX_VERSION_LEN`] or one with control characters.
pub fn checked_version(raw: &str) -> Result<String, String> {
    let v = raw.trim();
    if v.is_empty() {
        return Err("the device reported an empty version".into());
    }
    if v.chars().count() > MAX_VERSION_LEN {
        return Err(format!(
            "the device reported a version of {} characters (at most {MAX_VERSION_LEN})",
            v.chars().count()
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!(
            "the device reported a version with control characters: {v:?}"
        ));
    }
    // What a family decoded from bytes that are not text (erased or
    // random flash read as UTF-8).
    if v.contains(char::REPLACEMENT_CHARACTER) {
        return Err(format!(
            "the device reported a version that is not text (bytes that are not UTF-8): {v:?}"
        ));
    }
    Ok(v.to_owned())
}

/// The resource table of a fresh job store holds a handful of entries; a
/// failure to push or take back our own entry is a bug in this module.
fn unreachable_table(e: wasmtime::component::ResourceTableError) -> ! {
    panic!("plugin resource table: {e}")
}

/// A job's options in the form the plugin's contract takes them.
enum JobOptions {
    /// Contract 0.1: as the operator wrote them.
    Written(Vec<(String, String)>),
    /// Contract 0.2: checked against the schema and typed.
    Typed(bindings::v0_2_0::otagw::plugin::types::Options),
}

/// A session's options were prepared for another contract version than its
/// instance: a bug in this module, failed as a trap rather than a panic.
fn mismatch() -> wasmtime::Error {
    wasmtime::Error::msg("the job's options were prepared for another contract version")
}

fn v0_1_meta(
    m: &JobMeta,
    options: Vec<(String, String)>,
) -> bindings::v0_1_0::otagw::plugin::types::JobMeta {
    bindings::v0_1_0::otagw::plugin::types::JobMeta {
        version: m.version.clone(),
        module: m.module.clone(),
        options,
    }
}

fn v0_2_meta(
    m: &JobMeta,
    options: bindings::v0_2_0::otagw::plugin::types::Options,
) -> bindings::v0_2_0::otagw::plugin::types::JobMeta {
    bindings::v0_2_0::otagw::plugin::types::JobMeta {
        version: m.version.clone(),
        module: m.module.clone(),
        options,
    }
}

impl PluginHost {
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }
    pub(crate) fn linker(&self) -> &Linker<PluginState> {
        &self.linker
    }
    pub(crate) fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }
    pub(crate) fn register(&self, plugin: LoadedPlugin) -> Result<Arc<LoadedPlugin>, PluginError> {
        let mut map = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = map.get(&plugin.info.name)
            && existing.path != plugin.path
        {
            return Err(PluginError::Duplicate {
                family: plugin.info.name.clone(),
                first: existing.path.clone(),
                second: plugin.path.clone(),
            });
        }
        let p = Arc::new(plugin);
        map.insert(p.info.name.clone(), p.clone());
        Ok(p)
    }
}

#[cfg(test)]
mod version_tests {
    use super::checked_version;

    #[test]
    fn only_a_plain_version_is_taken() {
        assert_eq!(checked_version(" 2.1.0\r\n").unwrap(), "2.1.0");
        assert!(checked_version("").unwrap_err().contains("empty"));
        assert!(checked_version(" \r\n").unwrap_err().contains("empty"));
        assert!(
            checked_version(&"9".repeat(65))
                .unwrap_err()
                .contains("65 characters")
        );
        assert!(
            checked_version("1.0\u{1b}[31m")
                .unwrap_err()
                .contains("control")
        );
        assert_eq!(checked_version("v1.2.3-rc1+é").unwrap(), "v1.2.3-rc1+é");
        let garbage = String::from_utf8_lossy(&[0x31, 0x2e, 0xc3, 0x28, 0x80]).into_owned();
        assert!(checked_version(&garbage).unwrap_err().contains("not text"));
    }
}
