use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::*;
use crate::upstream::subdevices::{Reply, TopoChange, TopoStatus};

fn leaves(n: usize) -> Vec<SubDevice> {
    (0..n)
        .map(|i| SubDevice {
            product_key: "a1Leaf".into(),
            device_name: format!("leaf-{i}"),
            device_secret: Some(format!("secret-{i}")),
        })
        .collect()
}

fn presence(n: usize) -> Presence {
    Presence::new(("a1Gw", "gw"), &leaves(n), Timing::default(), 1)
}

/// A request the machine sent: its kind, id and the leaves it lists.
#[derive(Debug)]
struct Sent {
    request: SubDeviceRequest,
    id: String,
    leaves: Vec<String>,
}

fn sent(actions: &[Action]) -> Vec<Sent> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                request, payload, ..
            } => {
                let v: Value = serde_json::from_slice(payload).unwrap();
                let list = match request {
                    SubDeviceRequest::BatchLogin => v["params"]["deviceList"].clone(),
                    _ => v["params"].clone(),
                };
                Some(Sent {
                    request: *request,
                    id: v["id"].as_str().unwrap().to_owned(),
                    leaves: list
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["deviceName"].as_str().unwrap().to_owned())
                        .collect(),
                })
            }
            _ => None,
        })
        .collect()
}

fn ok(id: &str) -> Reply {
    Reply {
        id: Some(id.into()),
        code: 200,
        message: "success".into(),
        devices: vec![],
    }
}

fn refusal(id: &str, code: i64, message: &str, named: &[&str]) -> Reply {
    Reply {
        id: Some(id.into()),
        code,
        message: message.into(),
        devices: named
            .iter()
            .map(|d| ("a1Leaf".to_owned(), (*d).to_owned()))
            .collect(),
    }
}

fn states(p: &Presence) -> Vec<PlatformState> {
    p.snapshot().iter().map(|l| l.state).collect()
}

fn online(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Online(l) => Some(l.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Connect, answer topo/add and the login with 200: every leaf online.
fn bring_online(p: &mut Presence, now: Instant) {
    let a = sent(&p.on_connected(now));
    let topo = a
        .iter()
        .find(|s| s.request == SubDeviceRequest::TopoAdd)
        .unwrap();
    let a = sent(&p.on_reply(SubDeviceRequest::TopoAdd, &ok(&topo.id), now));
    let login = a
        .iter()
        .find(|s| s.request == SubDeviceRequest::BatchLogin)
        .unwrap();
    p.on_reply(SubDeviceRequest::BatchLogin, &ok(&login.id), now);
    for i in 0..p.leaves.len() {
        assert!(p.take_held(i).is_empty());
    }
}

#[test]
fn topology_first_then_login_each_waiting_for_its_reply() {
    let mut p = presence(3);
    let now = Instant::now();
    let a = sent(&p.on_connected(now));
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].request, SubDeviceRequest::TopoAdd);
    assert_eq!(a[0].leaves, ["leaf-0", "leaf-1", "leaf-2"]);
    assert!(states(&p).iter().all(|s| *s == PlatformState::Adding));
    // Nothing more until the reply, however often the timer fires before
    // the timeout.
    assert!(p.on_tick(now + Duration::from_secs(4)).is_empty());

    let actions = p.on_reply(SubDeviceRequest::TopoAdd, &ok(&a[0].id), now);
    assert!(actions.contains(&Action::Added(vec![
        ("a1Leaf".into(), "leaf-0".into()),
        ("a1Leaf".into(), "leaf-1".into()),
        ("a1Leaf".into(), "leaf-2".into()),
    ])));
    let a = sent(&actions);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].request, SubDeviceRequest::BatchLogin);
    assert!(SubDeviceRequest::BatchLogin.qos0());
    assert!(states(&p).iter().all(|s| *s == PlatformState::LoggingIn));

    let actions = p.on_reply(SubDeviceRequest::BatchLogin, &ok(&a[0].id), now);
    assert_eq!(online(&actions), [0, 1, 2]);
    assert!(states(&p).iter().all(|s| *s == PlatformState::Online));
    assert_eq!(p.online_count(), (3, 3));
}

