//! The daemon core under faults it cannot prevent: a job task that panics, a
//! gateway that dies at the worst moment. The gateway runs as its own process
//! with the fault injection points of the `failpoints` feature (`FAILPOINTS`);
//! the platform is mosquitto and a recording client.

use std::time::Duration;

use otagw_e2e::*;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");
/// Upper bound for a whole upgrade in these tests (never a synchronisation).
const LIMIT: Duration = Duration::from_secs(120);

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

/// Every (step, desc) reported for `dn`, in order.
fn steps(probe: &MqttProbe, dn: &str) -> Vec<(String, String)> {
    payloads(probe, &topic("progress", dn))
        .iter()
        .map(|p| {
            (
                p["params"]["step"].as_str().unwrap_or_default().to_string(),
                p["params"]["desc"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The platform (mosquitto and a recording client), an HTTP server, the
/// xmodem plugin and one simulated leaf `dn`, with the gateway's config.
struct World {
    _broker: Mosquitto,
    probe: MqttProbe,
    files: FileServer,
    _plugins: PluginsDir,
    data: tempfile::TempDir,
    sim: PtySim,
    config: String,
}

async fn world(dn: &str) -> World {
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let leaves = [LeafSpec::xmodem(dn, &sim.url())];
    let config = gateway_config(data.path(), plugins.path(), Some(&broker.url()), &leaves);
    World {
        probe,
        files: FileServer::start().await,
        data,
        sim,
        config,
        _broker: broker,
        _plugins: plugins,
    }
}

impl World {
    /// Start the gateway with `failpoints` and wait for its first informs.
    async fn gateway(&self, dn: &str, failpoints: &str) -> GatewayProcess {
        let path = self.data.path().join("otagw.toml");
        let gw = GatewayProcess::start_with_env(
            GATEWAY_BIN,
            &self.config,
            &path,
            &[("FAILPOINTS", failpoints)],
        )
        .await;
        self.probe
            .wait_until(LIMIT, "informs", |m| {
                has_inform(m, &topic("inform", dn), "1.0.0")
            })
            .await;
        gw
    }
}

/// Every version informed for `dn`, in order.
fn informs(probe: &MqttProbe, dn: &str) -> Vec<String> {
    payloads(probe, &topic("inform", dn))
        .iter()
        .map(|p| {
            p["params"]["version"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_task_panics_is_reported_and_the_leaf_takes_its_next_notice() {
    let w = world("p").await;
    let (probe, files, sim) = (&w.probe, &w.files, &w.sim);
    // The first flash panics inside the gateway's host path.
    let gw = w.gateway("p", "runner-flash=1*panic(injected fault)").await;
    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    probe
        .publish(&topic("upgrade", "p"), notice(1, "2.0.0", &url, &img))
        .await;
    probe
        .wait_until(LIMIT, "the -1 of the panicked job", |m| {
            has_step(m, &topic("progress", "p"), "-1")
        })
        .await;
    let (_, desc) = steps(probe, "p").pop().unwrap();
    assert!(
        desc.contains("the gateway failed while the job was flashing")
            && desc.contains("injected fault"),
        "{desc}"
    );
    let jobs = http_get_json(gw.api, "/api/jobs").await;
    assert_eq!(jobs[0]["state"], "failed", "{jobs}");
    assert_eq!(jobs[0]["step"], -1, "{jobs}");

    // Same process, no restart: the leaf takes its next notice, on the same
    // link (its lock was freed) and a slot (its permit was freed).
    let img2 = versioned_image(20_000, "2.0.1");
    let url2 = files.add("fw2.bin", img2.clone());
    probe
        .publish(&topic("upgrade", "p"), notice(2, "2.0.1", &url2, &img2))
        .await;
    probe
        .wait_until(LIMIT, "the next upgrade", |m| {
            has_inform(m, &topic("inform", "p"), "2.0.1")
        })
        .await;
    assert_padded(&sim.handle().next_image().await.data, &img2, 0x1a);
    // Exactly one terminal report for the failed notice.
    let failures = steps(probe, "p")
        .into_iter()
        .filter(|(s, _)| s == "-1")
        .count();
    assert_eq!(failures, 1);
    gw.kill().await;
    w.sim.shutdown().await;
}

/// The gateway dies right after a leaf's success is persisted and before
/// anything about it is published. After the restart it must report the
/// success once (the same messages) and, at every later start, inform the new
/// version: the platform judges an upgrade by `inform` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_the_moment_of_success_never_informs_the_old_version() {
    let w = world("s").await;
    let (probe, files, sim) = (&w.probe, &w.files, &w.sim);
    let (config, path) = (&w.config, w.data.path().join("otagw.toml"));
    let gw = w.gateway("s", "job-ended-unpublished=return").await;
    let img = versioned_image(20_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    probe
        .publish(&topic("upgrade", "s"), notice(1, "2.0.0", &url, &img))
        .await;
    let status = gw.exited(LIMIT).await;
    assert!(!status.success(), "the fault point aborts the gateway");
    assert_eq!(sim.handle().version(), "2.0.0", "the leaf was upgraded");
    assert!(
        !has_step(&probe.messages(), &topic("progress", "s"), "100"),
        "nothing was published before the crash"
    );
    let informs_before = informs(probe, "s").len();

    // Restart: the end of the job goes out, once, with the new version.
    let gw = GatewayProcess::start(GATEWAY_BIN, config, &path).await;
    probe
        .wait_until(LIMIT, "the success after the restart", |m| {
            has_step(m, &topic("progress", "s"), "100")
                && m.iter()
                    .filter(|m| m.topic == topic("inform", "s"))
                    .skip(informs_before)
                    .count()
                    >= 2
        })
        .await;
    gw.kill().await;
    // And again: every inform since the crash names the version the leaf runs.
    let gw = GatewayProcess::start(GATEWAY_BIN, config, &path).await;
    probe
        .wait_until(LIMIT, "the inform of the third start", |m| {
            m.iter()
                .filter(|m| m.topic == topic("inform", "s"))
                .skip(informs_before)
                .count()
                >= 3
        })
        .await;
    let after: Vec<String> = informs(probe, "s").split_off(informs_before);
    assert!(after.iter().all(|v| v == "2.0.0"), "informs {after:?}");
    let successes: Vec<serde_json::Value> = payloads(probe, &topic("progress", "s"))
        .into_iter()
        .filter(|p| p["params"]["step"] == "100")
        .collect();
    let ids: std::collections::BTreeSet<String> = successes
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "one terminal report: {successes:?}");
    gw.kill().await;
    w.sim.shutdown().await;
}
