//! Issue 14, items 3 and 4: remote plugin updates through the platform's
//! OTA path (a notice on the gateway's own upgrade topic for module
//! `plugin.<family>`), their checks, probation and rollback. Real mosquitto,
//! real HTTP, leaves on real ptys, real components signed in wasmsign2's
//! format (the CLI interop is `signing.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use otagw::plugin::signing::{self, Manifest};
use otagw_e2e::*;
use sha2::{Digest, Sha256};

const LIMIT: Duration = Duration::from_secs(120);
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");

fn gw_topic(kind: &str) -> String {
    format!("/ota/device/{kind}/{GW_PK}/{GW_DN}")
}

fn leaf_topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A notice for a plugin on the gateway's own topic.
fn plugin_notice(id: u64, family: &str, version: &str, url: &str, bytes: &[u8]) -> String {
    let md5 = md5_hex(bytes);
    serde_json::json!({
        "code": "1000", "message": "success", "id": id,
        "data": {"size": bytes.len(), "version": version, "url": url,
                 "md5": md5, "sign": md5, "signMethod": "Md5",
                 "module": format!("plugin.{family}")}
    })
    .to_string()
}

/// Keys of a publisher.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The secret key `name` (made on first use) and its public key's path.
    fn key(&self, name: &str) -> (signing::SecretKey, PathBuf) {
        let secret = self.dir.path().join(name);
        if !secret.exists() {
            signing::keygen(&secret).unwrap();
        }
        (
            signing::secret_key(&secret).unwrap(),
            PathBuf::from(format!("{}.pub", secret.display())),
        )
    }
}

fn manifest(family: &str, version: &str, security_version: u64) -> Manifest {
    Manifest {
        family: family.into(),
        version: version.into(),
        security_version,
        contract: "0.2.0".into(),
        min_gateway: "0.1.0".into(),
    }
}

/// `component` signed in turn by each of `keys`, with `m` inside.
fn signed(component: &[u8], m: &Manifest, keys: &[&signing::SecretKey]) -> Vec<u8> {
    let mut bytes = component.to_vec();
    for k in keys {
        bytes = signing::sign(&bytes, k, Some(m)).unwrap();
    }
    bytes
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// The `[plugins]` section of the test gateways: `keys` trusted, updates
/// watched for `jobs` jobs and rolled back at `faults` plugin faults.
fn plugins_section(keys: &[&Path], threshold: usize, jobs: u32, faults: u32) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|k| format!("{:?}", k.display().to_string()))
        .collect();
    format!(
        "[plugins]\ntrusted_keys = [{}]\nthreshold = {threshold}\nprobation_jobs = {jobs}\n\
         probation_faults = {faults}\nprobation_time = \"1h\"\nsettle = \"200ms\"\n",
        keys.join(", ")
    )
}

/// The xmodem plugin file of a plugins directory made by `PluginsDir::with`.
fn xmodem_file(plugins: &PluginsDir) -> PathBuf {
    plugins
        .path()
        .join(Path::new(artifacts::XMODEM).file_name().unwrap())
}