#[test]
fn messages_are_held_until_the_leaf_is_online_and_go_out_in_order() {
    let mut p = presence(2);
    let now = Instant::now();
    let msg = |t: &str, b: &str| Held::Message {
        topic: t.into(),
        payload: Bytes::from(b.to_owned()),
    };
    // Disconnected: best effort is refused, durable is held.
    assert_eq!(
        p.admit(0, msg("/ota/device/inform/a1Leaf/leaf-0", "v1")),
        Admit::NotConnected
    );
    assert_eq!(p.admit(0, Held::Durable(7)), Admit::Held);

    let a = sent(&p.on_connected(now));
    assert_eq!(
        p.admit(0, msg("/ota/device/inform/a1Leaf/leaf-0", "v1")),
        Admit::Held
    );
    assert_eq!(
        p.admit(0, msg("/sys/a1Leaf/leaf-0/thing/ota/firmware/get", "get")),
        Admit::Held
    );
    let a = sent(&p.on_reply(SubDeviceRequest::TopoAdd, &ok(&a[0].id), now));
    assert_eq!(
        p.admit(1, msg("/ota/device/inform/a1Leaf/leaf-1", "w")),
        Admit::Held
    );
    let actions = p.on_reply(SubDeviceRequest::BatchLogin, &ok(&a[0].id), now);
    assert_eq!(online(&actions), [0, 1]);
    // Online but still flushing: a new message queues behind the held ones.
    assert_eq!(
        p.admit(0, msg("/ota/device/progress/a1Leaf/leaf-0", "p")),
        Admit::Held
    );
    assert_eq!(
        p.take_held(0),
        vec![
            Held::Durable(7),
            msg("/ota/device/inform/a1Leaf/leaf-0", "v1"),
            msg("/sys/a1Leaf/leaf-0/thing/ota/firmware/get", "get"),
            msg("/ota/device/progress/a1Leaf/leaf-0", "p"),
        ]
    );
    assert!(p.take_held(0).is_empty(), "drained");
    let m = msg("/ota/device/progress/a1Leaf/leaf-0", "q");
    assert_eq!(p.admit(0, m.clone()), Admit::Send(m));
    // Leaf 1 has not been flushed yet: still held.
    assert_eq!(p.admit(1, Held::Durable(9)), Admit::Held);
    assert_eq!(
        p.take_held(1),
        vec![
            msg("/ota/device/inform/a1Leaf/leaf-1", "w"),
            Held::Durable(9)
        ]
    );
}

#[test]
fn progress_held_is_coalesced_and_the_queue_is_bounded() {
    let mut p = presence(1);
    p.on_connected(Instant::now());
    let progress = |s: &str| Held::Message {
        topic: "/ota/device/progress/a1Leaf/leaf-0".into(),
        payload: Bytes::from(s.to_owned()),
    };
    for s in ["10", "20", "30"] {
        p.admit(0, progress(s));
    }
    p.admit(0, Held::Durable(1));
    p.admit(0, progress("40"));
    p.admit(0, progress("50"));
    let l = &p.leaves[0];
    assert_eq!(
        l.held.iter().cloned().collect::<Vec<_>>(),
        vec![progress("30"), Held::Durable(1), progress("50")],
        "consecutive progress on one topic coalesced, never across a durable message"
    );
    for i in 0..(2 * MAX_HELD) {
        p.admit(
            0,
            Held::Message {
                topic: "/ota/device/inform/a1Leaf/leaf-0".into(),
                payload: Bytes::from(i.to_string()),
            },
        );
    }
    let l = &p.leaves[0];
    assert_eq!(l.held.len(), MAX_HELD);
    assert!(
        l.held.contains(&Held::Durable(1)),
        "durable references are never dropped"
    );
}

