//! The daemon end to end: upgrade notices through a real broker (mosquitto),
//! images from a real HTTP server, leaves simulated on real pseudo-terminals,
//! and everything the platform would see checked in its exact JSON.

use std::time::Duration;

use otagw_e2e::*;

/// `otagw`, as a program of this test package.
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");

/// Upper bound for a whole upgrade in these tests (never a synchronisation).
const LIMIT: Duration = Duration::from_secs(120);

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

struct Setup {
    // Restarted by a test: `restart` needs `&mut`.
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

/// The last progress message on a leaf's topic, parsed.
fn last_progress(probe: &MqttProbe, dn: &str) -> serde_json::Value {
    payloads(probe, &topic("progress", dn))
        .pop()
        .expect("a progress message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_the_right_step_code_and_the_gateway_keeps_serving() {
    let s = setup().await;
    let good_sim = PtySim::spawn(xmodem_device()).unwrap();
    let silent_sim = PtySim::spawn(xmodem_device()).unwrap();
    let mut leaves = vec![LeafSpec::xmodem("good", &good_sim.url())];
    // Never enters its bootloader (no enter_command): it never answers.
    let mut silent = LeafSpec::xmodem("silent", &silent_sim.url());
    silent.options = opts(&[("handshake_timeout_ms", "1000")]);
    leaves.push(silent);
    let gw = Daemon::start(&s.config(&leaves)).await;
    s.probe
        .wait_until(LIMIT, "informs", |m| {
            has_inform(m, &topic("inform", "good"), "1.0.0")
        })
        .await;

    let img = versioned_image(30_000, "2.0.0");
    let url = s.files.add("fw.bin", img.clone());
    let truncated = s.files.add("truncated.bin", img.clone());
    s.files.fault("truncated.bin", Fault::Truncate(5_000));
    let unreachable = format!("http://127.0.0.1:{}/fw.bin", otagw_testkit::free_port());

    // Each bad notice in turn, on the good leaf: (payload, step, words in desc).
    let other = md5_hex(b"some other image");
    let wrong_md5 =
        serde_json::json!({"code":"1000","id":1,"data":{"size":img.len(),"version":"2.0.3",
        "url":url,"md5":other,"sign":other,"signMethod":"Md5"}})
        .to_string();
    let mqtt_download =
        serde_json::json!({"code":"1000","id":2,"data":{"size":30000,"version":"2.0.0",
        "dProtocol":"mqtt","streamId":7,"streamFileId":1,"sign":md5_hex(&img),"signMethod":"Md5"}})
        .to_string();
    let other_module =
        serde_json::json!({"code":"1000","id":3,"data":{"size":30000,"version":"2.0.0",
        "url":url,"sign":md5_hex(&img),"signMethod":"Md5","module":"MCU"}})
        .to_string();
    // A notice that claims a terabyte: refused before a byte is fetched.
    let huge = serde_json::json!({"code":"1000","id":9,"data":{"size":1_000_000_000_000u64,
        "version":"9.9.9","url":s.files.add("huge.bin", b"tiny".to_vec()),
        "sign":md5_hex(b"tiny"),"signMethod":"Md5"}})
    .to_string();
    let cases: Vec<(String, &str, &[&str])> = vec![
        (huge, "-2", &["1000000000000 bytes", "max_image_mib"]),
        ("{not json".into(), "-1", &["not JSON"]),
        (
            r#"{"code":"1000","id":4,"data":{"version":"2.0.0"}}"#.into(),
            "-1",
            &["size"],
        ),
        (other_module, "-1", &["MCU", "not managed"]),
        (mqtt_download, "-2", &["MQTT"]),
        (notice(5, "2.0.1", &unreachable, &img), "-2", &[]),
        (notice(6, "2.0.2", &truncated, &img), "-2", &[]),
        (wrong_md5, "-3", &["md5"]),
    ];
    for (payload, step, words) in &cases {
        let before = s.probe.on(&topic("progress", "good")).len();
        s.probe
            .publish(&topic("upgrade", "good"), payload.as_str())
            .await;
        s.probe
            .wait_until(LIMIT, &format!("step {step} for {payload}"), |m| {
                m.iter()
                    .filter(|m| m.topic == topic("progress", "good"))
                    .skip(before)
                    .any(|m| {
                        serde_json::from_slice::<serde_json::Value>(&m.payload).is_ok_and(|v| {
                            v["params"]["step"]
                                .as_str()
                                .is_some_and(|st| st.starts_with('-'))
                        })
                    })
            })
            .await;
        let p = last_progress(&s.probe, "good");
        assert_eq!(p["params"]["step"], *step, "{payload}: {p}");
        let desc = p["params"]["desc"].as_str().unwrap();
        assert!(!desc.is_empty() && desc.len() < 128, "{desc:?}");
        for w in *words {
            assert!(
                desc.to_lowercase().contains(&w.to_lowercase()),
                "{payload}: desc {desc:?} lacks {w:?}"
            );
        }
    }
    assert!(
        s.files.requests("huge.bin").is_empty(),
        "nothing was downloaded for the 1 TB notice"
    );
    // A leaf that never answers: -4.
    s.probe
        .publish(&topic("upgrade", "silent"), notice(7, "2.0.0", &url, &img))
        .await;
    s.probe
        .wait_until(LIMIT, "the silent leaf fails", |m| {
            has_step(m, &topic("progress", "silent"), "-4")
        })
        .await;
    let p = last_progress(&s.probe, "silent");
    assert!(
        p["params"]["desc"].as_str().unwrap().contains("timeout"),
        "{p}"
    );

    // Still serving: a good notice succeeds.
    s.probe
        .publish(&topic("upgrade", "good"), notice(8, "2.0.0", &url, &img))
        .await;
    s.probe
        .wait_until(LIMIT, "the good upgrade", |m| {
            has_inform(m, &topic("inform", "good"), "2.0.0")
        })
        .await;
    let devices = gw.api_get("/api/devices").await;
    let silent = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_name"] == "silent")
        .unwrap();
    assert_eq!(silent["state"], "failed");
    assert!(
        silent["last_error"].as_str().unwrap().contains("timeout"),
        "{silent}"
    );
    gw.stop().await;
    good_sim.shutdown().await;
    silent_sim.shutdown().await;
}

/// Kill the gateway (SIGKILL) while it downloads and, on a second leaf, while
/// it flashes; start it again: the download resumes with a Range request, and
/// every job ends in success, reported upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_resumes_downloads_and_flashes() {
    let s = setup().await;
    let config_path = s.data.path().join("otagw.toml");
    // 3 MiB: big enough that a kill lands mid-way in either phase.
    let img = versioned_image(3 << 20, "3.0.0");

    // --- during a download: the server stalls after 2 MiB.
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let leaves = vec![LeafSpec::xmodem("dl", &sim.url())];
    let url = s.files.add("big.bin", img.clone());
    s.files.fault("big.bin", Fault::StallAfter(2 << 20));
    let gw = GatewayProcess::start(GATEWAY_BIN, &s.config(&leaves), &config_path).await;
    s.probe
        .wait_until(LIMIT, "informs", |m| {
            has_inform(m, &topic("inform", "dl"), "1.0.0")
        })
        .await;
    s.probe
        .publish(&topic("upgrade", "dl"), notice(1, "3.0.0", &url, &img))
        .await;
    // Download progress is 0-30 % of the job: 15 % means over 1.5 MiB stored.
    s.probe
        .wait_until(LIMIT, "download progress", |m| {
            progress_at_least(m, "dl", 15)
        })
        .await;
    gw.kill().await;
    s.files.clear_fault("big.bin");
    let gw = GatewayProcess::start(GATEWAY_BIN, &s.config(&leaves), &config_path).await;
    s.probe
        .wait_until(LIMIT, "the resumed upgrade", |m| {
            has_inform(m, &topic("inform", "dl"), "3.0.0")
        })
        .await;
    let reqs = s.files.requests("big.bin");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let range = reqs[1]
        .range
        .as_deref()
        .expect("the second request resumes with Range");
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from >= 1 << 20, "resumed from {from}");
    assert_eq!(reqs[1].status, 206);
    assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);
    gw.kill().await;

    // --- during a flash.
    let sim2 = PtySim::spawn(xmodem_device()).unwrap();
    let leaves = vec![
        LeafSpec::xmodem("dl", &sim.url()),
        LeafSpec::xmodem("fl", &sim2.url()),
    ];
    let gw = GatewayProcess::start(GATEWAY_BIN, &s.config(&leaves), &config_path).await;
    s.probe
        .wait_until(LIMIT, "informs", |m| {
            has_inform(m, &topic("inform", "fl"), "1.0.0")
        })
        .await;
    s.probe
        .publish(&topic("upgrade", "fl"), notice(2, "3.0.0", &url, &img))
        .await;
    // Flashing is 35-95 %.
    s.probe
        .wait_until(LIMIT, "flash progress", |m| progress_at_least(m, "fl", 50))
        .await;
    gw.kill().await;
    let before = s.files.requests("big.bin").len();
    let gw = GatewayProcess::start(GATEWAY_BIN, &s.config(&leaves), &config_path).await;
    s.probe
        .wait_until(LIMIT, "the resumed flash", |m| {
            has_inform(m, &topic("inform", "fl"), "3.0.0")
        })
        .await;
    assert_eq!(
        s.files.requests("big.bin").len(),
        before,
        "the image came from the cache"
    );
    assert_padded(&sim2.handle().next_image().await.data, &img, 0x1a);
    // The job's terminal report reached the broker.
    assert!(has_step(
        &s.probe.messages(),
        &topic("progress", "fl"),
        "100"
    ));
    gw.kill().await;
    sim.shutdown().await;
    sim2.shutdown().await;
}

