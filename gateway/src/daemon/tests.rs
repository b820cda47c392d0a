//! The daemon's rules without sockets to the platform: a [`Core`] built with
//! the recording publisher and a manual clock, a real store, cache and plugin
//! host (with no plugins), and notices fed to it directly.

use std::collections::BTreeMap;
use std::time::Duration;

use super::ports::fakes::{ManualClock, Recorder, Sent};
use super::*;
use crate::cache::CacheOptions;
use crate::config::DeviceConfig;
use crate::ota::protocol::SignMethod;

const GW: (&str, &str) = ("gwpk", "gw");

struct Fixture {
    core: Arc<Core>,
    sent: Arc<Recorder>,
    store: Store,
    _dir: tempfile::TempDir,
}

fn device(dn: &str) -> DeviceConfig {
    DeviceConfig {
        product_key: "pk".into(),
        device_name: dn.into(),
        device_secret: None,
        family: "xmodem".into(),
        // Nothing listens there: a job that reaches its link fails -4.
        link: "tcp://127.0.0.1:1".into(),
        version: "1.0.0".into(),
        module: "default".into(),
        options: BTreeMap::new(),
        tags: vec![],
        bus: None,
    }
}

/// A core with `devices`; `journal` lets a test prepare the store first.
async fn fixture_with(devices: &[DeviceConfig], prepare: impl AsyncFnOnce(&Journal)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&dir.path().join("db")).unwrap();
    let journal = Journal::open(&store).unwrap();
    prepare(&journal).await;
    let clock = Arc::new(ManualClock::at(1_000_000));
    let restart = Restart {
        unclean: true,
        max_flash_restarts: 1,
    };
    let (table, _resume) = JobTable::restore(journal, clock, restart).unwrap();
    let opts = CacheOptions {
        attempts: 1,
        ..CacheOptions::default()
    };
    let cache = Cache::open_with(&store, 64 << 20, opts).unwrap();
    let limits = crate::plugin::Limits {
        memory: 16 << 20,
        cpu: Duration::from_secs(1),
        job: Duration::from_secs(30),
        max_instances: 8,
        ..Default::default()
    };
    let sent = Arc::new(Recorder::default());
    let config = crate::config::Config::parse(
        "[gateway]\nproduct_key = \"gwpk\"\ndevice_name = \"gw\"\ndata_dir = \"/tmp/x\"\nplugins_dir = \"/tmp/p\"\n",
        std::path::Path::new("/t.toml"),
    )
    .unwrap();
    let campaigns = super::campaigns::Campaigns::open(&store, &config).unwrap();
    let core = Arc::new(Core {
        gw: DeviceId::new(GW.0, GW.1),
        devices: std::sync::RwLock::new(Arc::new(Devices::new(devices))),
        config: Mutex::new(config),
        plugins_rescan: Arc::new(tokio::sync::Notify::new()),
        table,
        campaigns,
        cache,
        plugins: PluginHost::new(limits, None).unwrap(),
        updates: super::plugin_update::PluginUpdates::open(dir.path(), Default::default(), false),
        plugins_dir: std::path::PathBuf::new(),
        plugin_watch: None,
        opener: crate::link::Opener::default(),
        publisher: sent.clone(),
        limits: IntakeLimits {
            max_image_bytes: 1 << 20,
        },
        permits: Arc::new(Semaphore::new(4)),
        links: Mutex::new(HashMap::new()),
        buses: Mutex::new(HashMap::new()),
        identifying: Mutex::new(Default::default()),
        next_id: AtomicU64::new(1),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        upstream_stop: CancellationToken::new(),
        upstream_status: Mutex::new(Default::default()),
        metrics: crate::metrics::Metrics::new(),
        connects: AtomicU64::new(0),
    });
    Fixture {
        core,
        sent,
        store,
        _dir: dir,
    }
}

async fn fixture(devices: &[DeviceConfig]) -> Fixture {
    fixture_with(devices, async |_| {}).await
}

