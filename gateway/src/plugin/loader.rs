//! Loading plugins: read a `*.wasm`, compile it (or load the compiled form
//! from the on-disk cache), check the contract it was built for and what it
//! imports, pre-link it, ask it to `describe` itself, and register it by family.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use wasmtime::component::{Component, types::ComponentItem};

use super::bindings::{Contract, Family, FamilyPre};
use super::{LoadedPlugin, PluginError, PluginHost, convert, schema};

/// Where a plugin's machine code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadedFrom {
    /// Compiled now (and written to the cache, when there is one).
    Compiled,
    /// Loaded from the compile cache.
    Cache,
}

/// A plugin's digest as [`LoadedPlugin::sha256`] holds it.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The digest of the plugin file at `path`; `None` when it cannot be read.
pub(crate) fn file_sha256(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|b| sha256_hex(&b))
}

/// What loading a plugins directory did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: Vec<Arc<LoadedPlugin>>,
    pub failed: Vec<PluginError>,
}

/// Interfaces outside the contract a plugin may import: those Rust std pulls
/// in (linked over an empty context). The contract's own come from its
/// version ([`Contract::imports`]).
const STD_IMPORTS: &[&str] = &["wasi:io/", "wasi:cli/"];

/// How long `describe` may take at load time.
const DESCRIBE_DEADLINE: Duration = Duration::from_secs(5);

impl PluginHost {
    /// Load every `*.wasm` in `dir` (not recursive), in name order. Broken
    /// plugins are reported and skipped; the others load.
    pub async fn load_dir(&self, dir: &Path) -> Result<LoadReport, PluginError> {
        let mut paths = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => PluginError::NoDir(dir.to_path_buf()),
            _ => PluginError::Read {
                path: dir.to_path_buf(),
                source,
            },
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| PluginError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut report = LoadReport::default();
        for path in paths {
            match self.load_local(&path).await {
                Ok(p) => {
                    tracing::info!(
                        family = %p.info.name,
                        version = %p.info.version,
                        path = %p.path.display(),
                        from = ?p.loaded_from,
                        ms = (p.load_time.as_secs_f64() * 1e4).round() / 10.0,
                        "plugin loaded"
                    );
                    self.set_broken(&path, None);
                    report.loaded.push(p);
                }
                Err(e) => {
                    // The caller says it (the daemon logs it, the CLI prints it).
                    tracing::debug!("{e}; skipped");
                    self.set_broken(&path, Some(e.to_string()));
                    report.failed.push(e);
                }
            }
        }
        Ok(report)
    }