#[test]
fn a_lost_login_is_sent_again_after_the_timeout_with_backoff() {
    let mut p = presence(2);
    let t0 = Instant::now();
    let a = sent(&p.on_connected(t0));
    let a = sent(&p.on_reply(SubDeviceRequest::TopoAdd, &ok(&a[0].id), t0));
    let first = a[0].id.clone();
    assert_eq!(p.next_wakeup(), Some(t0 + Duration::from_secs(5)));
    // The login (QoS 0) was lost: no reply within the timeout.
    let t1 = t0 + Duration::from_secs(5);
    assert!(sent(&p.on_tick(t1)).is_empty(), "not before the backoff");
    assert!(states(&p).iter().all(|s| *s == PlatformState::InTopology));
    let err = p.snapshot()[0].last_error.clone().unwrap();
    assert!(err.contains("no reply to batch_login"), "{err}");
    assert_eq!(p.next_wakeup(), Some(t1 + Duration::from_secs(1)));
    let a = sent(&p.on_tick(t1 + Duration::from_secs(1)));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].request, SubDeviceRequest::BatchLogin);
    assert_ne!(a[0].id, first, "a new id");
    // A late reply to the lost request changes nothing.
    assert!(
        p.on_reply(SubDeviceRequest::BatchLogin, &ok(&first), t1)
            .is_empty()
    );
    // Lost again: the backoff doubles.
    let t2 = t1 + Duration::from_secs(6);
    p.on_tick(t2);
    assert_eq!(p.next_wakeup(), Some(t2 + Duration::from_secs(2)));
    let a = sent(&p.on_tick(t2 + Duration::from_secs(2)));
    let actions = p.on_reply(SubDeviceRequest::BatchLogin, &ok(&a[0].id), t2);
    assert_eq!(online(&actions), [0, 1]);
    assert_eq!(p.snapshot()[0].last_error, None, "cleared by the success");
}

#[test]
fn a_6401_adds_the_named_leaves_again_and_logs_the_others_in() {
    let mut p = presence(3);
    let now = Instant::now();
    let a = sent(&p.on_connected(now));
    let a = sent(&p.on_reply(SubDeviceRequest::TopoAdd, &ok(&a[0].id), now));
    let a = sent(&p.on_reply(
        SubDeviceRequest::BatchLogin,
        &refusal(&a[0].id, 6401, "topo relation not exist", &["leaf-1"]),
        now,
    ));
    let mut kinds: Vec<(SubDeviceRequest, Vec<String>)> =
        a.into_iter().map(|s| (s.request, s.leaves)).collect();
    kinds.sort_by_key(|(r, _)| *r == SubDeviceRequest::BatchLogin);
    assert_eq!(
        kinds,
        vec![
            (SubDeviceRequest::TopoAdd, vec!["leaf-1".to_owned()]),
            (
                SubDeviceRequest::BatchLogin,
                vec!["leaf-0".to_owned(), "leaf-2".to_owned()]
            ),
        ]
    );
}

#[test]
fn a_wrong_secret_parks_that_leaf_and_not_the_others() {
    let mut p = presence(3);
    let now = Instant::now();
    let a = sent(&p.on_connected(now));
    let a = sent(&p.on_reply(SubDeviceRequest::TopoAdd, &ok(&a[0].id), now));
    // All-or-nothing, naming the culprit.
    let a = sent(&p.on_reply(
        SubDeviceRequest::BatchLogin,
        &refusal(&a[0].id, 6287, "invalid sign", &["leaf-2"]),
        now,
    ));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].leaves, ["leaf-0", "leaf-1"], "the others at once");
    let actions = p.on_reply(SubDeviceRequest::BatchLogin, &ok(&a[0].id), now);
    assert_eq!(online(&actions), [0, 1]);
    let snap = p.snapshot();
    assert_eq!(snap[2].state, PlatformState::InTopology);
    assert!(snap[2].parked);
    let err = snap[2].last_error.clone().unwrap();
    assert!(
        err.contains("6287") && err.contains("device_secret"),
        "{err}"
    );
    // Never tried again on this run.
    assert!(p.on_tick(now + Duration::from_secs(3600)).is_empty());
    assert_eq!(p.next_wakeup(), None);
}

