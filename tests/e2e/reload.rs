//! Issue 14, item 1: hot reload of the plugins directory. Real plugin
//! components from `plugins/`, a real directory; the watcher's looks are
//! driven with explicit instants (what "settled" means is a time), and the
//! daemon test waits on what the gateway tells the broker.

use std::path::Path;
use std::time::Duration;

use otagw::plugin::PluginHost;
use otagw::plugin::watch::DirState;
use otagw_e2e::*;
use tokio::time::Instant;

const SETTLE: Duration = Duration::from_secs(1);

/// `component` with a custom section appended: the same plugin, other bytes
/// (a rebuilt release), so a new sha256.
fn rebuilt(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"otagw-test-rebuild";
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0); // custom section
    let mut n = body.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&body);
    out
}

fn sha(host: &PluginHost, family: &str) -> Option<String> {
    host.get(family).map(|p| p.sha256.clone())
}

/// A changed file is loaded once it settled and swapped in for new jobs; a
/// job under way keeps the plugin it started with. A broken replacement is
/// reported and the good version stays; a removed file takes the family
/// out of service for new jobs only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_plugin_is_swapped_in_and_running_jobs_keep_theirs() {
    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    let file = dir
        .path()
        .join(Path::new(artifacts::XMODEM).file_name().unwrap());
    let host = PluginHost::new(test_limits(), None).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let mut state = DirState::loaded_now(dir.path());
    let first = sha(&host, "xmodem").unwrap();
    let t0 = Instant::now();
    // Nothing changed: nothing to do.
    assert!(
        host.reconcile(dir.path(), &mut state, t0 + SETTLE, SETTLE)
            .await
            .is_empty()
    );

    let running = host.session("xmodem", None).await.unwrap();
    let original = std::fs::read(&file).unwrap();
    std::fs::write(&file, rebuilt(&original, "1")).unwrap();
    // Seen, not settled: not loaded yet.
    let c = host.reconcile(dir.path(), &mut state, t0, SETTLE).await;
    assert!(c.is_empty(), "{c:?}");
    assert_eq!(sha(&host, "xmodem").unwrap(), first);
    // Settled: swapped in.
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE, SETTLE)
        .await;
    assert_eq!(c.loaded.len(), 1, "{c:?}");
    let second = sha(&host, "xmodem").unwrap();
    assert_ne!(second, first);
    assert_eq!(
        running.plugin().sha256,
        first,
        "the job under way keeps its plugin"
    );
    let next = host.session("xmodem", None).await.unwrap();
    assert_eq!(next.plugin().sha256, second, "a new job gets the new one");

    // A broken replacement: reported, and the good version stays in service.
    std::fs::write(&file, b"\0asm not really").unwrap();
    host.reconcile(dir.path(), &mut state, t0 + SETTLE * 2, SETTLE)
        .await;
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE * 3, SETTLE)
        .await;
    assert_eq!(c.failed.len(), 1, "{c:?}");
    assert!(c.failed[0].1.contains("not a valid component"), "{c:?}");
    assert_eq!(sha(&host, "xmodem").unwrap(), second);
    assert!(host.broken().contains_key(&file));
    // The same broken bytes are not tried again at every look.
    assert!(
        host.reconcile(dir.path(), &mut state, t0 + SETTLE * 4, SETTLE)
            .await
            .is_empty()
    );

    // Fixed: loaded, no longer reported.
    std::fs::write(&file, &original).unwrap();
    host.reconcile(dir.path(), &mut state, t0 + SETTLE * 5, SETTLE)
        .await;
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE * 6, SETTLE)
        .await;
    assert_eq!(c.loaded.len(), 1, "{c:?}");
    assert!(host.broken().is_empty());

    // Removed: no new jobs; the ones under way finish on what they hold.
    std::fs::remove_file(&file).unwrap();
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE * 7, SETTLE)
        .await;
    assert_eq!(c.removed, vec!["xmodem".to_string()], "{c:?}");
    assert!(host.get("xmodem").is_none());
    assert!(host.session("xmodem", None).await.is_err());
    assert_eq!(running.plugin().info.name, "xmodem");
}

