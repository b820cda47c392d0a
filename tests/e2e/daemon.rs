//! The daemon end to end: upgrade notices through a real broker (mosquitto),
//! images from a real HTTP server, leaves simulated on real pseudo-terminals,
//! and everything the platform would see checked in its exact JSON.

use std::time::Duration;

use otagw_e2e::*;

/// Upper bound for a whole upgrade in these tests (never a synchronisation).
const LIMIT: Duration = Duration::from_secs(120);

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

struct Setup {
    broker: Mosquitto,
    probe: MqttProbe,
    files: FileServer,
    plugins: PluginsDir,
    data: tempfile::TempDir,
}

async fn setup() -> Setup {
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    Setup {
        broker,
        probe,
        files: FileServer::start().await,
        plugins: PluginsDir::with(&[artifacts::XMODEM]),
        data: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn config(&self, leaves: &[LeafSpec]) -> String {
        gateway_config(
            self.data.path(),
            self.plugins.path(),
            Some(&self.broker.url()),
            leaves,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_leaves_upgrade_through_a_real_broker() {
    let s = setup().await;
    let sims: Vec<PtySim> = (0..3)
        .map(|_| PtySim::spawn(xmodem_device()).unwrap())
        .collect();
    let names = ["leaf-1", "leaf-2", "leaf-3"];
    let leaves: Vec<LeafSpec> = names
        .iter()
        .zip(&sims)
        .map(|(n, sim)| LeafSpec::xmodem(n, &sim.url()))
        .collect();
    let gw = Daemon::start(&s.config(&leaves)).await;

    // On connect the gateway reports every leaf's version.
    s.probe
        .wait_until(LIMIT, "informs of 1.0.0", |m| {
            names
                .iter()
                .all(|n| has_inform(m, &topic("inform", n), "1.0.0"))
        })
        .await;

    let img = versioned_image(200_000, "2.0.0");
    let url = s.files.add("fw-2.0.0.bin", img.clone());
    for (i, n) in names.iter().enumerate() {
        s.probe
            .publish(
                &topic("upgrade", n),
                notice(100 + i as u64, "2.0.0", &url, &img),
            )
            .await;
    }
    s.probe
        .wait_until(LIMIT, "informs of 2.0.0", |m| {
            names
                .iter()
                .all(|n| has_inform(m, &topic("inform", n), "2.0.0"))
        })
        .await;

    for (n, sim) in names.iter().zip(&sims) {
        // The exact JSON of protocol.md: id a string, step a string, default module omitted.
        let progress = payloads(&s.probe, &topic("progress", n));
        let steps: Vec<i64> = progress
            .iter()
            .map(|p| {
                assert!(p["id"].is_string(), "{p}");
                assert!(
                    p["params"].get("module").is_none(),
                    "default module is omitted: {p}"
                );
                let step = p["params"]["step"]
                    .as_str()
                    .unwrap_or_else(|| panic!("step is a string: {p}"));
                step.parse().unwrap()
            })
            .collect();
        assert!(steps.len() >= 2, "{n}: progress {steps:?}");
        assert!(
            steps.windows(2).all(|w| w[0] < w[1]),
            "{n}: rising progress {steps:?}"
        );
        assert_eq!(steps.last(), Some(&100), "{n}: {steps:?}");
        let informs = payloads(&s.probe, &topic("inform", n));
        let last = informs.last().unwrap();
        assert_eq!(
            last["params"],
            serde_json::json!({"version": "2.0.0"}),
            "{last}"
        );
        assert!(last["id"].is_string());
        // The device holds the image and runs it.
        assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);
        assert_eq!(sim.handle().version(), "2.0.0");
    }
    // One download, however many leaves.
    let reqs = s.files.requests("fw-2.0.0.bin");
    assert_eq!(reqs.len(), 1, "{reqs:?}");

    // The API shows the same.
    let devices = gw.api_get("/api/devices").await;
    for d in devices.as_array().unwrap() {
        assert_eq!(d["version"], "2.0.0", "{d}");
        assert_eq!(d["state"], "succeeded", "{d}");
    }
    // A gateway summary was published.
    assert!(
        !s.probe
            .on(&format!("/{GW_PK}/{GW_DN}/user/ota/summary"))
            .is_empty()
    );
    gw.stop().await;
    for sim in sims {
        sim.shutdown().await;
    }
}