#[test]
fn a_refusal_naming_no_leaf_tries_each_leaf_alone() {
    let mut p = presence(3);
    let now = Instant::now();
    let a = sent(&p.on_connected(now));
    let a = sent(&p.on_reply(SubDeviceRequest::TopoAdd, &ok(&a[0].id), now));
    let a = sent(&p.on_reply(
        SubDeviceRequest::BatchLogin,
        &refusal(&a[0].id, 6287, "invalid sign", &[]),
        now,
    ));
    assert_eq!(a.len(), 3, "{a:?}");
    assert!(a.iter().all(|s| s.leaves.len() == 1));
    for s in &a {
        let reply = if s.leaves[0] == "leaf-1" {
            refusal(&s.id, 6287, "invalid sign", &[])
        } else {
            ok(&s.id)
        };
        p.on_reply(SubDeviceRequest::BatchLogin, &reply, now);
    }
    let snap = p.snapshot();
    assert_eq!(
        snap.iter().map(|l| (l.state, l.parked)).collect::<Vec<_>>(),
        vec![
            (PlatformState::Online, false),
            (PlatformState::InTopology, true),
            (PlatformState::Online, false),
        ]
    );
}

#[test]
fn a_transient_refusal_retries_the_batch_with_backoff() {
    let mut p = presence(1);
    let t0 = Instant::now();
    let a = sent(&p.on_connected(t0));
    let a = sent(&p.on_reply(
        SubDeviceRequest::TopoAdd,
        &refusal(&a[0].id, 429, "too many requests", &[]),
        t0,
    ));
    assert!(a.is_empty());
    assert_eq!(states(&p), [PlatformState::NotInTopology]);
    assert!(!p.snapshot()[0].parked);
    assert_eq!(p.next_wakeup(), Some(t0 + Duration::from_secs(1)));
    let a = sent(&p.on_tick(t0 + Duration::from_secs(1)));
    assert_eq!(a[0].request, SubDeviceRequest::TopoAdd);
}

#[test]
fn a_disconnect_takes_every_leaf_offline_and_the_next_connect_logs_in_only() {
    let mut p = presence(2);
    let now = Instant::now();
    bring_online(&mut p, now);
    p.admit(0, Held::Durable(3));
    p.on_disconnected(42);
    assert!(states(&p).iter().all(|s| *s == PlatformState::InTopology));
    assert_eq!(p.offline_since_seq(0), 42);
    assert!(p.leaves[0].held.is_empty());
    assert_eq!(p.next_wakeup(), None, "nothing to do while disconnected");
    let a = sent(&p.on_connected(now));
    assert_eq!(a.len(), 1);
    assert_eq!(
        a[0].request,
        SubDeviceRequest::BatchLogin,
        "the topology survives a connection"
    );
}

#[test]
fn the_console_removing_or_disabling_a_leaf_takes_it_offline_until_it_is_back() {
    let mut p = presence(2);
    let now = Instant::now();
    bring_online(&mut p, now);
    let change = |status| TopoChange {
        status,
        leaves: vec![("a1Leaf".into(), "leaf-1".into())],
    };
    let actions = p.on_topo_change(&change(TopoStatus::Deleted), Some("77"), now, 10);
    assert!(matches!(&actions[0], Action::Answer { topic, payload }
        if topic == "/sys/a1Gw/gw/thing/topo/change_reply"
            && String::from_utf8_lossy(payload).contains("\"77\"")));
    assert!(sent(&actions).is_empty(), "not added back: {actions:?}");
    assert_eq!(
        states(&p),
        [PlatformState::Online, PlatformState::NotInTopology]
    );
    assert_eq!(p.admit(1, Held::Durable(11)), Admit::Held);
    let a = sent(&p.on_topo_change(&change(TopoStatus::Created), None, now, 12));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].request, SubDeviceRequest::TopoAdd);
    assert_eq!(a[0].leaves, ["leaf-1"]);

    let mut p = presence(1);
    bring_online(&mut p, now);
    let disable = TopoChange {
        status: TopoStatus::Disabled,
        leaves: vec![("a1Leaf".into(), "leaf-0".into())],
    };
    assert!(sent(&p.on_topo_change(&disable, None, now, 5)).is_empty());
    assert_eq!(states(&p), [PlatformState::InTopology]);
    assert!(p.snapshot()[0].parked);
}

