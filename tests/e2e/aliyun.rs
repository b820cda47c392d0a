//! `auth = "aliyun"` end to end (issue 11): the gateway against a strict
//! double of the platform's sub-device rules (`otagw_testkit::platform`) on a
//! real mosquitto, with leaves simulated on real pseudo-terminals. The double
//! flags every message published for a leaf the platform does not have
//! online; every test ends with none.

use std::time::Duration;

use otagw_e2e::*;
use otagw_testkit::{AliyunPlatform, Identity, PlatformEvent, PlatformOptions};

/// Upper bound of every wait here (never a synchronisation).
const LIMIT: Duration = Duration::from_secs(90);
const GW_SECRET: &str = "gw-secret";

fn secret(dn: &str) -> String {
    format!("secret-of-{dn}")
}

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

struct Setup {
    broker: Mosquitto,
    platform: AliyunPlatform,
    files: FileServer,
    plugins: PluginsDir,
    data: tempfile::TempDir,
    sims: Vec<PtySim>,
    names: Vec<String>,
}

/// `n` leaves registered on the platform, each behind an XMODEM simulator.
async fn setup(n: usize, tune: impl FnOnce(&mut PlatformOptions)) -> Setup {
    let broker = Mosquitto::start_with_log_topic().await;
    let names: Vec<String> = (1..=n).map(|i| format!("leaf-{i}")).collect();
    let mut opts = PlatformOptions::new(
        Identity::new(GW_PK, GW_DN, GW_SECRET),
        names
            .iter()
            .map(|dn| Identity::new(LEAF_PK, dn, &secret(dn)))
            .collect(),
    );
    tune(&mut opts);
    let platform = AliyunPlatform::start(broker.port(), opts).await;
    Setup {
        broker,
        platform,
        files: FileServer::start().await,
        plugins: PluginsDir::with(&[artifacts::XMODEM]),
        data: tempfile::tempdir().unwrap(),
        sims: (0..n)
            .map(|_| PtySim::spawn(xmodem_device()).unwrap())
            .collect(),
        names,
    }
}

impl Setup {
    /// The gateway's configuration in aliyun mode; `secrets` overrides a
    /// leaf's device secret (a wrong one, on purpose).
    fn config(&self, secrets: &[(&str, &str)]) -> String {
        let leaves: Vec<LeafSpec> = self
            .names
            .iter()
            .zip(&self.sims)
            .map(|(n, sim)| LeafSpec::xmodem(n, &sim.url()))
            .collect();
        let plain = gateway_config(
            self.data.path(),
            self.plugins.path(),
            Some(&self.broker.url()),
            &leaves,
        );
        let mut out = String::new();
        for line in plain.lines() {
            if line == "auth = \"none\"" {
                out.push_str("auth = \"aliyun\"\n");
                continue;
            }
            out.push_str(line);
            out.push('\n');
            if line == format!("device_name = \"{GW_DN}\"") {
                out.push_str(&format!("device_secret = \"{GW_SECRET}\"\n"));
            } else if let Some(dn) = line
                .strip_prefix("device_name = \"")
                .and_then(|r| r.strip_suffix('"'))
            {
                let s = secrets
                    .iter()
                    .find(|(d, _)| *d == dn)
                    .map_or_else(|| secret(dn), |(_, s)| (*s).to_owned());
                out.push_str(&format!("device_secret = \"{s}\"\n"));
            }
        }
        out
    }

    fn keys(&self) -> Vec<(&str, &str)> {
        self.names.iter().map(|n| (LEAF_PK, n.as_str())).collect()
    }

    async fn shutdown(self, gw: Daemon) {
        gw.stop().await;
        for sim in self.sims {
            sim.shutdown().await;
        }
    }
}

/// Whether the platform took in an inform of `version` for `dn`.
fn informed(platform: &AliyunPlatform, dn: &str, version: &str) -> bool {
    has_inform(&platform.accepted(), &topic("inform", dn), version)
}

