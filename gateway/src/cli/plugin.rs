//! `otagw plugin new NAME [--dir DIR]`: write a device-family crate from a
//! template, ready to build for `wasm32-wasip2`, with a passing unit test and a
//! README that says how to build, test and install it. `otagw plugin keygen`,
//! `sign` and `verify`: signed plugins in wasmsign2's format
//! (`crate::plugin::signing`).
//!
//! The crate is self-contained: it carries the plugin SDK this gateway was
//! built with (`vendor/otagw-plugin-sdk`, its manifest made standalone from
//! the workspace's) and the contract it targets (`wit/v0.2.0`), so it builds
//! wherever the otagw binary is, without the otagw sources.
//!
//! What it is not: a package manager. It writes files once and never
//! overwrites a directory that exists.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::plugin::signing;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Write a new device-family plugin crate from the template (builds for
    /// wasm32-wasip2 as written, with a passing test and a README).
    New(NewArgs),
    /// Make an Ed25519 signing key pair: KEY (secret; keep it off the
    /// gateway) and KEY.pub (goes into `[plugins] trusted_keys`).
    Keygen(KeygenArgs),
    /// Sign a plugin: embeds its manifest (family, version, contract, read
    /// from the plugin; --security-version) and a wasmsign2 signature. Run
    /// again with another key for k-of-n signing.
    Sign(SignArgs),
    /// Check a plugin's signature against public keys; print its manifest and
    /// which keys signed it. Exit 1 when no given key did.
    Verify(VerifyArgs),
    /// Install a signed plugin into the configured plugins_dir: checks the
    /// signature against [plugins] trusted_keys (always, whatever
    /// require_signatures says), its manifest against the plugin, that this
    /// gateway runs it; then replaces the family's file atomically, keeping
    /// the old one as FILE.prev. A running gateway loads it by itself.
    Install(InstallArgs),
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The gateway's configuration (plugins_dir, trusted_keys, threshold).
    #[arg(long, short)]
    pub config: PathBuf,
    /// The signed plugin (from `otagw plugin sign`).
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the secret key (the public key goes to OUT.pub).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The secret key (from `otagw plugin keygen` or `wasmsign2 keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// Raise it with each release that fixes a security problem: gateways
    /// refuse to go back below the highest they ran.
    #[arg(long, default_value_t = 0)]
    pub security_version: u64,
    /// The plugin to sign (*.wasm).
    pub input: PathBuf,
    /// Where to write the signed plugin.
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A trusted public key (repeatable).
    #[arg(long = "pub", required = true)]
    pub keys: Vec<PathBuf>,
    /// How many of the keys must have signed.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    /// The signed plugin.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The family name devices will be configured with: lowercase letters,
    /// digits and '-', starting with a letter (e.g. `acme-boot`).
    pub name: String,
    /// Where to create the crate's directory (`DIR/NAME`).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

pub async fn run(a: PluginArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        PluginCommand::New(n) => {
            let root = new_family(&n.name, &n.dir)?;
            println!(
                "created {} (family {:?})\n\
                 next: cd {} && cargo test && cargo build --release --target wasm32-wasip2\n\
                 then copy target/wasm32-wasip2/release/otagw_plugin_{}.wasm into the \
                 gateway's plugins directory (README.md says more)",
                root.display(),
                n.name,
                root.display(),
                n.name.replace('-', "_"),
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Keygen(k) => {
            let public = signing::keygen(&k.out)?;
            println!(
                "secret key {} (keep it where you build releases, not on gateways)
                 public key {} (list it in the gateways' [plugins] trusted_keys)",
                k.out.display(),
                public.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Sign(a) => sign(a).await,
        PluginCommand::Verify(a) => verify(a),
        PluginCommand::Install(a) => install(a).await,
    }
}

async fn install(a: InstallArgs) -> anyhow::Result<ExitCode> {
    use crate::plugin::{ledger::Ledger, update};
    let cfg = crate::config::Config::load(&a.config)?;
    let trust = crate::plugin::Trust::load(&cfg.plugins.trusted_keys, cfg.plugins.threshold, true)?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    // The family currently in service, if any, is the one replaced; the
    // floors are those a running gateway keeps.
    let dir = &cfg.gateway.plugins_dir;
    let host = crate::plugin::PluginHost::new(
        cfg.plugins.limits(1),
        Some(cfg.gateway.data_dir.join("compiled")),
    )?;
    host.load_dir(dir).await?;
    let ledger = Ledger::peek(&cfg.gateway.data_dir.join(crate::plugin::ledger::FILE));
    let family = signing::manifest(&bytes).ok().flatten().map(|m| m.family);
    let expect = update::Expect {
        family: None,
        version: None,
        floor: family.as_deref().map_or(0, |f| ledger.floor(f)),
        allow_downgrade: cfg.plugins.allow_downgrade,
    };
    let checked = match update::check(&host, &trust, &bytes, dir, &expect).await {
        Ok(c) => c,
        Err(refused) => {
            eprintln!("error: {} not installed: {refused}", a.file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let info = &checked.plugin.info;
    let done = crate::plugin::install::install(&checked.target, &bytes)
        .with_context(|| format!("writing {}", checked.target.display()))?;
    let by: Vec<String> = checked
        .signers
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!(
        "installed {} {} (signed by {}) at {}{}; a running gateway loads it within \
         [plugins] settle",
        info.name,
        info.version,
        by.join(", "),
        done.path.display(),
        done.previous
            .map(|p| format!(", the previous version kept as {}", p.display()))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

async fn sign(a: SignArgs) -> anyhow::Result<ExitCode> {
    let key = signing::secret_key(&a.key)?;
    let bytes =
        std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    // What the plugin is, from the plugin itself.
    let host = crate::plugin::PluginHost::new(crate::plugin::Limits::default(), None)?;
    let plugin = host
        .load_file(&a.input)
        .await
        .with_context(|| format!("{} is not a plugin this gateway can run", a.input.display()))?;
    let manifest = signing::Manifest {
        family: plugin.info.name.clone(),
        version: plugin.info.version.clone(),
        security_version: a.security_version,
        contract: plugin.info.contract_claimed.clone(),
        min_gateway: env!("CARGO_PKG_VERSION").to_string(),
    };
    let signed = signing::sign(&bytes, &key, Some(&manifest))?;
    let tmp = a.output.with_extension("wasm.part");
    std::fs::write(&tmp, &signed).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.output).with_context(|| format!("writing {}", a.output.display()))?;
    println!(
        "signed {} {} (security version {}, contract {}) with {}: {}",
        manifest.family,
        manifest.version,
        manifest.security_version,
        manifest.contract,
        a.key.display(),
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let keys = a
        .keys
        .iter()
        .map(|p| Ok((p.clone(), signing::public_key(p)?)))
        .collect::<Result<Vec<_>, signing::SignError>>()?;
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    match signing::verify(&bytes, &keys, a.threshold) {
        Ok(signers) => {
            for s in signers {
                println!("signed by {}", s.display());
            }
            match signing::manifest(&bytes)? {
                Some(m) => println!(
                    "family {}
version {}
security_version {}
contract {}
min_gateway {}",
                    m.family, m.version, m.security_version, m.contract, m.min_gateway
                ),
                None => println!(
                    "no otagw-plugin manifest (signed with another tool: sign it with                      `otagw plugin sign` to say what it is)"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {}: {e}", a.file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The SDK's files, as this gateway was built with them.
const SDK_FILES: &[(&str, &str)] = &[
    (
        "src/lib.rs",
        include_str!("../../../plugins/sdk/src/lib.rs"),
    ),
    (
        "src/error.rs",
        include_str!("../../../plugins/sdk/src/error.rs"),
    ),
    (
        "src/family.rs",
        include_str!("../../../plugins/sdk/src/family.rs"),
    ),
    (
        "src/fields.rs",
        include_str!("../../../plugins/sdk/src/fields.rs"),
    ),
    (
        "src/fuzzing.rs",
        include_str!("../../../plugins/sdk/src/fuzzing.rs"),
    ),
    (
        "src/guest.rs",
        include_str!("../../../plugins/sdk/src/guest.rs"),
    ),
    (
        "src/port.rs",
        include_str!("../../../plugins/sdk/src/port.rs"),
    ),
    (
        "src/schema.rs",
        include_str!("../../../plugins/sdk/src/schema.rs"),
    ),
    (
        "src/testing.rs",
        include_str!("../../../plugins/sdk/src/testing.rs"),
    ),
];
const SDK_MANIFEST: &str = include_str!("../../../plugins/sdk/Cargo.toml");
const WORKSPACE_MANIFEST: &str = include_str!("../../../Cargo.toml");
const CONTRACT_WIT: &str = include_str!("../../../wit/v0.2.0/plugin.wit");

const TEMPLATE_MANIFEST: &str = include_str!("template/Cargo.toml.txt");
const TEMPLATE_LIB: &str = include_str!("template/lib.rs.txt");
const TEMPLATE_README: &str = include_str!("template/README.md.txt");

/// Write the crate of family `name` under `dir`; returns its directory.
pub fn new_family(name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "{name:?} is not a family name: use 1-64 lowercase letters, digits and '-', \
             starting with a letter (e.g. acme-boot)"
        );
    }
    let root = dir.join(name);
    if root.exists() {
        bail!(
            "{} already exists; choose another --dir or remove it first",
            root.display()
        );
    }
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
    };
    let sdk_manifest = standalone_manifest(SDK_MANIFEST, WORKSPACE_MANIFEST)
        .context("making the SDK's manifest standalone")?;
    let mut files: Vec<(PathBuf, String)> = vec![
        (root.join("Cargo.toml"), fill(TEMPLATE_MANIFEST)),
        (root.join("src/lib.rs"), fill(TEMPLATE_LIB)),
        (root.join("README.md"), fill(TEMPLATE_README)),
        (root.join(".gitignore"), "/target\n".into()),
        (root.join("wit/v0.2.0/plugin.wit"), CONTRACT_WIT.into()),
        (
            root.join("vendor/otagw-plugin-sdk/Cargo.toml"),
            sdk_manifest,
        ),
    ];
    for (path, text) in SDK_FILES {
        files.push((
            root.join("vendor/otagw-plugin-sdk").join(path),
            (*text).into(),
        ));
    }
    for (path, text) in files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(root)
}

/// A workspace member's manifest with every `workspace = true` replaced by
/// the workspace's value, so the crate builds outside the workspace.
fn standalone_manifest(member: &str, workspace: &str) -> anyhow::Result<String> {
    let mut m: toml::Table = toml::from_str(member)?;
    let ws: toml::Table = toml::from_str(workspace)?;
    let ws = ws
        .get("workspace")
        .and_then(|w| w.as_table())
        .context("the workspace manifest has no [workspace]")?;
    let empty = toml::Table::new();
    let ws_package = ws
        .get("package")
        .and_then(|p| p.as_table())
        .unwrap_or(&empty);
    let ws_deps = ws
        .get("dependencies")
        .and_then(|p| p.as_table())
        .unwrap_or(&empty);

    if let Some(package) = m.get_mut("package").and_then(|p| p.as_table_mut()) {
        for (key, value) in package.iter_mut() {
            if inherits(value) {
                *value = ws_package
                    .get(key)
                    .cloned()
                    .with_context(|| format!("the workspace has no package.{key}"))?;
            }
        }
    }
    let mut dep_tables: Vec<&mut toml::Table> = Vec::new();
    let (targets, rest): (Vec<_>, Vec<_>) = m.iter_mut().partition(|(k, _)| *k == "target");
    for (key, value) in rest {
        if key.ends_with("dependencies")
            && let Some(t) = value.as_table_mut()
        {
            dep_tables.push(t);
        }
    }
    for (_, target) in targets {
        for (_, cfg) in target.as_table_mut().into_iter().flat_map(|t| t.iter_mut()) {
            for (key, value) in cfg.as_table_mut().into_iter().flat_map(|t| t.iter_mut()) {
                if key.ends_with("dependencies")
                    && let Some(t) = value.as_table_mut()
                {
                    dep_tables.push(t);
                }
            }
        }
    }
    for deps in dep_tables {
        for (name, dep) in deps.iter_mut() {
            if !inherits(dep) {
                continue;
            }
            let mut resolved = match ws_deps.get(name) {
                Some(toml::Value::String(v)) => {
                    let mut t = toml::Table::new();
                    t.insert("version".into(), toml::Value::String(v.clone()));
                    t
                }
                Some(toml::Value::Table(t)) => t.clone(),
                _ => bail!("the workspace has no dependency {name}"),
            };
            if resolved.contains_key("path") {
                bail!("dependency {name} is a path in the workspace; it cannot be vendored");
            }
            if let Some(extra) = dep.as_table() {
                for (k, v) in extra {
                    if k == "workspace" {
                        continue;
                    }
                    if k == "features"
                        && let (Some(toml::Value::Array(have)), toml::Value::Array(more)) =
                            (resolved.get_mut("features"), v)
                    {
                        have.extend(more.iter().cloned());
                        continue;
                    }
                    resolved.insert(k.clone(), v.clone());
                }
            }
            *dep = toml::Value::Table(resolved);
        }
    }
    if m.get("lints").is_some_and(inherits) {
        match ws.get("lints") {
            Some(lints) => {
                m.insert("lints".into(), lints.clone());
            }
            None => {
                m.remove("lints");
            }
        }
    }
    Ok(toml::to_string(&m)?)
}

/// `{ workspace = true, ... }`.
fn inherits(v: &toml::Value) -> bool {
    v.as_table()
        .and_then(|t| t.get("workspace"))
        .and_then(|w| w.as_bool())
        == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of the SDK is vendored: a file added to `plugins/sdk/src`
    /// and not to [`SDK_FILES`] fails here, not in a user's build.
    #[test]
    fn every_sdk_source_is_vendored() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk/src");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| format!("src/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        on_disk.sort();
        let mut vendored: Vec<String> = SDK_FILES.iter().map(|(p, _)| p.to_string()).collect();
        vendored.sort();
        assert_eq!(on_disk, vendored);
    }

    #[test]
    fn the_sdk_manifest_stands_alone() {
        let text = standalone_manifest(SDK_MANIFEST, WORKSPACE_MANIFEST).unwrap();
        assert!(!text.contains("workspace"), "{text}");
        let m: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(m["package"]["edition"].as_str(), Some("2024"));
        assert_eq!(
            m["dependencies"]["thiserror"]["version"].as_str(),
            Some("2")
        );
        assert!(
            m["target"]["cfg(target_arch = \"wasm32\")"]["dependencies"]["wit-bindgen"]["version"]
                .is_str()
        );
        assert_eq!(m["lints"]["rust"]["unsafe_code"].as_str(), Some("deny"));
    }

    #[test]
    fn names_are_checked_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "Acme", "1acme", "acme_boot", "a b", "é"] {
            assert!(new_family(bad, dir.path()).is_err(), "{bad:?}");
        }
        let root = new_family("acme-boot", dir.path()).unwrap();
        let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
        assert!(
            lib.contains("Info::new(\n            \"acme-boot\""),
            "{lib}"
        );
        assert!(!lib.contains("{{"), "unfilled placeholder");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(readme.contains("otagw_plugin_acme_boot.wasm"));
        let again = new_family("acme-boot", dir.path()).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
    }
}
