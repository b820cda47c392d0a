//! What one input of the gateway's fuzz targets does (`fuzz/`), shared with
//! the tests that replay the committed corpus. Hidden from the docs; not an
//! API.
//!
//! - [`notice`] (`notice`): an MQTT payload → [`parse_notice`],
//!   [`parse_get_reply`], [`module_hint`]. A notice that parses is
//!   normalised (sizes, digests, URL) and re-issuing it gives it back.
//! - [`config`] (`config`): a file → [`Config::parse`]. A configuration that
//!   loads satisfies what `validate` promises the rest of the gateway.

use std::path::Path;

use crate::config::Config;
use crate::link::LinkUrl;
use crate::ota::protocol::{
    Download, Notice, module_hint, parse_get_reply, parse_notice, reissue_notice,
};

/// One input of `notice`: the payload of an upgrade notice or a
/// `firmware/get_reply`.
pub fn notice(data: &[u8]) {
    let module = module_hint(data);
    assert!(!module.trim().is_empty());
    match parse_notice(data) {
        Ok(n) => {
            check_notice(&n);
            assert_eq!(module, n.module, "module_hint disagrees with the notice");
        }
        Err(e) => {
            let _ = (e.to_string(), e.field());
        }
    }
    match parse_get_reply(data) {
        Ok(Some(n)) => check_notice(&n),
        Ok(None) => {}
        Err(e) => {
            let _ = (e.to_string(), e.field());
        }
    }
}

/// What every parsed notice holds, and the canonical form parses back to it.
fn check_notice(n: &Notice) {
    assert!(n.size > 0);
    assert!(!n.version.trim().is_empty());
    assert!(!n.module.trim().is_empty());
    assert_eq!(n.sign.len(), n.sign_method.hex_len(), "{n:?}");
    assert!(
        n.sign
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
        "sign {:?} is not lowercase hex",
        n.sign
    );
    if let Download::Http { url } = &n.download {
        let lower = url.to_ascii_lowercase();
        assert!(
            lower.starts_with("http://") || lower.starts_with("https://"),
            "{url:?}"
        );
        assert!(!url.chars().any(char::is_whitespace), "{url:?}");
    }
    assert_ne!(n.ext_data, Some(serde_json::Value::Null));
    let again = parse_notice(&reissue_notice(n));
    assert_eq!(
        again.as_ref(),
        Ok(n),
        "a re-issued notice parses differently"
    );
}

/// One input of `config`: the text of a configuration file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let g = &cfg.gateway;
    assert!(!g.product_key.is_empty() && !g.device_name.is_empty());
    assert!(cfg.jobs.max_parallel >= 1);
    match &cfg.upstream {
        None => assert!(
            cfg.local_broker.listen.is_some(),
            "standalone without a broker"
        ),
        Some(u) => assert!((30..=1200).contains(&u.keep_alive.as_secs())),
    }
    for d in &cfg.devices {
        assert!(!d.family.is_empty() && !d.product_key.is_empty() && !d.device_name.is_empty());
        assert!(
            LinkUrl::parse(&d.link).is_ok(),
            "{:?} passed validation",
            d.link
        );
        let _ = d.options_vec();
    }
    // Computed when the daemon starts.
    let _ = cfg.plugins.limits(cfg.jobs.max_parallel);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Every file of `fuzz/{corpus,regressions,artifacts}/<target>/` (as
    /// `otagw_plugin_sdk::fuzzing::inputs`, which the gateway does not use).
    fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut out = Vec::new();
        for kind in ["corpus", "regressions", "artifacts"] {
            let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
                continue;
            };
            for path in dir.flatten().map(|e| e.path()).filter(|p| p.is_file()) {
                let bytes = std::fs::read(&path).expect("a corpus file");
                out.push((path, bytes));
            }
        }
        assert!(!out.is_empty(), "no corpus for fuzz target `{target}`");
        out.sort();
        out
    }

    fn replay(target: &str, one: fn(&[u8])) {
        let inputs = inputs(target);
        let failed: Vec<String> = inputs
            .iter()
            .filter(|(_, data)| std::panic::catch_unwind(|| one(data)).is_err())
            .map(|(path, _)| path.display().to_string())
            .collect();
        assert!(
            failed.is_empty(),
            "fuzz target `{target}`: {} of {} inputs panicked: {}",
            failed.len(),
            inputs.len(),
            failed.join(", ")
        );
    }

    #[test]
    fn notice_corpus_replays() {
        replay("notice", notice);
    }

    #[test]
    fn config_corpus_replays() {
        replay("config", config);
    }

    /// Found by the `notice` target: serde_json without `float_roundtrip`
    /// parsed the 83-digit number one ULP off, so the re-issued notice (the
    /// f64's shortest form) parsed to another value than the one received.
    #[test]
    fn ext_data_numbers_survive_a_reissue() {
        let payload = br#"{"id":1,"data":{"size":1,"version":"1","url":"http://h","md5":"93230c3bde425a9d7984a594ac55ea1e","extData":[22222222222222222222222222202222222222222222222222222222222222222222222222222222220,0.1,1e-300,-5e-324]}}"#;
        let n = parse_notice(payload).unwrap();
        assert_eq!(parse_notice(&reissue_notice(&n)).unwrap(), n);
        let first = &n.ext_data.as_ref().unwrap()[0];
        assert_eq!(first.as_f64(), Some(2.2222222222222222e82));
    }

    #[test]
    fn the_checks_hold_for_good_inputs_and_catch_bad_ones() {
        let good = br#"{"code":"1000","id":"7","data":{"size":"10","version":"2.0","url":"HTTPS://h/f","sign":"93230C3BDE425A9D7984A594AC55EA1E","signMethod":"md5","module":"MCU","extData":{"a":[1,2.5]}}}"#;
        notice(good);
        let n = parse_notice(good).unwrap();
        check_notice(&n);
        // A notice whose sign is not normalised fails the check.
        let bad = Notice {
            sign: n.sign.to_uppercase(),
            ..n
        };
        assert!(std::panic::catch_unwind(|| check_notice(&bad)).is_err());
        config(crate::config::DEFAULT.as_bytes());
        config(b"\xff not utf-8");
    }
}
