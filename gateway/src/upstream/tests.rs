//! The session against a real mosquitto (`/usr/sbin/mosquitto`).

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::presence::PlatformState;
use super::testbroker::{BrokerOpts, Mosquitto, TestClient, WAIT};
use super::*;
use crate::store::Store;

fn gw() -> SubDevice {
    SubDevice {
        product_key: "a1GwPK".into(),
        device_name: "gw-01".into(),
        device_secret: None,
    }
}

fn cfg(url: String, auth: Auth, id: &str) -> UpstreamConfig {
    let mut c = UpstreamConfig::new(url, auth);
    c.client_id = Some(id.into());
    c.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(800),
    };
    c
}

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = Store::open(&dir.path().join("db")).unwrap();
    (dir, s)
}

async fn next(events: &mut mpsc::Receiver<UpstreamEvent>) -> UpstreamEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for an upstream event")
        .expect("upstream stopped")
}

async fn until_connected(events: &mut mpsc::Receiver<UpstreamEvent>) {
    loop {
        if let UpstreamEvent::Connected { .. } = next(events).await {
            return;
        }
    }
}

async fn until_disconnected(events: &mut mpsc::Receiver<UpstreamEvent>) -> String {
    loop {
        if let UpstreamEvent::Disconnected { reason, .. } = next(events).await {
            return reason;
        }
    }
}

/// Next `Message` event (others skipped), or `None` after `within`.
async fn message_within(
    events: &mut mpsc::Receiver<UpstreamEvent>,
    within: Duration,
) -> Option<(String, Bytes)> {
    tokio::time::timeout(within, async {
        loop {
            if let UpstreamEvent::Message { topic, payload } = next(events).await {
                return (topic, payload);
            }
        }
    })
    .await
    .ok()
}

/// Publish a probe from the platform side until the upstream receives it:
/// after a (re)connect the upstream's SUBSCRIBE and the probe travel on
/// different connections, so the first probes may precede the subscription.
async fn probe_until_received(
    platform: &TestClient,
    events: &mut mpsc::Receiver<UpstreamEvent>,
    topic: &str,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        platform.publish(topic, b"probe").await;
        if let Some((t, p)) = message_within(events, Duration::from_millis(500)).await {
            assert_eq!((t.as_str(), &p[..]), (topic, &b"probe"[..]));
            return;
        }
    }
    panic!("the upstream never received a probe on {topic}");
}

/// Wait until `cond` holds (checked every 20 ms, `WAIT` at most).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connects_anonymously_publishes_subscribes_and_sends_no_sub_device_requests() {
    let broker = Mosquitto::start(BrokerOpts::default());
    let mut platform = TestClient::connect(broker.port, "platform", None, &["#"], false).await;
    let (_d, store) = temp_store();
    let leaf = SubDevice {
        product_key: "a1Leaf".into(),
        device_name: "leaf-1".into(),
        device_secret: Some("s".into()),
    };
    let (up, mut events) = Upstream::start(
        cfg(broker.url(), Auth::None, "gw-none"),
        gw(),
        vec![leaf],
        vec!["/ota/device/upgrade/a1Leaf/leaf-1".into()],
        &store,
        CancellationToken::new(),
    )
    .unwrap();
    until_connected(&mut events).await;
    assert!(up.is_connected());
    up.publish(
        "/ota/device/inform/a1Leaf/leaf-1",
        "hello",
        Delivery::BestEffort,
    )
    .await
    .unwrap();
    // Everything the upstream queued on connect precedes this publish: no
    // topo/add or batch_login in none mode.
    let (t, p) = platform.next_msg().await;
    assert_eq!(t, "/ota/device/inform/a1Leaf/leaf-1");
    assert_eq!(&p[..], b"hello");

    probe_until_received(&platform, &mut events, "/ota/device/upgrade/a1Leaf/leaf-1").await;
    // A subscription added later works too.
    up.subscribe(["/sys/a1Leaf/leaf-1/thing/ota/firmware/get_reply"])
        .await
        .unwrap();
    probe_until_received(
        &platform,
        &mut events,
        "/sys/a1Leaf/leaf-1/thing/ota/firmware/get_reply",
    )
    .await;
    // A durable publish is acknowledged and leaves the outbox.
    up.publish(
        "/ota/device/progress/a1Leaf/leaf-1",
        "-4",
        Delivery::Durable,
    )
    .await
    .unwrap();
    loop {
        let (t, p) = platform.next_msg().await;
        if t == "/ota/device/progress/a1Leaf/leaf-1" {
            assert_eq!(&p[..], b"-4");
            break;
        }
    }
    eventually("the outbox empties", || up.outbox_len() == 0).await;
}