/// Whether a leaf reported progress of at least `percent`.
fn progress_at_least(messages: &[Message], dn: &str, percent: i64) -> bool {
    messages.iter().any(|m| {
        m.topic == topic("progress", dn)
            && serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| {
                    v["params"]["step"]
                        .as_str()
                        .and_then(|s| s.parse::<i64>().ok())
                })
                .is_some_and(|s| s >= percent)
    })
}

/// The broker restarts while a leaf is being flashed: the gateway reconnects,
/// progress resumes, and the terminal report and new version arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_upgrade_loses_no_terminal_state() {
    let mut s = setup().await;
    // A 921600 baud line: the 1 MiB flash takes ~12 s, so the gateway is
    // surely back before it ends (its reconnect backoff starts at 0.5 s).
    let sim = PtySim::spawn(XmodemSimConfig {
        line_rate: Some(921_600),
        ..xmodem_device()
    })
    .unwrap();
    let gw = Daemon::start(&s.config(&[LeafSpec::xmodem("br", &sim.url())])).await;
    s.probe
        .wait_until(LIMIT, "informs", |m| {
            has_inform(m, &topic("inform", "br"), "1.0.0")
        })
        .await;
    let img = versioned_image(1 << 20, "4.0.0");
    let url = s.files.add("br.bin", img.clone());
    s.probe
        .publish(&topic("upgrade", "br"), notice(1, "4.0.0", &url, &img))
        .await;
    s.probe
        .wait_until(LIMIT, "flash progress", |m| progress_at_least(m, "br", 45))
        .await;
    let seen_before = s.probe.messages().len();
    s.broker.restart().await;
    s.probe
        .wait_until(LIMIT, "the new version after the restart", |m| {
            has_inform(m, &topic("inform", "br"), "4.0.0")
        })
        .await;
    let after: Vec<Message> = s.probe.messages().into_iter().skip(seen_before).collect();
    assert!(
        has_step(&after, &topic("progress", "br"), "100"),
        "the terminal report arrived after the restart"
    );
    let resumed = after.iter().any(|m| {
        m.topic == topic("progress", "br")
            && serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| {
                    v["params"]["step"]
                        .as_str()
                        .and_then(|s| s.parse::<i64>().ok())
                })
                .is_some_and(|s| (46..100).contains(&s))
    });
    assert!(resumed, "progress resumed after the reconnect");
    assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);
    gw.stop().await;
    sim.shutdown().await;
}

