use super::*;

fn cand(dn: &str, bus: &str, version: &str) -> Candidate {
    Candidate {
        product_key: "pk".into(),
        device_name: dn.into(),
        module: "default".into(),
        family: "xmodem".into(),
        model: None,
        version: version.into(),
        tags: vec![],
        bus: bus.into(),
    }
}

/// 24 leaves, 8 on each of three buses.
fn floor() -> Vec<Candidate> {
    (0..24)
        .map(|i| cand(&format!("leaf-{i:02}"), &format!("bus-{}", i % 3), "1.0"))
        .collect()
}

fn campaign(plan: PlanSpec, leaves: &[Candidate]) -> Campaign {
    let groups = plan.groups(leaves).unwrap();
    Campaign::new(
        "c1".into(),
        Origin::Local,
        Image {
            url: Some("http://h/fw".into()),
            sign_method: "sha256".into(),
            sign: "ab".repeat(32),
            size: 10,
        },
        "2.0".into(),
        Selection::default(),
        plan,
        groups,
        1_000,
    )
}

fn free(n: usize) -> BTreeMap<String, usize> {
    (0..3).map(|b| (format!("bus-{b}"), n)).collect()
}

fn ok() -> MemberState {
    MemberState::Succeeded {
        version: "2.0".into(),
    }
}

fn device_failure() -> MemberState {
    MemberState::Failed {
        reason: "-4: refused".into(),
        counted: true,
    }
}

/// Start every due member and end it with `end(at)`, until nothing is due.
fn drive(c: &mut Campaign, mut end: impl FnMut(At) -> MemberState) -> Vec<At> {
    let mut order = Vec::new();
    let mut now = 2_000;
    loop {
        let due = c.due(now, &mut free(1), &mut usize::MAX.clone());
        if due.is_empty() {
            return order;
        }
        for (k, at) in due.iter().enumerate() {
            c.started(*at, now + k as u64, now);
        }
        for at in due {
            now += 1;
            c.ended(at, end(at), now);
            order.push(at);
        }
    }
}