#[tokio::test]
async fn password_auth_connects_and_a_wrong_password_is_reported_and_retried() {
    let broker = Mosquitto::start(BrokerOpts {
        users: vec![("gw".into(), "right".into())],
        ..BrokerOpts::default()
    });
    let (_d, store) = temp_store();
    let shutdown = CancellationToken::new();
    let wrong = Auth::Password {
        username: "gw".into(),
        password: "wrong".into(),
    };
    let (bad, mut bad_events) = Upstream::start(
        cfg(broker.url(), wrong, "gw-bad"),
        gw(),
        vec![],
        vec![],
        &store,
        shutdown.clone(),
    )
    .unwrap();
    let mut delays = Vec::new();
    while delays.len() < 3 {
        match next(&mut bad_events).await {
            UpstreamEvent::Disconnected { reason, retry_in } => {
                assert!(reason.contains("refused"), "{reason}");
                delays.push(retry_in);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(delays[0] < delays[1] && delays[1] < delays[2], "{delays:?}");
    assert!(!bad.is_connected());
    let e = bad
        .publish("t", "x", Delivery::BestEffort)
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::NotConnected(_)), "{e}");

    let (_d2, store2) = temp_store();
    let right = Auth::Password {
        username: "gw".into(),
        password: "right".into(),
    };
    let (good, mut good_events) = Upstream::start(
        cfg(broker.url(), right, "gw-good"),
        gw(),
        vec![],
        vec![],
        &store2,
        shutdown.clone(),
    )
    .unwrap();
    until_connected(&mut good_events).await;
    assert!(good.is_connected());
    shutdown.cancel();
    tokio::time::timeout(WAIT, bad.stopped()).await.unwrap();
    drop(bad);
    tokio::time::timeout(WAIT, good.stopped()).await.unwrap();
    assert!(!good.is_connected());
}

#[tokio::test]
async fn broker_restart_resubscribes_and_delivers_what_was_published_while_down() {
    let mut broker = Mosquitto::start(BrokerOpts {
        persistence: true,
        ..BrokerOpts::default()
    });
    // A persistent platform-side session: the restarted broker queues for it
    // whatever arrives before it is back.
    let mut platform =
        TestClient::connect(broker.port, "platform-r", None, &["/ota/device/#"], true).await;
    let (_d, store) = temp_store();
    let (up, mut events) = Upstream::start(
        cfg(broker.url(), Auth::None, "gw-restart"),
        gw(),
        vec![],
        vec!["/ota/device/upgrade/a1GwPK/gw-01".into()],
        &store,
        CancellationToken::new(),
    )
    .unwrap();
    until_connected(&mut events).await;
    probe_until_received(&platform, &mut events, "/ota/device/upgrade/a1GwPK/gw-01").await;

    for round in 0..2 {
        broker.stop();
        let reason = until_disconnected(&mut events).await;
        assert!(!reason.is_empty());
        assert!(!up.is_connected());
        let topic = format!("/ota/device/progress/a1GwPK/gw-01/{round}");
        up.publish(&topic, "terminal", Delivery::Durable)
            .await
            .unwrap();
        assert_eq!(up.outbox_len(), 1);
        assert!(matches!(
            up.publish("/x", "y", Delivery::BestEffort).await,
            Err(UpstreamError::NotConnected(_))
        ));
        broker.spawn();
        until_connected(&mut events).await;
        loop {
            let (t, p) = platform.next_msg().await;
            if t == topic {
                assert_eq!(&p[..], b"terminal");
                break;
            }
        }
        eventually("the outbox empties", || up.outbox_len() == 0).await;
        probe_until_received(&platform, &mut events, "/ota/device/upgrade/a1GwPK/gw-01").await;
    }
}

#[tokio::test]
async fn durable_messages_survive_a_restart_of_the_upstream() {
    let mut broker = Mosquitto::start(BrokerOpts {
        persistence: true,
        ..BrokerOpts::default()
    });
    let mut platform =
        TestClient::connect(broker.port, "platform-u", None, &["/ota/device/#"], true).await;
    broker.stop();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let (store, _) = Store::open(&path).unwrap();
        let (up, mut events) = Upstream::start(
            cfg(broker.url(), Auth::None, "gw-u"),
            gw(),
            vec![],
            vec![],
            &store,
            CancellationToken::new(),
        )
        .unwrap();
        until_disconnected(&mut events).await;
        up.publish(
            "/ota/device/progress/a1GwPK/gw-01",
            "one",
            Delivery::Durable,
        )
        .await
        .unwrap();
        up.publish("/ota/device/inform/a1GwPK/gw-01", "two", Delivery::Durable)
            .await
            .unwrap();
        assert_eq!(up.outbox_len(), 2);
        // The last handle going away stops the session.
        let stopped = up.stopped();
        drop(up);
        tokio::time::timeout(WAIT, stopped).await.unwrap();
    }
    crate::store::wait_unlocked(&path);
    let (store, _) = Store::open(&path).unwrap();
    let (up, mut events) = Upstream::start(
        cfg(broker.url(), Auth::None, "gw-u"),
        gw(),
        vec![],
        vec![],
        &store,
        CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(up.outbox_len(), 2, "entries from the previous run");
    broker.spawn();
    until_connected(&mut events).await;
    eventually("the outbox empties", || up.outbox_len() == 0).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let (t, p) = platform.next_msg().await;
        got.push((t, String::from_utf8(p.to_vec()).unwrap()));
    }
    assert_eq!(
        got,
        vec![
            (
                "/ota/device/progress/a1GwPK/gw-01".to_owned(),
                "one".to_owned()
            ),
            (
                "/ota/device/inform/a1GwPK/gw-01".to_owned(),
                "two".to_owned()
            ),
        ]
    );
    eventually("the outbox empties", || up.outbox_len() == 0).await;
}