/// An expired download URL (403, as the platform's object store answers) makes
/// the gateway ask `firmware/get`; the fresh notice in the reply finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_url_is_renewed_through_firmware_get() {
    let s = setup().await;
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let gw = Daemon::start(&s.config(&[LeafSpec::xmodem("exp", &sim.url())])).await;
    let get_topic = format!("/sys/{LEAF_PK}/exp/thing/ota/firmware/get");
    // On connect the gateway informs and asks `firmware/get` once; wait for
    // both, so the request counted below is the one the 403 causes.
    s.probe
        .wait_until(LIMIT, "inform and firmware/get on connect", |m| {
            has_inform(m, &topic("inform", "exp"), "1.0.0")
                && m.iter().any(|m| m.topic == get_topic)
        })
        .await;
    let img = versioned_image(40_000, "2.0.0");
    let stale = s.files.add("stale.bin", img.clone());
    s.files.fault("stale.bin", Fault::Status(403));
    let fresh = s.files.add("fresh.bin", img.clone());
    let asked_before = s.probe.on(&get_topic).len();
    s.probe
        .publish(&topic("upgrade", "exp"), notice(1, "2.0.0", &stale, &img))
        .await;
    s.probe
        .wait_until(LIMIT, "firmware/get after the 403", |m| {
            m.iter().filter(|m| m.topic == get_topic).count() > asked_before
        })
        .await;
    let md5 = md5_hex(&img);
    let reply = serde_json::json!({"id": "9", "code": 200, "data": {"size": img.len(), "version": "2.0.0",
        "url": fresh, "md5": md5, "sign": md5, "signMethod": "Md5"}});
    s.probe
        .publish(
            &format!("/sys/{LEAF_PK}/exp/thing/ota/firmware/get_reply"),
            reply.to_string(),
        )
        .await;
    s.probe
        .wait_until(LIMIT, "the upgrade with the fresh URL", |m| {
            has_inform(m, &topic("inform", "exp"), "2.0.0")
        })
        .await;
    assert!(
        !has_step(&s.probe.messages(), &topic("progress", "exp"), "-2"),
        "no download failure reported"
    );
    assert_eq!(s.files.requests("stale.bin").len(), 1);
    assert_eq!(s.files.requests("fresh.bin").len(), 1);
    gw.stop().await;
    sim.shutdown().await;
}