/// The progress reports on the gateway's own topic for `module`: (step, desc).
fn gw_steps(probe: &MqttProbe, module: &str) -> Vec<(String, String)> {
    payloads(probe, &gw_topic("progress"))
        .iter()
        .filter(|p| p["params"]["module"] == module)
        .map(|p| {
            (
                p["params"]["step"].as_str().unwrap_or_default().to_string(),
                p["params"]["desc"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn has_gw_step(m: &[Message], module: &str, step: &str) -> bool {
    m.iter().any(|m| {
        m.topic == gw_topic("progress")
            && serde_json::from_slice::<serde_json::Value>(&m.payload)
                .is_ok_and(|v| v["params"]["step"] == step && v["params"]["module"] == module)
    })
}

fn has_module_inform(m: &[Message], module: &str, version: &str) -> bool {
    m.iter().any(|m| {
        m.topic == gw_topic("inform")
            && serde_json::from_slice::<serde_json::Value>(&m.payload)
                .is_ok_and(|v| v["params"]["module"] == module && v["params"]["version"] == version)
    })
}

/// Sign `component` as xmodem `version` (security version `sv`) with
/// `key`, serve it and send its notice (id `id`); the signed bytes.
async fn push_xmodem(
    probe: &MqttProbe,
    files: &FileServer,
    key: &signing::SecretKey,
    component: &str,
    (version, sv, id): (&str, u64, u64),
) -> Vec<u8> {
    let bytes = signed(&read(component), &manifest("xmodem", version, sv), &[key]);
    let url = files.add(&format!("xmodem-{version}-{id}.wasm"), bytes.clone());
    probe
        .publish(
            &gw_topic("upgrade"),
            plugin_notice(id, "xmodem", version, &url, &bytes),
        )
        .await;
    bytes
}

/// Wait until xmodem `version` is reported in service (100, inform).
async fn in_service(probe: &MqttProbe, version: &str) {
    probe
        .wait_until(LIMIT, &format!("xmodem {version} in service"), |m| {
            has_gw_step(m, "plugin.xmodem", "100") && has_module_inform(m, "plugin.xmodem", version)
        })
        .await;
}

/// Send leaf `dn` a notice for `img` (the firmware `version`) at `url`.
async fn upgrade_leaf(
    probe: &MqttProbe,
    dn: &str,
    id: u64,
    (version, url): (&str, &str),
    img: &[u8],
) {
    probe
        .publish(&leaf_topic("upgrade", dn), notice(id, version, url, img))
        .await;
}

/// Acceptance: a job runs on xmodem 0.1.0 (held mid-transfer by its
/// device); a signed xmodem 0.1.1 arrives by notice and goes into service
/// at once; the running job completes on the instance it started with (the
/// update's probation does not count it), the next job runs the new one
/// (counted), and the platform sees the new module version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_update_arrives_while_a_job_runs_and_the_next_job_uses_it() {
    test_log();
    let keys = Keys::new();
    let (key, public) = keys.key("release.key");
    let held = PtySim::spawn(XmodemSimConfig {
        hold_after: Some(3),
        ..xmodem_device()
    })
    .unwrap();
    let next = PtySim::spawn(xmodem_device()).unwrap();
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let mut a = LeafSpec::xmodem("press-a", &held.url());
    // The sender waits as long as the device holds its ACK.
    a.options.push(("block_timeout_ms".into(), "600000".into()));
    let b = LeafSpec::xmodem("press-b", &next.url());
    let config = gateway_config(data.path(), plugins.path(), Some(&broker.url()), &[a, b])
        .replace("[plugins]\n", &plugins_section(&[&public], 1, 2, 2));
    let gw = Daemon::start(&config).await;
    probe
        .wait_until(LIMIT, "plugin.xmodem 0.1.0 informed", |m| {
            has_module_inform(m, "plugin.xmodem", "0.1.0")
        })
        .await;

    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    upgrade_leaf(&probe, "press-a", 1, ("2.0.0", &url), &img).await;
    held.handle().holding().await;

    let update = push_xmodem(
        &probe,
        &files,
        &key,
        artifacts::XMODEM_NEXT,
        ("0.1.1", 1, 7),
    )
    .await;
    in_service(&probe, "0.1.1").await;
    assert!(
        !has_inform(&probe.messages(), &leaf_topic("inform", "press-a"), "2.0.0"),
        "the first job is still held"
    );
    let file = xmodem_file(&plugins);
    assert_eq!(sha(&std::fs::read(&file).unwrap()), sha(&update));
    assert_eq!(
        sha(&std::fs::read(otagw::plugin::install::previous_of(&file)).unwrap()),
        sha(&read(artifacts::XMODEM)),
        "the previous version is kept"
    );

    held.handle().release();
    probe
        .wait_until(LIMIT, "press-a runs 2.0.0", |m| {
            has_inform(m, &leaf_topic("inform", "press-a"), "2.0.0")
        })
        .await;
    let listed = gw.api_get("/api/plugins").await;
    let watched = &listed["updates"]["xmodem"]["update"];
    assert_eq!(watched["phase"]["phase"], "probation", "{listed}");
    assert_eq!(
        watched["phase"]["jobs"], 0,
        "the job under way finished on 0.1.0: {listed}"
    );

    upgrade_leaf(&probe, "press-b", 2, ("2.0.0", &url), &img).await;
    probe
        .wait_until(LIMIT, "press-b runs 2.0.0", |m| {
            has_inform(m, &leaf_topic("inform", "press-b"), "2.0.0")
        })
        .await;
    let listed = gw.api_get("/api/plugins").await;
    let watched = &listed["updates"]["xmodem"]["update"]["phase"];
    assert_eq!(
        (watched["jobs"].as_u64(), watched["faults"].as_u64()),
        (Some(1), Some(0)),
        "the next job ran on 0.1.1: {listed}"
    );
    let loaded = listed["loaded"].as_array().unwrap();
    assert!(
        loaded
            .iter()
            .any(|p| p["family"] == "xmodem" && p["version"] == "0.1.1"),
        "{listed}"
    );
    assert_eq!(listed["updates"]["xmodem"]["floor"], 0, "{listed}");

    // The second job on 0.1.1 ends its probation (probation_jobs = 2): the
    // family's security floor rises to the update's.
    let img2 = versioned_image(20_000, "2.0.1");
    let url2 = files.add("fw2.bin", img2.clone());
    upgrade_leaf(&probe, "press-a", 3, ("2.0.1", &url2), &img2).await;
    probe
        .wait_until(LIMIT, "press-a runs 2.0.1", |m| {
            has_inform(m, &leaf_topic("inform", "press-a"), "2.0.1")
        })
        .await;
    let listed = gw.api_get("/api/plugins").await;
    let record = &listed["updates"]["xmodem"];
    assert!(record["update"].is_null(), "probation over: {listed}");
    assert_eq!(record["floor"], 1, "{listed}");
    let steps = gw_steps(&probe, "plugin.xmodem");
    assert!(
        steps.iter().all(|(s, _)| !s.starts_with('-')),
        "no failure reported: {steps:?}"
    );
    gw.stop().await;
    assert_padded(&held.handle().next_image().await.data, &img, 0x1a);
    held.shutdown().await;
    next.shutdown().await;
}

/// A gateway's surroundings: a publisher's key it trusts, one xmodem leaf
/// ("press") on a pty, mosquitto, an HTTP server, xmodem 0.1.0 installed;
/// updates rolled back at `faults` plugin faults.
struct World {
    _keys: Keys,
    key: signing::SecretKey,
    sim: PtySim,
    _broker: Mosquitto,
    probe: MqttProbe,
    files: FileServer,
    plugins: PluginsDir,
    data: tempfile::TempDir,
    config: String,
}

async fn world(faults: u32) -> World {
    let keys = Keys::new();
    let (key, public) = keys.key("release.key");
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let config = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[LeafSpec::xmodem("press", &sim.url())],
    )
    .replace("[plugins]\n", &plugins_section(&[&public], 1, 5, faults));
    World {
        _keys: keys,
        key,
        sim,
        _broker: broker,
        probe,
        files: FileServer::start().await,
        plugins,
        data,
        config,
    }
}

/// Acceptance: an update whose flash traps every time is rolled back after
/// `probation_faults` faulty jobs; the platform hears -4 on the plugin
/// module with why, and the old version; the next job runs on the old
/// plugin; the same version is refused when it comes again; the security
/// floor did not rise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_traps_after_an_update_is_rolled_back_and_the_platform_hears_why() {
    test_log();
    let w = world(2).await;
    let (probe, files, key, plugins) = (&w.probe, &w.files, &w.key, &w.plugins);
    let gw = Daemon::start(&w.config).await;

    push_xmodem(probe, files, key, artifacts::XMODEM_TRAP, ("0.1.2", 4, 7)).await;
    in_service(probe, "0.1.2").await;

    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    let progress = leaf_topic("progress", "press");
    for id in 1..=2u64 {
        upgrade_leaf(probe, "press", id, ("2.0.0", &url), &img).await;
        probe
            .wait_until(LIMIT, "the job fails in the plugin", |m| {
                payloads_in(m, &progress)
                    .iter()
                    .filter(|p| p["params"]["step"] == "-1")
                    .count()
                    >= id as usize
            })
            .await;
    }
    // 0.1.0 informed again after 0.1.2 was.
    let after_update = probe
        .messages()
        .iter()
        .position(|x| has_module_inform(std::slice::from_ref(x), "plugin.xmodem", "0.1.2"))
        .unwrap();
    probe
        .wait_until(LIMIT, "the rollback: -4 and 0.1.0 informed again", |m| {
            has_gw_step(m, "plugin.xmodem", "-4")
                && has_module_inform(&m[after_update..], "plugin.xmodem", "0.1.0")
        })
        .await;
    let (_, why) = gw_steps(probe, "plugin.xmodem")
        .into_iter()
        .find(|(s, _)| s == "-4")
        .unwrap();
    assert!(
        why.contains("rolled back to 0.1.0")
            && why.contains("2 of its 2 job(s)")
            && why.contains("trapped"),
        "{why}"
    );
    let file = xmodem_file(plugins);
    assert_eq!(
        sha(&std::fs::read(&file).unwrap()),
        sha(&read(artifacts::XMODEM)),
        "the previous file is back"
    );

    // The next job runs on 0.1.0 and succeeds.
    upgrade_leaf(probe, "press", 3, ("2.0.0", &url), &img).await;
    probe
        .wait_until(LIMIT, "press runs 2.0.0", |m| {
            has_inform(m, &leaf_topic("inform", "press"), "2.0.0")
        })
        .await;

    // The bad version stays out.
    push_xmodem(probe, files, key, artifacts::XMODEM_TRAP, ("0.1.2", 4, 8)).await;
    probe
        .wait_until(LIMIT, "0.1.2 refused", |m| {
            has_gw_step(m, "plugin.xmodem", "-1")
        })
        .await;
    let (_, desc) = gw_steps(probe, "plugin.xmodem")
        .into_iter()
        .find(|(s, _)| s == "-1")
        .unwrap();
    assert!(desc.contains("was rolled back"), "{desc}");
    let listed = gw.api_get("/api/plugins").await;
    let record = &listed["updates"]["xmodem"];
    assert_eq!(
        record["floor"], 0,
        "probation failed: no new floor: {listed}"
    );
    assert_eq!(record["blocked"][0]["version"], "0.1.2", "{listed}");
    gw.stop().await;
    w.sim.shutdown().await;
}

/// The JSON payloads on `topic` among `messages`.
fn payloads_in(messages: &[Message], topic: &str) -> Vec<serde_json::Value> {
    messages
        .iter()
        .filter(|m| m.topic == topic)
        .filter_map(|m| serde_json::from_slice(&m.payload).ok())
        .collect()
}

/// Bad input: each notice is refused with its step code and a desc that
/// says why; the plugin in service and its file stay as they were. Last, a
/// notice for a family the gateway does not have yet installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_plugin_update_is_refused_with_its_step_and_nothing_is_lost() {
    test_log();
    let keys = Keys::new();
    let (k1, p1) = keys.key("one.key");
    let (k2, p2) = keys.key("two.key");
    let (stranger, _) = keys.key("stranger.key");
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    // A floor this gateway reached before (a passed probation).
    std::fs::write(
        data.path().join("plugin-updates.json"),
        r#"{"families": {"xmodem": {"floor": 5}}}"#,
    )
    .unwrap();
    let config = gateway_config(data.path(), plugins.path(), Some(&broker.url()), &[])
        .replace("[plugins]\n", &plugins_section(&[&p1, &p2], 2, 5, 2));
    let gw = Daemon::start(&config).await;
    let file = xmodem_file(&plugins);
    let original = std::fs::read(&file).unwrap();

    let next = read(artifacts::XMODEM_NEXT);
    let good = |m: &Manifest| signed(&next, m, &[&k1, &k2]);
    let m = manifest("xmodem", "0.1.1", 5);
    let mut tampered = good(&m);
    let at = tampered.len() - 100;
    tampered[at] ^= 0x01;
    // A component header, then a type section of garbage.
    let garbage: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00, 0x07, 0x02, 0xff, 0xff,
    ];

    // (what, family of the notice, version of the notice, bytes served,
    //  bytes the notice describes, step, desc)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        Vec<u8>,
        Option<Vec<u8>>,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "tampered",
            "xmodem",
            "0.1.1",
            tampered,
            None,
            "-3",
            "signature refused",
        ),
        (
            "unsigned",
            "xmodem",
            "0.1.1",
            next.clone(),
            None,
            "-3",
            "not signed",
        ),
        (
            "untrusted",
            "xmodem",
            "0.1.1",
            signed(&next, &m, &[&stranger]),
            None,
            "-3",
            "no valid signature by a trusted key",
        ),
        (
            "below threshold",
            "xmodem",
            "0.1.1",
            signed(&next, &m, &[&k1]),
            None,
            "-3",
            "signed by 1 trusted key(s), 2 needed",
        ),
        (
            "another family",
            "stm32",
            "0.1.1",
            good(&m),
            None,
            "-3",
            "signed as family \"xmodem\"",
        ),
        (
            "version mismatch",
            "xmodem",
            "0.1.9",
            good(&m),
            None,
            "-3",
            "announces 0.1.9",
        ),
        (
            "older security version",
            "xmodem",
            "0.1.1",
            good(&manifest("xmodem", "0.1.1", 4)),
            None,
            "-3",
            "security version 4 is below 5",
        ),
        (
            "manifest unlike the plugin",
            "xmodem",
            "0.1.7",
            good(&manifest("xmodem", "0.1.7", 5)),
            None,
            "-3",
            "the plugin itself says xmodem 0.1.1",
        ),
        (
            "unsupported contract",
            "future",
            "1.0.0",
            signed(
                &read(artifacts::FUTURE_CONTRACT),
                &manifest("future", "1.0.0", 0),
                &[&k1, &k2],
            ),
            None,
            "-3",
            "contract",
        ),
        (
            "does not compile",
            "xmodem",
            "0.1.1",
            signed(garbage, &m, &[&k1, &k2]),
            None,
            "-3",
            "not a valid component",
        ),
        (
            "does not type-check",
            "fs",
            "0.1.0",
            signed(
                &read(artifacts::FS_IMPORT),
                &manifest("fs", "0.1.0", 0),
                &[&k1, &k2],
            ),
            None,
            "-3",
            "imports",
        ),
        (
            "size mismatch",
            "xmodem",
            "0.1.1",
            good(&m),
            Some({
                let mut b = good(&m);
                b.push(0);
                b
            }),
            "-3",
            "size mismatch",
        ),
        (
            "digest mismatch",
            "xmodem",
            "0.1.1",
            good(&m),
            Some({
                let mut b = good(&m);
                let last = b.len() - 1;
                b[last] ^= 0xff;
                b
            }),
            "-3",
            "digest mismatch",
        ),
    ];
    for (i, (what, family, version, served, described, step, desc)) in cases.into_iter().enumerate()
    {
        let module = format!("plugin.{family}");
        let failures = |m: &[Message]| {
            payloads_in(m, &gw_topic("progress"))
                .iter()
                .filter(|p| {
                    p["params"]["module"] == module.as_str()
                        && p["params"]["step"]
                            .as_str()
                            .is_some_and(|s| s.starts_with('-'))
                })
                .count()
        };
        let before = failures(&probe.messages());
        let url = files.add(&format!("case-{i}.wasm"), served.clone());
        let described = described.unwrap_or(served);
        probe
            .publish(
                &gw_topic("upgrade"),
                plugin_notice(100 + i as u64, family, version, &url, &described),
            )
            .await;
        probe
            .wait_until(LIMIT, what, |m| failures(m) > before)
            .await;
        let (got, got_desc) = gw_steps(&probe, &module)
            .into_iter()
            .rfind(|(s, _)| s.starts_with('-'))
            .unwrap();
        assert_eq!(got, step, "{what}: {got_desc}");
        assert!(
            got_desc.contains(desc),
            "{what}: {got_desc:?} lacks {desc:?}"
        );
        assert_eq!(
            std::fs::read(&file).unwrap(),
            original,
            "{what}: the plugin file is untouched"
        );
    }
    assert!(
        !otagw::plugin::install::previous_of(&file).exists(),
        "nothing was installed"
    );
    let listed = gw.api_get("/api/plugins").await;
    let loaded = listed["loaded"].as_array().unwrap();
    assert_eq!(loaded.len(), 1, "{listed}");
    assert_eq!(loaded[0]["version"], "0.1.0", "{listed}");
    assert_eq!(loaded[0]["sha256"], sha(&original), "{listed}");

    // A family this gateway does not have: an install, allowed when signed.
    let smp = signed(
        &read(artifacts::SMP),
        &manifest("smp", "0.1.0", 0),
        &[&k1, &k2],
    );
    let url = files.add("smp.wasm", smp.clone());
    probe
        .publish(
            &gw_topic("upgrade"),
            plugin_notice(200, "smp", "0.1.0", &url, &smp),
        )
        .await;
    probe
        .wait_until(LIMIT, "plugin.smp installed", |m| {
            has_gw_step(m, "plugin.smp", "100") && has_module_inform(m, "plugin.smp", "0.1.0")
        })
        .await;
    assert_eq!(
        sha(&std::fs::read(plugins.path().join("smp.wasm")).unwrap()),
        sha(&smp)
    );
    gw.stop().await;
}