/// `dn`'s entry of the status API once `pred` holds for it. The API has no
/// change stream: it is read again every 50 ms, at most until [`LIMIT`].
async fn device_when(
    gw: &Daemon,
    dn: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let devices = gw.api_get("/api/devices").await;
        let d = devices
            .as_array()
            .and_then(|a| a.iter().find(|d| d["device_name"] == dn))
            .cloned()
            .unwrap_or_else(|| panic!("{dn} is not in the API: {devices}"));
        if pred(&d) {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {LIMIT:?}; last: {d}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many requests the gateway made on the topic ending in `suffix`.
fn requests(log: &[PlatformEvent], suffix: &str) -> usize {
    log.iter()
        .filter(|e| {
            matches!(
                e,
                PlatformEvent::Accepted { .. } | PlatformEvent::Lost { .. }
            ) && e.message().is_some_and(|m| m.topic.ends_with(suffix))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_come_online_despite_a_slow_topology_reply_and_a_lost_login_then_upgrade() {
    let s = setup(2, |o| {
        o.topo_reply_delay = Duration::from_millis(1500);
        o.lose_first_logins = 1;
        o.login_reply_delay = Duration::from_millis(300);
    })
    .await;
    let gw = Daemon::start(&s.config(&[])).await;

    s.platform.wait_online(&s.keys(), LIMIT).await;
    let log = s.platform.log();
    assert_eq!(
        requests(&log, "/thing/topo/add"),
        1,
        "one topo/add, answered late"
    );
    assert_eq!(
        requests(&log, "/combine/batch_login"),
        2,
        "the lost login was sent again (and only once more)"
    );
    // The version of each leaf, read from it, reaches the platform once the
    // leaf is online (the journal is new: nothing is informed before).
    for n in &s.names {
        let n = n.clone();
        s.platform
            .wait_for(LIMIT, &format!("an inform of 1.0.0 for {n}"), |log| {
                log.iter().any(|e| {
                    matches!(e, PlatformEvent::Accepted { message, .. }
                        if message.topic == topic("inform", &n) && message.text().contains("1.0.0"))
                })
            })
            .await;
    }

    // The API shows both online.
    let devices = gw.api_get("/api/devices").await;
    for d in devices.as_array().unwrap() {
        assert_eq!(d["platform"]["state"], "online", "{d}");
        assert_eq!(d["platform"]["last_error"], serde_json::Value::Null, "{d}");
    }

    // An upgrade goes through: progress and the new version are accepted.
    let img = versioned_image(150_000, "2.0.0");
    let url = s.files.add("fw-2.0.0.bin", img.clone());
    let md5 = md5_hex(&img);
    s.platform
        .notify_upgrade(
            LEAF_PK,
            "leaf-1",
            serde_json::json!({"size": img.len(), "version": "2.0.0", "url": url,
                               "md5": md5, "sign": md5, "signMethod": "Md5"}),
        )
        .await
        .expect("leaf-1 is online");
    s.platform
        .wait_for(LIMIT, "an inform of 2.0.0 for leaf-1", |log| {
            log.iter().any(|e| {
                matches!(e, PlatformEvent::Accepted { message, .. }
                    if message.topic == topic("inform", "leaf-1") && message.text().contains("2.0.0"))
            })
        })
        .await;
    assert!(has_step(
        &s.platform.accepted(),
        &topic("progress", "leaf-1"),
        "100"
    ));
    assert_eq!(s.sims[0].handle().version(), "2.0.0");
    s.platform.assert_no_violations();
    s.shutdown(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_leaves_are_logged_in_again_before_anything_is_published() {
    // A login takes effect with its reply, 500 ms later: a gateway that
    // publishes for a leaf after sending its login but before the reply is
    // caught too.
    let mut s = setup(2, |o| o.login_reply_delay = Duration::from_millis(500)).await;
    let gw = Daemon::start(&s.config(&[])).await;
    s.platform.wait_online(&s.keys(), LIMIT).await;
    for n in &s.names {
        let n = n.clone();
        s.platform
            .wait_for(LIMIT, &format!("the first inform of {n}"), |log| {
                log.iter().any(|e| {
                    matches!(e, PlatformEvent::Accepted { message, .. } if message.topic == topic("inform", &n))
                })
            })
            .await;
    }
    let before = s.platform.log().len();

    s.broker.restart().await;

    // Reconnected, logged in again, and the on-connect informs accepted:
    // each only after its leaf's new login.
    for n in s.names.clone() {
        s.platform
            .wait_for(LIMIT, &format!("{n} informed after its new login"), |log| {
                let after = &log[before.min(log.len())..];
                let login = after.iter().position(|e| {
                    matches!(e, PlatformEvent::Online { device_name, .. } if *device_name == n)
                });
                login.is_some_and(|at| {
                    after[at..].iter().any(|e| {
                        matches!(e, PlatformEvent::Accepted { message, .. } if message.topic == topic("inform", &n))
                    })
                })
            })
            .await;
    }
    assert!(s.platform.connects() >= 2, "the gateway connected again");
    s.platform.assert_no_violations();
    s.shutdown(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_keeps_only_that_leaf_offline_and_the_console_can_remove_one() {
    let s = setup(3, |_| {}).await;
    let gw = Daemon::start(&s.config(&[("leaf-2", "not-the-secret")])).await;

    s.platform
        .wait_online(&[(LEAF_PK, "leaf-1"), (LEAF_PK, "leaf-3")], LIMIT)
        .await;
    assert!(!s.platform.is_online(LEAF_PK, "leaf-2"));
    // The status API says which leaf and why.
    let leaf2 = device_when(&gw, "leaf-2", "leaf-2 parked", |d| {
        d["platform"]["parked"] == true
    })
    .await;
    assert_eq!(leaf2["platform"]["parked"], true, "{leaf2}");
    assert_ne!(leaf2["platform"]["state"], "online", "{leaf2}");
    let err = leaf2["platform"]["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("6287") && err.contains("device_secret"),
        "{err}"
    );
    // The others were served: their informs are accepted.
    for n in ["leaf-1", "leaf-3"] {
        s.platform
            .wait_for(LIMIT, &format!("an inform for {n}"), |log| {
                log.iter().any(|e| {
                    matches!(e, PlatformEvent::Accepted { message, .. } if message.topic == topic("inform", n))
                })
            })
            .await;
    }
    assert!(!informed(&s.platform, "leaf-2", "1.0.0"));

    // The console removes leaf-3 from the topology: offline, not added back.
    s.platform.topo_change(1, &[(LEAF_PK, "leaf-3")]).await;
    s.platform.wait_offline(&[(LEAF_PK, "leaf-3")], LIMIT).await;
    let d = device_when(&gw, "leaf-3", "leaf-3 shown removed", |d| {
        d["platform"]["state"] == "not_in_topology"
    })
    .await;
    assert_eq!(d["platform"]["parked"], true, "{d}");
    assert!(!s.platform.in_topology(LEAF_PK, "leaf-3"));
    s.platform.assert_no_violations();
    s.shutdown(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_removed_from_the_config_is_logged_out_and_deleted_at_the_next_start() {
    let mut s = setup(2, |_| {}).await;
    let gw = Daemon::start(&s.config(&[])).await;
    s.platform.wait_online(&s.keys(), LIMIT).await;
    gw.stop().await;
    s.platform.wait_offline(&s.keys(), LIMIT).await;

    // leaf-2 leaves the configuration; the operator asks for topo/delete.
    s.names.truncate(1);
    let config = s.config(&[]).replace(
        "auth = \"aliyun\"\n",
        "auth = \"aliyun\"\ndelete_removed_leaves = true\n",
    );
    let gw = Daemon::start(&config).await;
    s.platform
        .wait_for(LIMIT, "leaf-2 out of the topology", |log| {
            log.iter().any(|e| {
                matches!(e, PlatformEvent::TopologyRemoved { device_name, .. } if device_name == "leaf-2")
            })
        })
        .await;
    s.platform.wait_online(&[(LEAF_PK, "leaf-1")], LIMIT).await;
    let log = s.platform.log();
    let logout = log
        .iter()
        .filter_map(PlatformEvent::message)
        .find(|m| m.topic.ends_with("/combine/batch_logout"))
        .expect("a batch_logout");
    let v: serde_json::Value = serde_json::from_slice(&logout.payload).unwrap();
    assert_eq!(v["params"][0]["deviceName"], "leaf-2", "{v}");
    assert_eq!(v["params"].as_array().unwrap().len(), 1, "{v}");
    assert!(!s.platform.in_topology(LEAF_PK, "leaf-2"));
    assert!(s.platform.in_topology(LEAF_PK, "leaf-1"));
    s.platform.assert_no_violations();
    s.shutdown(gw).await;
}