    /// Load one plugin file and register it under the family it describes.
    pub async fn load_file(&self, path: &Path) -> Result<Arc<LoadedPlugin>, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let plugin = self.prepare(path, &bytes).await?;
        self.register(plugin)
    }

    /// Compile, check and describe `bytes` as the plugin file `path` would
    /// be, without registering it (a candidate of a remote update is checked
    /// before it is written anywhere). [`PluginHost::adopt`] puts it in
    /// service.
    pub async fn prepare(&self, path: &Path, bytes: &[u8]) -> Result<LoadedPlugin, PluginError> {
        let started = Instant::now();
        let sha256 = sha256_hex(bytes);
        let (component, loaded_from) = self.component(path, bytes, &sha256).await?;
        let contract = self.check_contract(path, &component)?;

        let pre = self
            .linker()
            .instantiate_pre(&component)
            .and_then(|pre| FamilyPre::new(contract, pre))
            .map_err(|e| PluginError::Instantiate {
                path: path.to_path_buf(),
                reason: format!("{e:#}"),
            })?;

        let info = self.describe(path, &pre).await?;
        let plugin = LoadedPlugin {
            info,
            path: path.to_path_buf(),
            sha256,
            loaded_from,
            load_time: started.elapsed(),
            pre,
        };
        Ok(plugin)
    }

    /// Put a prepared plugin in service for its family: new jobs get it,
    /// jobs under way finish on theirs.
    pub fn adopt(&self, plugin: LoadedPlugin) -> Result<Arc<LoadedPlugin>, PluginError> {
        self.register(plugin)
    }

    /// The compiled component, from the cache when it is there.
    async fn component(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, LoadedFrom), PluginError> {
        let cached = self.cache_dir().map(|d| d.join(self.cache_name(sha256)));
        if let Some(file) = cached.as_ref().filter(|f| f.is_file()) {
            match load_precompiled(self.engine(), file) {
                Ok(c) => return Ok((c, LoadedFrom::Cache)),
                Err(e) => {
                    tracing::warn!(file = %file.display(), "compile cache entry unusable ({e:#}); recompiling");
                    let _ = std::fs::remove_file(file);
                }
            }
        }
        let engine = self.engine().clone();
        let owned = bytes.to_vec();
        let compiled = tokio::task::spawn_blocking(move || {
            let c = Component::new(&engine, &owned)?;
            let serialized = c.serialize()?;
            wasmtime::Result::<(Component, Vec<u8>)>::Ok((c, serialized))
        })
        .await
        .map_err(|e| PluginError::Engine(e.to_string()))?;
        let (component, serialized) = compiled.map_err(|e| PluginError::Malformed {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        if let Some(file) = cached
            && let Err(e) = write_atomically(&file, &serialized)
        {
            tracing::warn!(file = %file.display(), "cannot write the compile cache: {e}");
        }
        Ok((component, LoadedFrom::Compiled))
    }

    /// Cache file name: the wasm's digest, the engine (`native-aarch64`,
    /// `pulley32`) and the engine's compatibility hash (wasmtime's version,
    /// target and settings), so code for another engine, another wasmtime
    /// or other settings is never loaded.
    fn cache_name(&self, sha256: &str) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine().precompile_compatibility_hash().hash(&mut h);
        format!(
            "{sha256}-{}-{:016x}.cwasm",
            self.limits().engine.label(),
            h.finish()
        )
    }

    /// Find, before instantiating anything, which supported contract version
    /// the component exports, and check that it imports nothing outside that
    /// version and what std needs.
    fn check_contract(&self, path: &Path, component: &Component) -> Result<Contract, PluginError> {
        let engine = self.engine();
        let ty = component.component_type();
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        let Some(contract) = exports.iter().find_map(|n| Contract::from_export(n)) else {
            let other = exports
                .iter()
                .find(|n| n.starts_with("otagw:plugin/plugin"));
            return Err(match other {
                Some(found) => PluginError::Contract {
                    path: path.to_path_buf(),
                    found: found
                        .trim_start_matches("otagw:plugin/plugin")
                        .trim_start_matches('@')
                        .to_string(),
                },
                None => PluginError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!(
                        "it exports no otagw:plugin/plugin interface of a version this gateway \
                         runs ({}; exports: {})",
                        Contract::supported_range(),
                        if exports.is_empty() {
                            "none".into()
                        } else {
                            exports.join(", ")
                        }
                    ),
                },
            });
        };
        let mut forbidden = Vec::new();
        for (name, item) in ty.imports(engine) {
            let allowed = matches!(item.ty, ComponentItem::ComponentInstance(_))
                && (contract.imports().contains(&name)
                    || STD_IMPORTS.iter().any(|a| name.starts_with(a)));
            if allowed {
                continue;
            }
            if let Some(found) = name.strip_prefix("otagw:plugin/") {
                return Err(PluginError::Contract {
                    path: path.to_path_buf(),
                    found: found.split('@').nth(1).unwrap_or(found).to_string(),
                });
            }
            forbidden.push(name.to_string());
        }
        if !forbidden.is_empty() {
            return Err(PluginError::ForbiddenImport {
                path: path.to_path_buf(),
                imports: forbidden,
            });
        }
        Ok(contract)
    }

    async fn describe(
        &self,
        path: &Path,
        pre: &FamilyPre,
    ) -> Result<super::FamilyInfo, PluginError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut store = self.new_store(&name, None);
        let bad = |reason: String| PluginError::Describe {
            path: path.to_path_buf(),
            reason,
        };
        let run = async {
            wasmtime::Result::<_>::Ok(match pre.instantiate(&mut store).await? {
                Family::V0_1_0(b) => convert::family_from_v0_1(
                    b.otagw_plugin_plugin().call_describe(&mut store).await?,
                ),
                Family::V0_2_0(b) => convert::family_from_v0_2(
                    b.otagw_plugin_plugin().call_describe(&mut store).await?,
                ),
            })
        };
        let info = match tokio::time::timeout(DESCRIBE_DEADLINE, run).await {
            Err(_) => {
                return Err(bad(format!(
                    "describe did not return within {DESCRIBE_DEADLINE:?}"
                )));
            }
            Ok(Err(e)) => return Err(bad(format!("describe failed: {e:#}"))),
            Ok(Ok(info)) => info,
        };
        // 0.2 plugins may be built from any 0.2.x (patch releases only add);
        // what they claim must be of the version they export.
        let claimed_ok = match info.contract {
            Contract::V0_1_0 => info.contract_claimed == Contract::V0_1_0.version(),
            Contract::V0_2_0 => is_patch_of(&info.contract_claimed, "0.2."),
        };
        if !claimed_ok {
            return Err(PluginError::ContractMismatch {
                path: path.to_path_buf(),
                claimed: info.contract_claimed,
                exported: info.contract,
            });
        }
        let valid = !info.name.is_empty()
            && info.name.len() <= 64
            && info
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(bad(format!(
                "family name {:?} must be 1-64 lowercase letters, digits or '-'",
                info.name
            )));
        }
        if let Some(g) = &info.default_gatt
            && g.plan().is_none()
        {
            return Err(bad(format!(
                "its default GATT characteristics are not Bluetooth UUIDs: {g:?}"
            )));
        }
        if info.transports.contains(&crate::link::LinkKind::Ble) && info.default_gatt.is_none() {
            return Err(bad(
                "it lists BLE among its transports but declares no default-gatt".into(),
            ));
        }
        if let Some(specs) = &info.options
            && let Err(problems) = schema::validate_schema(specs)
        {
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(bad(format!(
                "its options schema is invalid: {}",
                problems.join("; ")
            )));
        }
        Ok(info)
    }
}

/// Whether `v` is `prefix` followed by a patch number ("0.2." + "1").
fn is_patch_of(v: &str, prefix: &str) -> bool {
    v.strip_prefix(prefix)
        .is_some_and(|patch| !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit()))
}

/// Load a component this gateway compiled into its own cache directory.
#[allow(unsafe_code)]
fn load_precompiled(engine: &wasmtime::Engine, file: &PathBuf) -> wasmtime::Result<Component> {
    // SAFETY: `deserialize_file` trusts the file to be wasmtime's own output.
    // Only this module writes the cache directory, always through a temporary
    // file renamed into place (so a file is never seen half-written), and the
    // name carries the engine's compatibility hash; wasmtime also checks the
    // header against the engine. Whoever can write this directory can replace
    // the plugins themselves, so the cache grants no new power.
    unsafe { Component::deserialize_file(engine, file) }
}

fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}