/// After a connect the outbox (terminal reports from before) goes out before
/// the daemon is told `Connected` (and sends informs and `firmware/get`), and
/// an entry that both a live publish and the replay see is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_goes_out_before_connected_and_each_entry_once() {
    let mut broker = Mosquitto::start(BrokerOpts {
        persistence: true,
        ..BrokerOpts::default()
    });
    let mut platform =
        TestClient::connect(broker.port, "platform-o", None, &["/ota/device/#"], true).await;
    broker.stop();
    let (_d, store) = temp_store();
    let (up, mut events) = Upstream::start(
        cfg(broker.url(), Auth::None, "gw-o"),
        gw(),
        vec![],
        vec![],
        &store,
        CancellationToken::new(),
    )
    .unwrap();
    until_disconnected(&mut events).await;
    let topic = "/ota/device/progress/a1GwPK/gw-01";
    let mut expected = Vec::new();
    for i in 0..20 {
        let p = format!("old-{i}");
        up.publish(topic, p.clone(), Delivery::Durable)
            .await
            .unwrap();
        expected.push(p);
    }
    broker.spawn();
    // Durable publishes racing the connect and its replay.
    let mut i = 0;
    loop {
        let p = format!("live-{i}");
        up.publish(topic, p.clone(), Delivery::Durable)
            .await
            .unwrap();
        expected.push(p);
        i += 1;
        match tokio::time::timeout(Duration::from_millis(2), events.recv()).await {
            Ok(Some(UpstreamEvent::Connected { .. })) => break,
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("upstream stopped"),
        }
    }
    // What the daemon sends on `Connected` comes after the whole outbox.
    up.publish(topic, "after-connected", Delivery::BestEffort)
        .await
        .unwrap();
    up.publish(topic, "end", Delivery::Durable).await.unwrap();
    let mut got = Vec::new();
    loop {
        let (_, p) = platform.next_msg().await;
        let p = String::from_utf8(p.to_vec()).unwrap();
        if p == "end" {
            break;
        }
        got.push(p);
    }
    assert_eq!(
        got.last().map(String::as_str),
        Some("after-connected"),
        "{got:?}"
    );
    got.pop();
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len(), "an entry was sent twice: {got:?}");
    expected.sort();
    assert_eq!(sorted, expected);
}