/// Where in the probe's record a leaf's job ran: from its first progress
/// message to its step 100.
fn span(messages: &[Message], dn: &str) -> (usize, usize) {
    let t = topic("progress", dn);
    let first = messages
        .iter()
        .position(|m| m.topic == t)
        .expect("progress");
    let last = messages
        .iter()
        .rposition(|m| m.topic == t && m.text().contains("\"step\":\"100\""))
        .expect("step 100");
    (first, last)
}

async fn upgrade_all_and_check_no_overlap(extra_config: &str, links: [&str; 2], sims: &[&PtySim]) {
    let s = setup().await;
    let leaves = [
        LeafSpec::xmodem("a", links[0]),
        LeafSpec::xmodem("b", links[1]),
    ];
    let gw = Daemon::start(&format!("{}{extra_config}", s.config(&leaves))).await;
    s.probe
        .wait_until(LIMIT, "informs", |m| {
            has_inform(m, &topic("inform", "b"), "1.0.0")
        })
        .await;
    let img = versioned_image(60_000, "2.0.0");
    let url = s.files.add("fw.bin", img.clone());
    s.probe
        .publish(&topic("upgrade", "a"), notice(1, "2.0.0", &url, &img))
        .await;
    s.probe
        .publish(&topic("upgrade", "b"), notice(2, "2.0.0", &url, &img))
        .await;
    s.probe
        .wait_until(LIMIT, "both upgrades", |m| {
            has_inform(m, &topic("inform", "a"), "2.0.0")
                && has_inform(m, &topic("inform", "b"), "2.0.0")
        })
        .await;
    let m = s.probe.messages();
    let (a, b) = (span(&m, "a"), span(&m, "b"));
    assert!(
        a.1 < b.0 || b.1 < a.0,
        "the jobs overlapped: a {a:?}, b {b:?}"
    );
    for sim in sims {
        assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);
    }
    gw.stop().await;
}

/// Two leaves on one physical link (an RS-485 bus, one serial port) never
/// run at the same time, whatever the parallel limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_at_a_time_per_link() {
    let sim = PtySim::spawn(xmodem_device()).unwrap();
    let url = sim.url();
    upgrade_all_and_check_no_overlap("[jobs]\nmax_parallel = 8\n", [&url, &url], &[&sim, &sim])
        .await;
    sim.shutdown().await;
}

/// The global parallel limit holds across links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_parallel_limit_holds() {
    let (s1, s2) = (
        PtySim::spawn(xmodem_device()).unwrap(),
        PtySim::spawn(xmodem_device()).unwrap(),
    );
    upgrade_all_and_check_no_overlap(
        "[jobs]\nmax_parallel = 1\n",
        [&s1.url(), &s2.url()],
        &[&s1, &s2],
    )
    .await;
    s1.shutdown().await;
    s2.shutdown().await;
}