#[test]
fn sizes_parse_and_zero_is_refused() {
    assert_eq!(Size::parse("2"), Ok(Size::Count(2)));
    assert_eq!(Size::parse(" 50% "), Ok(Size::Percent(50)));
    for bad in ["0", "0%", "101%", "half", "-1", ""] {
        assert!(Size::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(Size::Percent(50).of(22), 11);
    assert_eq!(Size::Percent(10).of(3), 1, "a share is rounded up");
    assert_eq!(Size::Count(5).of(3), 3);
    let s: Size = serde_json::from_str("\"25%\"").unwrap();
    assert_eq!(s, Size::Percent(25));
    let s: Size = serde_json::from_str("3").unwrap();
    assert_eq!(s, Size::Count(3));
    assert!(serde_json::from_str::<Size>("0").is_err());
    assert_eq!(
        serde_json::to_string(&Size::Percent(25)).unwrap(),
        "\"25%\""
    );
}

#[test]
fn a_selection_takes_what_every_criterion_allows() {
    let mut a = cand("press-01", "rs485-1", "1.2");
    a.tags = vec!["line-3".into(), "press".into()];
    a.model = Some("0x413".into());
    let mut b = cand("oven-01", "rs485-2", "2.0.1");
    b.family = "smp".into();
    let sel = |json: &str| -> Selection { serde_json::from_str(json).unwrap() };
    let hits = |s: &Selection| -> Vec<String> {
        [&a, &b]
            .iter()
            .filter(|c| s.matches(c))
            .map(|c| c.device_name.clone())
            .collect()
    };
    assert_eq!(hits(&sel("{}")), ["press-01", "oven-01"]);
    assert_eq!(hits(&sel(r#"{"family":"smp"}"#)), ["oven-01"]);
    assert_eq!(hits(&sel(r#"{"model":"0x413"}"#)), ["press-01"]);
    assert_eq!(hits(&sel(r#"{"from_version":"1.2"}"#)), ["press-01"]);
    assert_eq!(hits(&sel(r#"{"from_version":"!1.2"}"#)), ["oven-01"]);
    assert_eq!(
        hits(&sel(r#"{"from_version":">=1.0, <2.0"}"#)),
        ["press-01"]
    );
    assert_eq!(hits(&sel(r#"{"from_version":">=2"}"#)), ["oven-01"]);
    assert_eq!(hits(&sel(r#"{"devices":["press-*"]}"#)), ["press-01"]);
    assert_eq!(hits(&sel(r#"{"devices":["pk/oven-01"]}"#)), ["oven-01"]);
    assert_eq!(hits(&sel(r#"{"tags":["line-3","press"]}"#)), ["press-01"]);
    assert!(hits(&sel(r#"{"tags":["line-3","oven"]}"#)).is_empty());
    assert_eq!(hits(&sel(r#"{"bus":"rs485-2"}"#)), ["oven-01"]);
    assert!(hits(&sel(r#"{"module":"MCU"}"#)).is_empty());
    // Syntax errors are said, not matched.
    assert!(sel(r#"{"from_version":">=x"}"#).check().is_err());
    assert!(sel(r#"{"devices":["press-[" ]}"#).check().is_err());
    assert!(serde_json::from_str::<Selection>(r#"{"famly":"smp"}"#).is_err());
}

#[test]
fn a_canary_of_two_then_waves_of_half_spread_over_the_buses() {
    let plan = PlanSpec {
        canary: Some(Size::Count(2)),
        waves: vec![Size::Percent(50)],
        ..PlanSpec::default()
    };
    let groups = plan.groups(&floor()).unwrap();
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 11, 11]);
    assert_ne!(groups[0][0].bus, groups[0][1].bus, "the canary spans buses");
    // Nobody twice, nobody left out.
    let mut all: Vec<String> = groups.iter().flatten().map(Candidate::device).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 24);
    // Explicit canaries must be selected.
    let named = PlanSpec {
        canary_devices: vec!["pk/leaf-07".into()],
        ..PlanSpec::default()
    };
    assert_eq!(named.groups(&floor()).unwrap()[0][0].device_name, "leaf-07");
    let stranger = PlanSpec {
        canary_devices: vec!["pk/nobody".into()],
        ..PlanSpec::default()
    };
    assert!(stranger.groups(&floor()).is_err());
}

#[test]
fn no_wave_starts_before_the_canary_succeeded_and_a_bus_takes_one_at_a_time() {
    let mut c = campaign(
        PlanSpec {
            canary: Some(Size::Count(2)),
            waves: vec![Size::Percent(50)],
            ..PlanSpec::default()
        },
        &floor(),
    );
    let due = c.due(2_000, &mut free(1), &mut usize::MAX.clone());
    assert_eq!(due, [(0, 0), (0, 1)]);
    for at in &due {
        c.started(*at, 1, 2_000);
    }
    assert!(
        c.due(2_000, &mut free(1), &mut usize::MAX.clone())
            .is_empty(),
        "only the canary"
    );
    c.ended((0, 0), ok(), 2_001);
    assert!(
        c.due(2_001, &mut free(1), &mut usize::MAX.clone())
            .is_empty(),
        "half the canary is not enough"
    );
    c.ended((0, 1), ok(), 2_002);
    let wave = c.due(2_002, &mut free(1), &mut usize::MAX.clone());
    assert_eq!(wave.len(), 3, "one per bus: {wave:?}");
    assert!(wave.iter().all(|(g, _)| *g == 1));
    let buses: std::collections::BTreeSet<&str> =
        wave.iter().map(|at| c.member(*at).bus.as_str()).collect();
    assert_eq!(buses.len(), 3);
    // Everything succeeds: finished, every group in order.
    let order = drive(&mut c, |_| ok());
    assert!(order.windows(2).all(|w| w[0].0 <= w[1].0), "{order:?}");
    assert_eq!(c.state, CampaignState::Finished);
    assert_eq!(c.counts().succeeded, 24);
}

#[test]
fn failures_above_the_error_threshold_pause_the_campaign_with_the_reason() {
    let plan = PlanSpec {
        canary: Some(Size::Count(2)),
        waves: vec![Size::Percent(50)],
        error_threshold: Some(20),
        min_executed: 4,
        ..PlanSpec::default()
    };
    let mut c = campaign(plan, &floor());
    // The canary passes; 3 of the first 4 of wave 1 fail on the device.
    let mut fails = 0;
    drive(&mut c, |(g, _)| {
        if g == 1 && fails < 3 {
            fails += 1;
            device_failure()
        } else {
            ok()
        }
    });
    assert_eq!(c.state, CampaignState::Paused);
    assert_eq!(c.pause, Some(PauseKind::ErrorThreshold));
    let reason = c.pause_reason.clone().unwrap();
    assert!(reason.contains("3 of 11 leaves in wave 1"), "{reason}");
    let counted = c.groups[1].counts();
    assert!(
        counted.executed() >= 4,
        "not before min_executed: {counted:?}"
    );
    assert!(
        c.due(9_000, &mut free(1), &mut usize::MAX.clone())
            .is_empty(),
        "paused: nothing starts"
    );
    // Resume takes the failures as seen and goes on.
    c.resume(9_000, "looked at them").unwrap();
    assert_eq!(c.state, CampaignState::Running);
    drive(&mut c, |_| ok());
    // Wave 1 ended below 100%: it waits for an approval.
    assert_eq!(c.pause, Some(PauseKind::Approval), "{:?}", c.pause_reason);
    assert!(c.resume(9_500, "x").is_err(), "an approval is not a resume");
    c.approve(9_600, "3 bad presses known").unwrap();
    drive(&mut c, |_| ok());
    assert_eq!(c.state, CampaignState::Finished);
    assert_eq!(c.counts().succeeded, 21);
    let reasons: Vec<&str> = c.transitions.iter().map(|t| t.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("resumed")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("approved")),
        "{reasons:?}"
    );
}

#[test]
fn download_trouble_does_not_count_against_the_error_threshold() {
    let plan = PlanSpec {
        waves: vec![Size::Count(4)],
        error_threshold: Some(0),
        ..PlanSpec::default()
    };
    let mut c = campaign(plan, &floor()[..4]);
    drive(&mut c, |_| MemberState::Failed {
        reason: "-2: 404".into(),
        counted: false,
    });
    assert_eq!(c.state, CampaignState::Finished, "{:?}", c.pause_reason);
    assert_eq!(c.counts().failed, 4);
}

#[test]
fn stop_leaves_the_rest_not_started_and_running_jobs_end_normally() {
    let mut c = campaign(
        PlanSpec {
            waves: vec![Size::Count(6)],
            ..PlanSpec::default()
        },
        &floor(),
    );
    let due = c.due(2_000, &mut free(1), &mut usize::MAX.clone());
    for at in &due {
        c.started(*at, 7, 2_000);
    }
    c.stop(2_100, "wrong image").unwrap();
    assert!(
        c.due(2_200, &mut free(5), &mut usize::MAX.clone())
            .is_empty()
    );
    // The running ones still end and are counted.
    c.ended(due[0], ok(), 2_300);
    let counts = c.counts();
    assert_eq!(counts.succeeded, 1);
    assert_eq!(counts.running, 2);
    assert_eq!(counts.not_started, 21);
    assert_eq!(counts.failed, 0, "stopped is not failed");
    assert_eq!(c.state, CampaignState::Stopped);
    assert!(c.resume(2_400, "x").is_err());
    assert!(c.stop(2_400, "x").is_err());
}

#[test]
fn approve_plans_wait_before_every_later_group() {
    let mut c = campaign(
        PlanSpec {
            canary: Some(Size::Count(1)),
            waves: vec![Size::Count(3)],
            approve: true,
            ..PlanSpec::default()
        },
        &floor()[..4],
    );
    drive(&mut c, |_| ok());
    assert_eq!(c.pause, Some(PauseKind::Approval));
    assert_eq!(c.counts().succeeded, 1);
    c.approve(3_000, "canary fine").unwrap();
    drive(&mut c, |_| ok());
    assert_eq!(c.state, CampaignState::Finished);
}

#[test]
fn the_rate_limits_starts_per_minute() {
    let mut c = campaign(
        PlanSpec {
            rate_per_minute: Some(2),
            ..PlanSpec::default()
        },
        &floor(),
    );
    let first = c.due(0, &mut free(8), &mut usize::MAX.clone());
    assert_eq!(first.len(), 2);
    for at in first {
        c.started(at, 1, 0);
    }
    assert!(
        c.due(59_999, &mut free(8), &mut usize::MAX.clone())
            .is_empty()
    );
    assert_eq!(
        c.due(60_000, &mut free(8), &mut usize::MAX.clone()).len(),
        2
    );
}

#[test]
fn retry_runs_the_failed_again() {
    let mut c = campaign(PlanSpec::default(), &floor()[..3]);
    let mut first = true;
    drive(&mut c, |_| {
        if std::mem::take(&mut first) {
            device_failure()
        } else {
            ok()
        }
    });
    assert_eq!(c.state, CampaignState::Finished);
    assert_eq!(c.retry(5_000, "cable fixed"), Ok(1));
    assert_eq!(c.state, CampaignState::Running);
    drive(&mut c, |_| ok());
    assert_eq!(c.counts().succeeded, 3);
    assert_eq!(c.state, CampaignState::Finished);
    assert!(c.retry(6_000, "x").is_err(), "nothing failed");
}

#[test]
fn a_job_end_counts_by_the_phase_it_failed_in() {
    use crate::ota::job::{Event, Job};
    use crate::ota::protocol::{Download, SignMethod};
    let notice = Notice {
        id: 1,
        version: "2.0".into(),
        size: 10,
        download: Download::Http {
            url: "http://h/fw".into(),
        },
        sign_method: SignMethod::Sha256,
        sign: "ab".repeat(32),
        module: "default".into(),
        is_diff: false,
        ext_data: None,
    };
    let run = |events: Vec<Event>| {
        let mut job = Job::new(&notice, 0);
        for (i, e) in events.into_iter().enumerate() {
            job.on(e, i as u64 + 1);
        }
        outcome(&job)
    };
    let counted = |m: Option<MemberState>| match m {
        Some(MemberState::Failed { counted, .. }) => counted,
        other => panic!("{other:?}"),
    };
    assert!(!counted(run(vec![
        Event::Start,
        Event::DownloadFailed { desc: "404".into() }
    ])));
    assert!(!counted(run(vec![
        Event::Start,
        Event::ImageRejected {
            desc: "digest".into()
        }
    ])));
    let flash = vec![
        Event::Start,
        Event::Downloaded,
        Event::Verified,
        Event::FlashFailed {
            step: crate::ota::protocol::Step::FlashFailed,
            desc: "NAK".into(),
        },
    ];
    assert!(counted(run(flash)));
    assert!(!counted(run(vec![
        Event::Start,
        Event::Downloaded,
        Event::Verified,
        Event::Crashed {
            desc: format!(
                "{} the job was flashing: panic",
                crate::ota::job::CRASH_PREFIX
            )
        }
    ])));
    assert_eq!(run(vec![Event::Start]), None, "not ended");
}

#[test]
fn a_paused_collection_goes_back_to_collecting() {
    let mut c = campaign(PlanSpec::default(), &floor()[..2]);
    c.state = CampaignState::Collecting;
    c.collect_until_ms = Some(5_000);
    c.pause(2_000, "wait").unwrap();
    assert!(
        c.due(2_100, &mut free(1), &mut usize::MAX.clone())
            .is_empty()
    );
    c.resume(2_200, "go").unwrap();
    assert_eq!(c.state, CampaignState::Collecting);
    assert!(
        c.due(2_300, &mut free(1), &mut usize::MAX.clone())
            .is_empty(),
        "nothing starts while collecting"
    );
}

/// Start and end one member at a time: `(g, i)`, with `state`.
fn run_one(c: &mut Campaign, at: At, state: MemberState, now: u64) {
    c.started(at, now, now);
    c.ended(at, state, now + 1);
}

#[test]
fn going_on_past_the_error_threshold_takes_the_failures_seen_not_all_to_come() {
    let plan = PlanSpec {
        waves: vec![Size::Count(10)],
        error_threshold: Some(20),
        ..PlanSpec::default()
    };
    let mut c = campaign(plan, &floor()[..10]);
    // An operator's pause and resume acknowledge nothing.
    c.pause(1_000, "lunch").unwrap();
    c.resume(1_001, "back").unwrap();
    for i in 0..3 {
        run_one(&mut c, (0, i), device_failure(), 2_000 + i as u64);
    }
    assert_eq!(
        c.pause,
        Some(PauseKind::ErrorThreshold),
        "{:?}",
        c.transitions
    );
    c.resume(3_000, "seen them").unwrap();
    // A success goes on; one more failure pauses again.
    run_one(&mut c, (0, 3), ok(), 3_100);
    assert_eq!(c.state, CampaignState::Running);
    run_one(&mut c, (0, 4), device_failure(), 3_200);
    assert_eq!(c.pause, Some(PauseKind::ErrorThreshold));
    assert!(
        c.pause_reason.as_deref().unwrap().contains("4 of 10"),
        "{:?}",
        c.pause_reason
    );
}

#[test]
fn the_error_threshold_holds_while_a_campaign_waits_for_an_approval() {
    let plan = PlanSpec {
        canary: Some(Size::Count(4)),
        success_threshold: 50,
        error_threshold: Some(25),
        approve: true,
        ..PlanSpec::default()
    };
    let mut c = campaign(plan, &floor()[..8]);
    run_one(&mut c, (0, 0), ok(), 1_000);
    run_one(&mut c, (0, 1), ok(), 1_100);
    assert_eq!(c.pause, Some(PauseKind::Approval));
    // Two canaries still under way fail: the error pause replaces it.
    c.started((0, 2), 9, 1_200);
    c.started((0, 3), 10, 1_200);
    c.ended((0, 2), device_failure(), 1_300);
    c.ended((0, 3), device_failure(), 1_400);
    assert_eq!(
        c.pause,
        Some(PauseKind::ErrorThreshold),
        "{:?}",
        c.pause_reason
    );
    assert!(
        c.due(1_500, &mut free(3), &mut usize::MAX.clone())
            .is_empty()
    );
}

#[test]
fn retry_during_an_approval_wait_runs_the_failed_at_once() {
    let mut c = campaign(
        PlanSpec {
            canary: Some(Size::Count(1)),
            ..PlanSpec::default()
        },
        &floor()[..3],
    );
    run_one(&mut c, (0, 0), device_failure(), 1_000);
    assert_eq!(c.pause, Some(PauseKind::Approval));
    assert_eq!(c.retry(2_000, "cable fixed"), Ok(1));
    assert_eq!(c.state, CampaignState::Running);
    assert_eq!(
        c.due(2_100, &mut free(1), &mut usize::MAX.clone()),
        [(0, 0)]
    );
    // Approving while the canary runs lets wave 1 start as soon as it ends.
    c.started((0, 0), 5, 2_100);
    c.approve(2_200, "go on whatever").unwrap();
    assert!(
        c.due(2_300, &mut free(1), &mut usize::MAX.clone())
            .is_empty()
    );
    c.ended((0, 0), device_failure(), 2_400);
    assert_eq!(c.state, CampaignState::Running, "{:?}", c.pause_reason);
    assert_eq!(c.current_group, 1);
}

#[test]
fn no_more_start_than_the_global_limit_and_superseded_leaves_are_left_out() {
    let mut c = campaign(PlanSpec::default(), &floor()[..6]);
    let mut global = 2;
    let due = c.due(1_000, &mut free(8), &mut global);
    assert_eq!(due.len(), 2);
    assert_eq!(global, 0);
    for at in &due {
        c.started(*at, 1, 1_000);
    }
    c.ended(due[0], ok(), 1_100);
    c.ended(
        due[1],
        MemberState::Superseded {
            reason: "replaced by 3.0".into(),
        },
        1_100,
    );
    for i in 2..6 {
        run_one(&mut c, (0, i), ok(), 1_200 + i as u64);
    }
    assert_eq!(c.state, CampaignState::Finished);
    let n = c.counts();
    assert_eq!((n.succeeded, n.superseded, n.failed), (5, 1, 0));
    assert!(
        c.retry(2_000, "x").is_err(),
        "a superseded leaf is not retried"
    );
}