fn notice(version: &str, size: u64) -> Notice {
    Notice {
        id: 7,
        version: version.into(),
        size,
        download: Download::Http {
            url: format!("http://127.0.0.1:1/{version}.bin"),
        },
        sign_method: SignMethod::Md5,
        sign: "0".repeat(32),
        module: "default".into(),
        is_diff: false,
        ext_data: None,
    }
}

/// The (step, desc) of each progress message among `sent`.
fn progress(sent: &[Sent]) -> Vec<(String, String)> {
    sent.iter()
        .filter(|s| s.topic.starts_with("/ota/device/progress/"))
        .map(|s| {
            (
                s.payload["params"]["step"].as_str().unwrap().to_string(),
                s.payload["params"]["desc"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Wait until every task of the core is idle (the jobs ran to their end).
async fn settle(core: &Core) {
    core.tasks.close();
    tokio::time::timeout(Duration::from_secs(60), core.tasks.wait())
        .await
        .expect("the jobs end");
    core.tasks.reopen();
}

#[tokio::test]
async fn the_intake_refuses_what_it_cannot_take_with_the_right_step() {
    let f = fixture(&[device("leaf")]).await;
    let leaf = DeviceId::new("pk", "leaf");
    let cases: Vec<(DeviceId, Notice, &str, &str)> = vec![
        (
            DeviceId::new(GW.0, GW.1),
            notice("2.0", 10),
            "-1",
            "own module",
        ),
        (
            DeviceId::new("pk", "other"),
            notice("2.0", 10),
            "-1",
            "device pk/other is not managed",
        ),
        (
            leaf.clone(),
            Notice {
                module: "MCU".into(),
                ..notice("2.0", 10)
            },
            "-1",
            "module \"MCU\" of pk/leaf is not managed",
        ),
        (
            leaf.clone(),
            Notice {
                download: Download::Mqtt {
                    stream_id: 1,
                    stream_file_id: 1,
                },
                ..notice("2.0", 10)
            },
            "-2",
            "over MQTT",
        ),
        (
            leaf.clone(),
            notice("2.0", (1 << 20) + 1),
            "-2",
            "max_image_mib",
        ),
    ];
    for (id, n, step, words) in cases {
        f.core.offer(id.clone(), n).await;
        let sent = f.sent.take();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].delivery, Delivery::Durable);
        assert_eq!(
            sent[0].topic,
            topics::progress(&id.product_key, &id.device_name)
        );
        let (s, desc) = &progress(&sent)[0];
        assert_eq!(s, step, "{desc}");
        assert!(desc.contains(words), "{desc:?} lacks {words:?}");
    }
    assert!(f.core.table.snapshot().is_empty(), "no job was created");
}

#[tokio::test]
async fn a_job_runs_to_a_reported_end_and_the_leaf_takes_the_next_notice() {
    let f = fixture(&[device("leaf")]).await;
    let leaf = DeviceId::new("pk", "leaf");
    // Nothing serves the URL: the download fails, -2, durably.
    f.core.offer(leaf.clone(), notice("2.0", 10)).await;
    settle(&f.core).await;
    let sent = f.sent.take();
    let p = progress(&sent);
    assert_eq!(p.first().map(|s| s.0.as_str()), Some("1"), "{p:?}");
    assert_eq!(p.last().map(|s| s.0.as_str()), Some("-2"), "{p:?}");
    let last = sent.iter().rfind(|s| s.topic.contains("progress")).unwrap();
    assert_eq!(last.delivery, Delivery::Durable);
    let key = (leaf.clone(), "default".to_string());
    let live = &f.core.table.snapshot()[&key];
    assert_eq!(JobTable::shown_state(live), "failed");
    assert!(f.core.table.unreported(&key).unwrap().is_none());

    // The same notice again: a new job (a failure is not a duplicate).
    f.core.offer(leaf.clone(), notice("2.0", 10)).await;
    settle(&f.core).await;
    assert_eq!(
        progress(&f.sent.take()).last().map(|s| s.0.clone()),
        Some("-2".into())
    );
}

#[tokio::test]
async fn a_job_of_a_leaf_no_longer_configured_ends_with_a_reason() {
    let prepared = async |j: &Journal| {
        let r = JobRecord::new(DeviceId::new("pk", "gone"), notice("2.0", 10), 5);
        j.put(&r).await.unwrap();
    };
    let f = fixture_with(&[device("leaf")], prepared).await;
    let key = (DeviceId::new("pk", "gone"), "default".to_string());
    let ticket = match f.core.table.offer(&key.0, notice("3.0", 10)).await {
        Intake::Run(t) => t,
        other => panic!("{other:?}"),
    };
    f.core.spawn(ticket, None);
    settle(&f.core).await;
    let p = progress(&f.sent.take());
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "-1");
    assert!(
        p[0].1
            .contains("device pk/gone module default is no longer in the configuration"),
        "{:?}",
        p[0].1
    );
}

#[tokio::test]
async fn on_connect_informs_the_journal_version_and_asks_only_for_idle_leaves() {
    let prepared = async |j: &Journal| {
        // leaf-a was upgraded before a crash; its record says so.
        let mut r = JobRecord::new(DeviceId::new("pk", "a"), notice("2.0", 10), 5);
        for ev in [
            Event::Start,
            Event::Downloaded,
            Event::Verified,
            Event::Flashed,
        ] {
            r.job.on(ev, 6);
        }
        r.job.on(
            Event::Identified {
                version: "2.0".into(),
            },
            7,
        );
        j.put(&r).await.unwrap();
        j.mark_reported(&r).await.unwrap();
        // leaf-b is in the middle of a download.
        let mut r = JobRecord::new(DeviceId::new("pk", "b"), notice("2.0", 10), 5);
        r.job.on(Event::Start, 6);
        j.put(&r).await.unwrap();
        // leaf-c's job failed, and the gateway stopped before its -4 was in
        // the outbox: asking for c's package now would bring the failed
        // notice back before the platform sees the failure (campaign, seed 1).
        let mut r = JobRecord::new(DeviceId::new("pk", "c"), notice("2.0", 10), 5);
        r.job.on(Event::Start, 6);
        r.job.on(
            Event::DownloadFailed {
                desc: "gone".into(),
            },
            7,
        );
        assert!(r.job.is_terminal());
        j.put(&r).await.unwrap();
    };
    let f = fixture_with(&[device("a"), device("b"), device("c")], prepared).await;
    f.core.on_connected().await;
    let sent = f.sent.take();
    let informs: Vec<(String, String)> = sent
        .iter()
        .filter(|s| s.topic.starts_with("/ota/device/inform/"))
        .map(|s| {
            (
                s.topic.clone(),
                s.payload["params"]["version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // b's version is unknown to the journal and b is busy: its job reports
    // the version it reads back; nothing is informed for it now.
    assert_eq!(informs, [(topics::inform("pk", "a"), "2.0".to_string())]);
    let gets: Vec<&str> = sent
        .iter()
        .filter(|s| s.topic.ends_with("/thing/ota/firmware/get"))
        .map(|s| s.topic.as_str())
        .collect();
    assert_eq!(
        gets,
        [topics::firmware_get("pk", "a")],
        "b is busy, c's end is not reported yet"
    );
    // Once c's end is in the outbox, the next connect asks for it.
    f.core
        .ensure_reported(&(DeviceId::new("pk", "c"), "default".to_string()))
        .await;
    f.sent.take();
    f.core.on_connected().await;
    let gets: Vec<String> = f
        .sent
        .take()
        .into_iter()
        .filter(|s| s.topic.ends_with("/thing/ota/firmware/get"))
        .map(|s| s.topic)
        .collect();
    assert_eq!(
        gets,
        [
            topics::firmware_get("pk", "a"),
            topics::firmware_get("pk", "c")
        ]
    );
}

#[tokio::test]
async fn an_unreported_end_is_published_again_with_the_same_messages_once() {
    let mut record = JobRecord::new(DeviceId::new("pk", "a"), notice("2.0", 10), 5);
    for ev in [
        Event::Start,
        Event::Downloaded,
        Event::Verified,
        Event::Flashed,
    ] {
        record.job.on(ev, 6);
    }
    let mut sent_at_end = record.job.on(
        Event::Identified {
            version: "2.0".into(),
        },
        7,
    );
    sent_at_end.pop(); // Done
    let r = record.clone();
    let f = fixture_with(&[device("a")], async move |j: &Journal| {
        j.put(&r).await.unwrap();
    })
    .await;
    let key = (DeviceId::new("pk", "a"), "default".to_string());
    f.core.ensure_reported(&key).await;
    let first = f.sent.take();
    assert_eq!(first.len(), sent_at_end.len(), "{first:?}");
    assert!(first.iter().all(|s| s.delivery == Delivery::Durable));
    let id = record.job.terminal_id().unwrap();
    assert_eq!(first[0].payload["id"], id.to_string());
    assert_eq!(first[0].payload["params"]["step"], "100");
    assert_eq!(first[1].payload["id"], (id + 1).to_string());
    assert_eq!(first[1].payload["params"]["version"], "2.0");
    // Marked: a second start publishes nothing.
    f.core.ensure_reported(&key).await;
    assert!(f.sent.take().is_empty());
}

/// A leaf whose version the journal does not know (a new or rebuilt store) is
/// asked before it is informed; one that cannot be asked is not informed at
/// all: the configured version is only the operator's word.
#[tokio::test]
async fn a_leaf_of_unknown_version_is_not_informed_a_guess() {
    let f = fixture(&[device("new")]).await;
    f.core.on_connected().await;
    settle(&f.core).await;
    let sent = f.sent.take();
    assert!(
        !sent
            .iter()
            .any(|s| s.topic.starts_with("/ota/device/inform/")),
        "no plugin, no link: nothing may be informed: {sent:?}"
    );
    // It is idle: asked for pending packages all the same.
    assert!(
        sent.iter()
            .any(|s| s.topic == topics::firmware_get("pk", "new"))
    );
    assert!(
        lock(&f.core.identifying).is_empty(),
        "asked again next time"
    );
}

/// A campaign request for every leaf, by URL (nothing is downloaded until a
/// member starts, and no driver runs here).
fn campaign_request() -> crate::rollout::CampaignRequest {
    serde_json::from_value(serde_json::json!({
        "version": "2.0.0",
        "image": {"url": "http://127.0.0.1:1/fw.bin", "sha256": "ab".repeat(32), "size": 10},
    }))
    .unwrap()
}

#[tokio::test]
async fn campaigns_that_are_over_are_kept_up_to_a_bound_and_a_leaf_is_in_one_at_a_time() {
    let f = fixture(&[device("leaf-1"), device("leaf-2")]).await;
    let core = &f.core;
    let first = core.create_campaign(campaign_request()).await.unwrap();
    assert_eq!(first.counts.total, 2);
    // The same leaves again while the first is not over: refused.
    let err = core.create_campaign(campaign_request()).await.unwrap_err();
    assert!(
        matches!(&err, campaigns::RolloutError::Conflict(m) if m.contains(&first.id)),
        "{err:?}"
    );
    core.campaign_verb(&first.id, crate::rollout::Verb::Stop, None)
        .await
        .unwrap();
    for _ in 0..crate::rollout::KEEP_ENDED + 3 {
        let c = core.create_campaign(campaign_request()).await.unwrap();
        core.campaign_verb(&c.id, crate::rollout::Verb::Stop, None)
            .await
            .unwrap();
    }
    let all = core.campaigns.all();
    assert_eq!(
        all.len(),
        crate::rollout::KEEP_ENDED + 1,
        "the newest are kept"
    );
    assert!(
        all.iter().all(|c| c.id != first.id),
        "the oldest ended one went"
    );
    // What is kept is what is stored.
    let stored = crate::rollout::CampaignStore::open(&f.store).unwrap().all();
    assert_eq!(stored.len(), all.len());
    // An unknown campaign is a 404, a verb its state refuses a 409.
    let last = all.last().unwrap().id.clone();
    assert!(matches!(
        core.campaign_verb("c999", crate::rollout::Verb::Pause, None)
            .await,
        Err(campaigns::RolloutError::NotFound(_))
    ));
    assert!(matches!(
        core.campaign_verb(&last, crate::rollout::Verb::Resume, None)
            .await,
        Err(campaigns::RolloutError::Conflict(_))
    ));
}