/// The `*.wasm` files of a plugins directory.
fn wasm_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    files.sort();
    files
}

/// `kill -9` (an abort at a fault injection point) right after the update's
/// file is renamed into place, then right after the rollback's file is put
/// back: each restart finds one file for the family and finishes what the
/// ledger says, without losing the previous version nor reporting twice
/// what it did not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_and_its_rollback_survive_a_kill_at_their_worst_moments() {
    let w = world(1).await;
    let (probe, files, key, plugins, config) = (&w.probe, &w.files, &w.key, &w.plugins, &w.config);
    let config_path = w.data.path().join("otagw.toml");
    let file = xmodem_file(plugins);
    let original = std::fs::read(&file).unwrap();

    // 1. Killed with the new file in place, the ledger saying "received".
    let gw = GatewayProcess::start_with_env(
        GATEWAY_BIN,
        config,
        &config_path,
        &[("FAILPOINTS", "plugin-installed=return")],
    )
    .await;
    let bad = push_xmodem(probe, files, key, artifacts::XMODEM_TRAP, ("0.1.2", 1, 7)).await;
    assert!(
        !gw.exited(LIMIT).await.success(),
        "aborted at the failpoint"
    );
    assert_eq!(wasm_files(plugins.path()), vec![file.clone()]);
    assert_eq!(std::fs::read(&file).unwrap(), bad);
    let prev = otagw::plugin::install::previous_of(&file);
    assert_eq!(std::fs::read(&prev).unwrap(), original);
    assert!(!has_gw_step(&probe.messages(), "plugin.xmodem", "100"));

    // 2. The restart finishes the update (not installing it again: the
    //    previous version stays the original), then the trapping plugin's
    //    first job rolls it back, and it is killed right after the file is
    //    back.
    let gw = GatewayProcess::start_with_env(
        GATEWAY_BIN,
        config,
        &config_path,
        &[("FAILPOINTS", "plugin-restored=return")],
    )
    .await;
    in_service(probe, "0.1.2").await;
    assert_eq!(std::fs::read(&prev).unwrap(), original);
    let img = versioned_image(20_000, "2.0.0");
    let fw = files.add("fw.bin", img.clone());
    upgrade_leaf(probe, "press", 1, ("2.0.0", &fw), &img).await;
    assert!(
        !gw.exited(LIMIT).await.success(),
        "aborted at the failpoint"
    );
    assert_eq!(wasm_files(plugins.path()), vec![file.clone()]);
    assert_eq!(std::fs::read(&file).unwrap(), original);
    assert!(!has_gw_step(&probe.messages(), "plugin.xmodem", "-4"));

    // 3. The restart finishes the rollback: the platform hears why, the old
    //    version is in service, the bad one is kept out.
    let gw = GatewayProcess::start(GATEWAY_BIN, config, &config_path).await;
    probe
        .wait_until(LIMIT, "the rollback's -4 after the restart", |m| {
            has_gw_step(m, "plugin.xmodem", "-4")
        })
        .await;
    let listed = http_get_json(gw.api, "/api/plugins").await;
    assert_eq!(listed["loaded"][0]["version"], "0.1.0", "{listed}");
    assert_eq!(
        listed["updates"]["xmodem"]["blocked"][0]["version"], "0.1.2",
        "{listed}"
    );
    assert!(listed["updates"]["xmodem"]["update"].is_null(), "{listed}");
    let minus4 = gw_steps(probe, "plugin.xmodem")
        .into_iter()
        .filter(|(s, _)| s == "-4")
        .count();
    assert_eq!(minus4, 1, "reported once");
    assert_eq!(wasm_files(plugins.path()), vec![file.clone()]);
    gw.kill().await;
    w.sim.shutdown().await;
}