/// A copy in progress is never loaded nor reported broken: a half-written
/// file waits until it stopped changing for the settle time. Files not
/// named `*.wasm` (a copy's temporary name) are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_plugin_is_not_loaded_until_it_settles() {
    let dir = PluginsDir::with(&[]);
    let host = PluginHost::new(test_limits(), None).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let mut state = DirState::loaded_now(dir.path());
    let smp = std::fs::read(artifacts::SMP).unwrap();
    let target = dir.path().join("smp.wasm");
    let t0 = Instant::now();

    dir.add_raw("smp.wasm.part", &smp);
    std::fs::write(&target, &smp[..smp.len() / 2]).unwrap();
    let c = host.reconcile(dir.path(), &mut state, t0, SETTLE).await;
    assert!(c.is_empty(), "{c:?}");
    // More of it arrives before it settled: the clock starts again.
    std::fs::write(&target, &smp[..smp.len() * 3 / 4]).unwrap();
    let c = host
        .reconcile(
            dir.path(),
            &mut state,
            t0 + SETTLE - Duration::from_millis(1),
            SETTLE,
        )
        .await;
    assert!(c.is_empty(), "{c:?}");
    std::fs::write(&target, &smp).unwrap();
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE * 3 / 2, SETTLE)
        .await;
    assert!(c.is_empty() && host.get("smp").is_none(), "{c:?}");
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE * 3, SETTLE)
        .await;
    assert_eq!(c.loaded.len(), 1, "{c:?}");
    assert!(c.failed.is_empty() && host.broken().is_empty(), "{c:?}");
    assert_eq!(host.families().len(), 1, "the .part file is not a plugin");
}

/// Drop-in, through the daemon: a device whose family has no plugin gets
/// its notice answered -1; a technician copies the family into
/// `plugins_dir` (written under another name, then renamed into place); the
/// gateway loads it without a restart, tells the platform the plugin's
/// version, and the device's next notice upgrades it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_family_dropped_into_plugins_dir_takes_the_next_notice_without_a_restart() {
    test_log();
    const LIMIT: Duration = Duration::from_secs(120);
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    let plugins = PluginsDir::with(&[artifacts::SMP]);
    let data = tempfile::tempdir().unwrap();
    let leaf = LeafSpec::xmodem("press-1", &sim.url());
    let config = gateway_config(data.path(), plugins.path(), Some(&broker.url()), &[leaf])
        .replace("[plugins]\n", "[plugins]\nsettle = \"200ms\"\n");
    let gw = Daemon::start(&config).await;
    let topic = |kind: &str| format!("/ota/device/{kind}/{LEAF_PK}/press-1");
    let gw_inform = format!("/ota/device/inform/{GW_PK}/{GW_DN}");

    probe
        .publish(&topic("upgrade"), notice(1, "2.0.0", &url, &img))
        .await;
    probe
        .wait_until(LIMIT, "the notice refused: no plugin", |m| {
            has_step(m, &topic("progress"), "-1")
        })
        .await;
    let refused = payloads(&probe, &topic("progress"));
    assert!(
        refused
            .iter()
            .any(|p| p["params"]["desc"].to_string().contains("xmodem")),
        "{refused:?}"
    );

    // The technician's copy: a temporary name, then a rename into place.
    let part = plugins.path().join("xmodem.wasm.part");
    std::fs::copy(artifacts::XMODEM, &part).unwrap();
    std::fs::rename(&part, plugins.path().join("xmodem.wasm")).unwrap();
    probe
        .wait_until(LIMIT, "the gateway informs plugin.xmodem", |m| {
            m.iter()
                .any(|m| m.topic == gw_inform && m.text().contains("plugin.xmodem"))
        })
        .await;
    let listed = gw.api_get("/api/plugins").await;
    assert!(
        listed["loaded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["family"] == "xmodem"),
        "{listed}"
    );

    probe
        .publish(&topic("upgrade"), notice(2, "2.0.0", &url, &img))
        .await;
    probe
        .wait_until(LIMIT, "the leaf runs 2.0.0", |m| {
            has_inform(m, &topic("inform"), "2.0.0")
        })
        .await;
    gw.stop().await;
    assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);
    sim.shutdown().await;
}

/// What a remote update or a rollback swaps in itself (prepare, install,
/// adopt) is not loaded a second time when the watcher sees its file
/// change: same digest, already in service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_already_in_service_is_not_loaded_again() {
    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    let file = dir
        .path()
        .join(Path::new(artifacts::XMODEM).file_name().unwrap());
    let host = PluginHost::new(test_limits(), None).unwrap();
    host.load_dir(dir.path()).await.unwrap();
    let mut state = DirState::loaded_now(dir.path());
    let t0 = Instant::now();

    let next = rebuilt(&std::fs::read(&file).unwrap(), "remote");
    let prepared = host.prepare(&file, &next).await.unwrap();
    otagw::plugin::install::install(&file, &next).unwrap();
    let adopted = host.adopt(prepared).unwrap();
    host.reconcile(dir.path(), &mut state, t0, SETTLE).await;
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE, SETTLE)
        .await;
    assert!(c.is_empty(), "{c:?}");
    assert!(std::sync::Arc::ptr_eq(
        &host.get("xmodem").unwrap(),
        &adopted
    ));

    // Other bytes in the same file are still loaded as always.
    std::fs::write(&file, rebuilt(&next, "local")).unwrap();
    host.reconcile(dir.path(), &mut state, t0 + SETTLE * 2, SETTLE)
        .await;
    let c = host
        .reconcile(dir.path(), &mut state, t0 + SETTLE * 3, SETTLE)
        .await;
    assert_eq!(c.loaded.len(), 1, "{c:?}");
}
