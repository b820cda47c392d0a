//! Issue 14, item 2: signed plugins in wasmsign2's format, checked against
//! the `wasmsign2` CLI both ways (installed by `.ci/run`, pinned): what
//! `otagw plugin sign` writes verifies with `wasmsign2 verify`, and keys and
//! signatures made by `wasmsign2` are accepted by `otagw plugin verify`. A
//! signed plugin still loads.

use std::path::Path;
use std::process::Output;

use otagw_e2e::*;
use tokio::process::Command;

async fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{program}: {e} (wasmsign2: cargo install wasmsign2-cli --version 0.2.8 --locked)"
            )
        })
}

async fn otagw(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_otagw-e2e-gateway"), args).await
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_signed_by_otagw_verify_with_wasmsign2_and_the_other_way_round() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plugin = Path::new(artifacts::XMODEM);

    // otagw's key and signature, checked by wasmsign2.
    let key = d.join("release.key");
    let o = otagw(&["plugin", "keygen", "--out", s(&key)]).await;
    assert!(o.status.success(), "{}", text(&o));
    let public = d.join("release.key.pub");
    let signed = d.join("signed").join("xmodem.wasm");
    std::fs::create_dir(signed.parent().unwrap()).unwrap();
    let o = otagw(&[
        "plugin",
        "sign",
        "--key",
        s(&key),
        "--security-version",
        "3",
        s(plugin),
        "-o",
        s(&signed),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = run("wasmsign2", &["verify", "-K", s(&public), "-i", s(&signed)]).await;
    assert!(o.status.success(), "wasmsign2 verify: {}", text(&o));

    // otagw verify: which key, and the manifest, read from the plugin.
    let o = otagw(&["plugin", "verify", "--pub", s(&public), s(&signed)]).await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("signed by {}", public.display()))
            && out.contains("family xmodem")
            && out.contains("security_version 3")
            && out.contains("contract 0.2"),
        "{out}"
    );
    // The signed plugin still loads and describes itself.
    let cache = d.join("compiled");
    let o = otagw(&[
        "plugins",
        "--plugins-dir",
        s(signed.parent().unwrap()),
        "--cache-dir",
        s(&cache),
    ])
    .await;
    assert!(
        o.status.success() && text(&o).contains("xmodem"),
        "{}",
        text(&o)
    );

    // wasmsign2's key and signature, accepted by otagw.
    let (sk, pk) = (d.join("ws.sk"), d.join("ws.pk"));
    let o = run("wasmsign2", &["keygen", "-k", s(&sk), "-K", s(&pk)]).await;
    assert!(o.status.success(), "{}", text(&o));
    let by_ws = d.join("by-wasmsign2.wasm");
    let o = run(
        "wasmsign2",
        &["sign", "-k", s(&sk), "-i", s(plugin), "-o", s(&by_ws)],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = otagw(&["plugin", "verify", "--pub", s(&pk), s(&by_ws)]).await;
    assert!(
        o.status.success() && text(&o).contains("no otagw-plugin manifest"),
        "{}",
        text(&o)
    );
    // Both keys trusted, two needed: wasmsign2 adds its signature to ours.
    let both = d.join("both.wasm");
    let o = run(
        "wasmsign2",
        &["sign", "-k", s(&sk), "-i", s(&signed), "-o", s(&both)],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = otagw(&[
        "plugin",
        "verify",
        "--pub",
        s(&public),
        "--pub",
        s(&pk),
        "--threshold",
        "2",
        s(&both),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));

    // Refused: another key only, a tampered file, an unsigned one.
    let o = otagw(&["plugin", "verify", "--pub", s(&pk), s(&signed)]).await;
    assert!(
        !o.status.success() && text(&o).contains("no valid signature by a trusted key"),
        "{}",
        text(&o)
    );
    let mut bytes = std::fs::read(&signed).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    let tampered = d.join("tampered.wasm");
    std::fs::write(&tampered, &bytes).unwrap();
    let o = otagw(&["plugin", "verify", "--pub", s(&public), s(&tampered)]).await;
    assert!(!o.status.success(), "{}", text(&o));
    let o = run(
        "wasmsign2",
        &["verify", "-K", s(&public), "-i", s(&tampered)],
    )
    .await;
    assert!(!o.status.success(), "wasmsign2 agrees: {}", text(&o));
    let o = otagw(&["plugin", "verify", "--pub", s(&public), s(plugin)]).await;
    assert!(
        !o.status.success() && text(&o).contains("not signed"),
        "{}",
        text(&o)
    );
}

/// `[plugins] require_signatures`: a file in the plugins directory loads
/// only when enough trusted keys signed it; the others are reported broken
/// with the reason, at start and when dropped in later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_signatures_only_plugins_signed_by_trusted_keys_load() {
    use otagw::plugin::signing;
    use otagw::plugin::watch::DirState;
    use otagw::plugin::{PluginHost, Trust};
    use std::time::Duration;

    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (keys.path().join("a"), keys.path().join("b"));
    let (a_pub, b_pub) = (signing::keygen(&a).unwrap(), signing::keygen(&b).unwrap());
    let sign = |component: &str, key: &Path| {
        let bytes = std::fs::read(component).unwrap();
        signing::sign(&bytes, &signing::secret_key(key).unwrap(), None).unwrap()
    };
    let dir = PluginsDir::with(&[]);
    dir.add_raw("xmodem.wasm", &sign(artifacts::XMODEM, &a));
    dir.add_raw("smp.wasm", &std::fs::read(artifacts::SMP).unwrap());
    dir.add_raw("stm32.wasm", &sign(artifacts::STM32, &b));

    let host = PluginHost::new(test_limits(), None).unwrap();
    host.set_trust(Trust::load(std::slice::from_ref(&a_pub), 1, true).unwrap());
    host.load_dir(dir.path()).await.unwrap();
    let families: Vec<String> = host
        .families()
        .iter()
        .map(|p| p.info.name.clone())
        .collect();
    assert_eq!(families, ["xmodem"]);
    let broken = host.broken();
    let why = |name: &str| broken[&dir.path().join(name)].clone();
    assert!(why("smp.wasm").contains("not signed"), "{broken:?}");
    assert!(
        why("stm32.wasm").contains("no valid signature by a trusted key"),
        "{broken:?}"
    );

    // Dropped in later, signed by a trusted key: loads. With two keys
    // needed, one signature is not enough.
    host.set_trust(Trust::load(&[a_pub, b_pub], 2, true).unwrap());
    let mut state = DirState::loaded_now(dir.path());
    let t0 = tokio::time::Instant::now();
    let settle = Duration::from_millis(100);
    dir.add_raw("stm32.wasm", &sign(artifacts::STM32, &a));
    host.reconcile(dir.path(), &mut state, t0, settle).await;
    let c = host
        .reconcile(dir.path(), &mut state, t0 + settle, settle)
        .await;
    assert!(
        c.failed.len() == 1
            && c.failed[0]
                .1
                .contains("signed by 1 trusted key(s), 2 needed"),
        "{c:?}"
    );
    let twice = signing::sign(
        &sign(artifacts::STM32, &a),
        &signing::secret_key(&b).unwrap(),
        None,
    )
    .unwrap();
    dir.add_raw("stm32.wasm", &twice);
    host.reconcile(dir.path(), &mut state, t0 + settle * 2, settle)
        .await;
    let c = host
        .reconcile(dir.path(), &mut state, t0 + settle * 4, settle)
        .await;
    assert_eq!(c.loaded.len(), 1, "{c:?}");
    assert!(host.get("stm32").is_some());

    // Without require_signatures, a technician's unsigned drop-in loads.
    let host = PluginHost::new(test_limits(), None).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    assert!(host.get("smp").is_some() && host.broken().is_empty());
}

/// `otagw plugin install`: a plugin signed by a trusted key replaces the
/// file that provides its family, atomically, keeping the old one as
/// `.prev`; unsigned, untrusted and lying files are refused and nothing in
/// the directory changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_install_checks_then_replaces_the_familys_file_keeping_the_previous() {
    use otagw::plugin::signing;

    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let current = plugins
        .path()
        .join(Path::new(artifacts::XMODEM).file_name().unwrap());
    let original = std::fs::read(&current).unwrap();
    let (key, other) = (w.join("release.key"), w.join("other.key"));
    let public = signing::keygen(&key).unwrap();
    signing::keygen(&other).unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = w.join("otagw.toml");
    std::fs::write(
        &config,
        gateway_config(data.path(), plugins.path(), None, &[]).replace(
            "[plugins]\n",
            &format!(
                "[plugins]\ntrusted_keys = [{:?}]\n",
                public.display().to_string()
            ),
        ),
    )
    .unwrap();
    let install = |file: &Path| {
        let (config, file) = (config.clone(), file.to_path_buf());
        async move { otagw(&["plugin", "install", "--config", s(&config), s(&file)]).await }
    };
    let unchanged = || {
        assert_eq!(
            std::fs::read(&current).unwrap(),
            original,
            "nothing changed"
        );
    };

    // Refused: unsigned, signed by a key that is not trusted, and a manifest
    // that claims another family.
    let o = install(Path::new(artifacts::XMODEM)).await;
    assert!(
        !o.status.success() && text(&o).contains("not signed"),
        "{}",
        text(&o)
    );
    unchanged();
    let untrusted = w.join("untrusted.wasm");
    let o = otagw(&[
        "plugin",
        "sign",
        "--key",
        s(&other),
        artifacts::XMODEM,
        "-o",
        s(&untrusted),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = install(&untrusted).await;
    assert!(
        !o.status.success() && text(&o).contains("no valid signature by a trusted key"),
        "{}",
        text(&o)
    );
    unchanged();
    let lying = w.join("lying.wasm");
    let manifest = signing::Manifest {
        family: "smp".into(),
        version: "9.9.9".into(),
        security_version: 0,
        contract: "0.2.0".into(),
        min_gateway: "0.1.0".into(),
    };
    std::fs::write(
        &lying,
        signing::sign(
            &original,
            &signing::secret_key(&key).unwrap(),
            Some(&manifest),
        )
        .unwrap(),
    )
    .unwrap();
    let o = install(&lying).await;
    assert!(
        !o.status.success() && text(&o).contains("its manifest says smp 9.9.9"),
        "{}",
        text(&o)
    );
    unchanged();

    // Signed by the trusted key: it replaces the file that had the family.
    let signed = w.join("xmodem.signed.wasm");
    let o = otagw(&[
        "plugin",
        "sign",
        "--key",
        s(&key),
        artifacts::XMODEM,
        "-o",
        s(&signed),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = install(&signed).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("installed xmodem"), "{}", text(&o));
    assert_eq!(
        std::fs::read(&current).unwrap(),
        std::fs::read(&signed).unwrap()
    );
    let prev = otagw::plugin::install::previous_of(&current);
    assert_eq!(std::fs::read(&prev).unwrap(), original);
    let wasm = std::fs::read_dir(plugins.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
        .count();
    assert_eq!(wasm, 1, "one file for the family");
}