#[tokio::test]
async fn aliyun_mode_adds_then_logs_in_the_leaves_waiting_for_each_reply() {
    let broker = Mosquitto::start(BrokerOpts::default());
    let mut platform = TestClient::connect(
        broker.port,
        "platform-a",
        None,
        &[
            "/sys/a1GwPK/gw-01/thing/topo/add",
            "/ext/session/a1GwPK/gw-01/combine/batch_login",
            "/ota/device/inform/#",
        ],
        false,
    )
    .await;
    let leaves: Vec<SubDevice> = (0..3)
        .map(|i| SubDevice {
            product_key: "a1Leaf".into(),
            device_name: format!("leaf-{i}"),
            device_secret: Some(format!("secret-{i}")),
        })
        .collect();
    let (_d, store) = temp_store();
    let auth = Auth::Aliyun {
        product_key: "a1GwPK".into(),
        device_name: "gw-01".into(),
        device_secret: "gw-secret".into(),
    };
    let (up, mut events) = Upstream::start(
        cfg(broker.url(), auth, "gw-aliyun"),
        gw(),
        leaves.clone(),
        vec![],
        &store,
        CancellationToken::new(),
    )
    .unwrap();
    until_connected(&mut events).await;
    // Connected, but the leaves are not online: an inform for one is held.
    up.publish(
        "/ota/device/inform/a1Leaf/leaf-0",
        &b"{\"id\":\"1\",\"params\":{\"version\":\"1.0.0\"}}"[..],
        Delivery::BestEffort,
    )
    .await
    .unwrap();

    let check = |list: &Value| {
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 3);
        for (entry, leaf) in list.iter().zip(&leaves) {
            assert_eq!(entry["productKey"], leaf.product_key.as_str());
            assert_eq!(entry["deviceName"], leaf.device_name.as_str());
            let cid = entry["clientId"].as_str().unwrap();
            let ts: u64 = entry["timestamp"].as_str().unwrap().parse().unwrap();
            assert_eq!(
                entry["sign"].as_str().unwrap(),
                auth::sign(
                    leaf.device_secret.as_deref().unwrap(),
                    cid,
                    &leaf.device_name,
                    &leaf.product_key,
                    ts
                ),
                "the sign covers the clientId and timestamp sent"
            );
        }
    };
    let (t, p) = platform.next_msg().await;
    assert_eq!(t, "/sys/a1GwPK/gw-01/thing/topo/add");
    let topo: Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(topo["method"], "thing.topo.add");
    check(&topo["params"]);
    assert_eq!(
        up.platform().unwrap()[0].state,
        PlatformState::Adding,
        "no login before the topology is answered"
    );

    // The topology answered: now (and only now) the login.
    let reply = format!(r#"{{"id":{},"code":200,"data":[]}}"#, topo["id"]);
    platform
        .publish("/sys/a1GwPK/gw-01/thing/topo/add_reply", reply.as_bytes())
        .await;
    let (t, p) = platform.next_msg().await;
    assert_eq!(t, "/ext/session/a1GwPK/gw-01/combine/batch_login");
    let login: Value = serde_json::from_slice(&p).unwrap();
    assert_eq!(login["params"]["signMethod"], "hmacSha256");
    check(&login["params"]["deviceList"]);

    // 6401 for leaf-1: it is added again, the others logged in again.
    let reply = format!(
        r#"{{"id":{},"code":6401,"message":"topo relation not exist","data":[{{"productKey":"a1Leaf","deviceName":"leaf-1"}}]}}"#,
        login["id"]
    );
    platform
        .publish(
            "/ext/session/a1GwPK/gw-01/combine/batch_login_reply",
            reply.as_bytes(),
        )
        .await;
    let mut again = Vec::new();
    while again.len() < 2 {
        let (t, p) = platform.next_msg().await;
        let v: Value = serde_json::from_slice(&p).unwrap();
        again.push((t, v));
    }
    again.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(again[0].0, "/ext/session/a1GwPK/gw-01/combine/batch_login");
    let relogin = again[0].1.clone();
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| e["deviceName"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(&relogin["params"]["deviceList"]),
        ["leaf-0", "leaf-2"]
    );
    assert_eq!(again[1].0, "/sys/a1GwPK/gw-01/thing/topo/add");
    assert_eq!(names(&again[1].1["params"]), ["leaf-1"]);

    // leaf-0 logs in: its held inform goes out, after the login.
    let reply = format!(r#"{{"id":{},"code":200}}"#, relogin["id"]);
    platform
        .publish(
            "/ext/session/a1GwPK/gw-01/combine/batch_login_reply",
            reply.as_bytes(),
        )
        .await;
    let (t, _) = platform.next_msg().await;
    assert_eq!(t, "/ota/device/inform/a1Leaf/leaf-0");
    let states: Vec<PlatformState> = up.platform().unwrap().iter().map(|l| l.state).collect();
    assert_eq!(
        states,
        [
            PlatformState::Online,
            PlatformState::Adding,
            PlatformState::Online
        ]
    );
    let mut replies = Vec::new();
    while replies.len() < 3 {
        if let UpstreamEvent::SubDevices { request, code, .. } = next(&mut events).await {
            replies.push((request, code));
        }
    }
    assert_eq!(
        replies,
        vec![
            (SubDeviceRequest::TopoAdd, 200),
            (SubDeviceRequest::BatchLogin, 6401),
            (SubDeviceRequest::BatchLogin, 200),
        ]
    );
    // Added leaves are remembered for a later run.
    let known = store.tree(super::session::KNOWN_TREE).unwrap();
    for leaf in &leaves {
        let key = format!("{}/{}", leaf.product_key, leaf.device_name);
        assert!(known.contains_key(&key).unwrap(), "{key}");
    }
}

#[tokio::test]
async fn mqtts_with_an_extra_ca_connects_and_without_it_fails_verification() {
    let broker = Mosquitto::start(BrokerOpts {
        tls: true,
        ..BrokerOpts::default()
    });
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let (_d, store) = temp_store();
    let mut c = cfg(url.clone(), Auth::None, "gw-tls");
    c.ca_file = Some(broker.ca_file());
    let (up, mut events) =
        Upstream::start(c, gw(), vec![], vec![], &store, CancellationToken::new()).unwrap();
    until_connected(&mut events).await;
    assert!(up.is_connected());

    let (_d2, store2) = temp_store();
    let (_up2, mut events2) = Upstream::start(
        cfg(url, Auth::None, "gw-tls-untrusted"),
        gw(),
        vec![],
        vec![],
        &store2,
        CancellationToken::new(),
    )
    .unwrap();
    let reason = until_disconnected(&mut events2).await;
    assert!(reason.contains("TLS"), "{reason}");
}

#[test]
fn bad_configs_are_refused_before_anything_starts() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (_d, store) = temp_store();
        let start = |c: UpstreamConfig, leaves: Vec<SubDevice>| {
            Upstream::start(c, gw(), leaves, vec![], &store, CancellationToken::new())
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let mut c = UpstreamConfig::new("mqtt://127.0.0.1:1", Auth::None);
        c.keep_alive = Duration::from_secs(10);
        assert!(start(c, vec![]).contains("keep_alive"));
        let c = UpstreamConfig::new("http://127.0.0.1", Auth::None);
        assert!(start(c, vec![]).contains("scheme"));
        let aliyun = Auth::Aliyun {
            product_key: "a1GwPK".into(),
            device_name: "gw-01".into(),
            device_secret: "s".into(),
        };
        let leaf = SubDevice {
            product_key: "p".into(),
            device_name: "d".into(),
            device_secret: None,
        };
        let c = UpstreamConfig::new("mqtt://127.0.0.1:1", aliyun);
        assert!(start(c, vec![leaf]).contains("device_secret"));
        let other = Auth::Aliyun {
            product_key: "other".into(),
            device_name: "gw-01".into(),
            device_secret: "s".into(),
        };
        let c = UpstreamConfig::new("mqtt://127.0.0.1:1", other);
        assert!(start(c, vec![]).contains("aliyun auth is for"));
        assert!(
            !format!(
                "{:?}",
                Auth::Password {
                    username: "u".into(),
                    password: "hunter2".into()
                }
            )
            .contains("hunter2")
        );
    });
}
