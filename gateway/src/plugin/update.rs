//! The checks a plugin must pass before it replaces a family's plugin,
//! shared by remote updates (a notice for `plugin.<family>` on the gateway's
//! own upgrade topic) and `otagw plugin install`:
//!
//! 1. enough of `[plugins] trusted_keys` signed it (`threshold`);
//! 2. its signed `otagw-plugin` manifest names the family and version the
//!    notice asks for, a security version not below the family's floor
//!    (unless `allow_downgrade`), and a gateway version this one satisfies;
//! 3. it compiles, exports a contract this gateway runs, imports nothing
//!    else, and describes itself as the manifest says.
//!
//! A refusal carries the step code the platform is told: `-1` when the
//! gateway is not set up for it, `-3` for everything wrong with the file
//! itself (signature, manifest, floor, code). Nothing is written until every
//! check passed; the caller installs (`install::install`).

use std::path::{Path, PathBuf};

use super::signing::{self, Manifest};
use super::{LoadedPlugin, PluginHost, Trust};
use crate::ota::protocol::Step;

/// What the caller expects of the candidate.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The family the notice is for (`plugin.<family>`); `None`: any.
    pub family: Option<String>,
    /// The version the notice announces; `None`: any.
    pub version: Option<String>,
    /// The family's security-version floor (the highest that passed
    /// probation here).
    pub floor: u64,
    /// `[plugins] allow_downgrade`: the floor is not enforced.
    pub allow_downgrade: bool,
}

/// Why a candidate is refused, as the platform is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct Refused {
    pub step: Step,
    pub desc: String,
}

fn refuse(step: Step, desc: impl Into<String>) -> Refused {
    Refused {
        step,
        desc: desc.into(),
    }
}

/// A candidate that passed every check, compiled and ready to adopt.
#[derive(Debug)]
pub struct Checked {
    pub manifest: Manifest,
    /// The trusted keys that signed it.
    pub signers: Vec<PathBuf>,
    /// The plugin, prepared as the file it will be installed as.
    pub plugin: LoadedPlugin,
    /// Where it goes: the file that provides the family now, or
    /// `plugins_dir/<family>.wasm`.
    pub target: PathBuf,
}

/// This gateway's version, as `min_gateway` is compared with.
pub const GATEWAY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Check `bytes` as the next plugin of a family; `dir` is the plugins
/// directory it would be installed into.
pub async fn check(
    host: &PluginHost,
    trust: &Trust,
    bytes: &[u8],
    dir: &Path,
    expect: &Expect,
) -> Result<Checked, Refused> {
    if trust.keys.is_empty() {
        return Err(refuse(
            Step::UpgradeFailed,
            "this gateway has no [plugins] trusted_keys to check a plugin's signature with \
             (list the public key of the plugins' publisher there)",
        ));
    }
    let signers = signing::verify(bytes, &trust.keys, trust.threshold)
        .map_err(|e| refuse(Step::VerifyFailed, format!("signature refused: {e}")))?
        .into_iter()
        .map(Path::to_path_buf)
        .collect();
    let manifest = match signing::manifest(bytes) {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(refuse(
                Step::VerifyFailed,
                "the plugin carries no otagw-plugin manifest (sign it with `otagw plugin sign`)",
            ));
        }
        Err(e) => return Err(refuse(Step::VerifyFailed, e.to_string())),
    };
    check_manifest(&manifest, expect)?;

    let target = host
        .get(&manifest.family)
        .map(|p| p.path.clone())
        .unwrap_or_else(|| dir.join(format!("{}.wasm", manifest.family)));
    let plugin = host
        .prepare(&target, bytes)
        .await
        .map_err(|e| refuse(Step::VerifyFailed, e.to_string()))?;
    let info = &plugin.info;
    if manifest.family != info.name
        || manifest.version != info.version
        || manifest.contract != info.contract_claimed
    {
        return Err(refuse(
            Step::VerifyFailed,
            format!(
                "its manifest says {} {} (contract {}), the plugin itself says {} {} (contract {})",
                manifest.family,
                manifest.version,
                manifest.contract,
                info.name,
                info.version,
                info.contract_claimed
            ),
        ));
    }
    Ok(Checked {
        manifest,
        signers,
        plugin,
        target,
    })
}

/// The manifest against what is expected (before any code is compiled).
pub fn check_manifest(m: &Manifest, expect: &Expect) -> Result<(), Refused> {
    if let Some(family) = &expect.family
        && *family != m.family
    {
        return Err(refuse(
            Step::VerifyFailed,
            format!(
                "the plugin is signed as family {:?}, the notice is for plugin.{family}",
                m.family
            ),
        ));
    }
    if let Some(version) = &expect.version
        && *version != m.version
    {
        return Err(refuse(
            Step::VerifyFailed,
            format!(
                "the plugin is signed as version {}, the notice announces {version}",
                m.version
            ),
        ));
    }
    if m.security_version < expect.floor && !expect.allow_downgrade {
        return Err(refuse(
            Step::VerifyFailed,
            format!(
                "security version {} is below {}, the highest this gateway has run for {} \
                 (publish a release with security version {} or more; [plugins] \
                 allow_downgrade = true permits going back)",
                m.security_version, expect.floor, m.family, expect.floor
            ),
        ));
    }
    let needed = semver::Version::parse(&m.min_gateway).map_err(|e| {
        refuse(
            Step::VerifyFailed,
            format!("its manifest's min_gateway {:?}: {e}", m.min_gateway),
        )
    })?;
    let ours = semver::Version::parse(GATEWAY_VERSION).expect("the crate version is semver");
    if ours < needed {
        return Err(refuse(
            Step::VerifyFailed,
            format!(
                "it needs otagw {needed} or later; this gateway is {ours} (update the gateway first)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            family: "acme".into(),
            version: "1.2.0".into(),
            security_version: 3,
            contract: "0.2.0".into(),
            min_gateway: "0.1.0".into(),
        }
    }

    fn expect() -> Expect {
        Expect {
            family: Some("acme".into()),
            version: Some("1.2.0".into()),
            floor: 3,
            allow_downgrade: false,
        }
    }

    #[test]
    fn the_manifest_must_match_the_notice_and_the_floor() {
        check_manifest(&manifest(), &expect()).unwrap();

        let other = Expect {
            family: Some("other".into()),
            ..expect()
        };
        let r = check_manifest(&manifest(), &other).unwrap_err();
        assert_eq!(r.step, Step::VerifyFailed);
        assert!(r.desc.contains("family \"acme\""), "{}", r.desc);

        let newer = Expect {
            version: Some("1.3.0".into()),
            ..expect()
        };
        let r = check_manifest(&manifest(), &newer).unwrap_err();
        assert!(r.desc.contains("announces 1.3.0"), "{}", r.desc);

        let above = Expect {
            floor: 4,
            ..expect()
        };
        let r = check_manifest(&manifest(), &above).unwrap_err();
        assert!(
            r.desc.contains("security version 3 is below 4"),
            "{}",
            r.desc
        );
        let allowed = Expect {
            allow_downgrade: true,
            ..above
        };
        check_manifest(&manifest(), &allowed).unwrap();
    }

    #[test]
    fn a_plugin_for_a_newer_gateway_is_refused() {
        let m = Manifest {
            min_gateway: "99.0.0".into(),
            ..manifest()
        };
        let r = check_manifest(&m, &expect()).unwrap_err();
        assert!(r.desc.contains("needs otagw 99.0.0"), "{}", r.desc);
        let m = Manifest {
            min_gateway: "soon".into(),
            ..manifest()
        };
        assert!(check_manifest(&m, &expect()).is_err());
    }
}
