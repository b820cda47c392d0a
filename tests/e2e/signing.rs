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