#[test]
fn a_platform_error_notice_takes_the_leaf_offline() {
    let mut p = presence(2);
    let t0 = Instant::now();
    bring_online(&mut p, t0);
    // 520: a message of a leaf the platform has no session for: log in again.
    let a = p.on_platform_error(
        &refusal("1", 520, "device session error", &["leaf-0"]),
        t0,
        Some(8),
    );
    assert!(sent(&a).is_empty(), "after the backoff");
    assert_eq!(
        states(&p),
        [PlatformState::InTopology, PlatformState::Online]
    );
    let a = sent(&p.on_tick(t0 + Duration::from_secs(1)));
    assert_eq!(a[0].request, SubDeviceRequest::BatchLogin);
    assert_eq!(a[0].leaves, ["leaf-0"]);
    // 522: disabled: parked.
    p.on_platform_error(
        &refusal("2", 522, "device forbidden", &["leaf-1"]),
        t0,
        Some(9),
    );
    assert!(p.snapshot()[1].parked);
    // A notice naming nobody we manage changes nothing.
    assert!(
        p.on_platform_error(&refusal("3", 521, "", &["other"]), t0, None)
            .is_empty()
    );
}

#[test]
fn leaves_no_longer_configured_are_logged_out_and_deleted_when_asked() {
    let now = Instant::now();
    let gone = vec![("a1Leaf".to_owned(), "old".to_owned())];
    let mut p = presence(1);
    p.retire(gone.clone(), false);
    let actions = p.on_connected(now);
    let a = sent(&actions);
    assert_eq!(a[0].request, SubDeviceRequest::BatchLogout);
    assert_eq!(a[0].leaves, ["old"]);
    assert!(actions.contains(&Action::Retired(gone.clone())));

    let mut p = presence(1);
    p.retire(gone.clone(), true);
    let actions = p.on_connected(now);
    let a = sent(&actions);
    assert_eq!(
        a.iter().map(|s| s.request).collect::<Vec<_>>(),
        [
            SubDeviceRequest::BatchLogout,
            SubDeviceRequest::TopoDelete,
            SubDeviceRequest::TopoAdd
        ]
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Retired(_))));
    let del = a
        .iter()
        .find(|s| s.request == SubDeviceRequest::TopoDelete)
        .unwrap();
    let actions = p.on_reply(SubDeviceRequest::TopoDelete, &ok(&del.id), now);
    assert!(actions.contains(&Action::Retired(gone)));
}

#[test]
fn topics_map_to_their_leaf() {
    let p = presence(2);
    assert_eq!(p.leaf_of_topic("/ota/device/inform/a1Leaf/leaf-1"), Some(1));
    assert_eq!(
        p.leaf_of_topic("/ota/device/progress/a1Leaf/leaf-0"),
        Some(0)
    );
    assert_eq!(
        p.leaf_of_topic("/sys/a1Leaf/leaf-0/thing/ota/firmware/get"),
        Some(0)
    );
    assert_eq!(p.leaf_of_topic("/ota/device/inform/a1Gw/gw"), None);
    assert_eq!(p.leaf_of_topic("/sys/a1Gw/gw/thing/topo/add"), None);
    assert_eq!(p.leaf_of_topic("/ota/device/inform/a1Leaf/leaf-9"), None);
    assert_eq!(p.leaf_of_topic("ota/device/inform/a1Leaf/leaf-0"), None);
}
