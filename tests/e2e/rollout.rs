//! Issue 17: rollouts at the edge. Campaigns through the gateway's API and
//! `otagw upgrade`, with a real broker (mosquitto) as the platform, images
//! from a real HTTP server and XMODEM leaves on real pseudo-terminals,
//! grouped on three RS-485 buses (`[[bus]]`, one job at a time on each).
//! Whether two leaves of one bus ever flashed at once is judged from the
//! simulators' own transfer timestamps.

use std::process::Stdio;
use std::time::{Duration, Instant};

use otagw_e2e::*;
use sha2::Digest as _;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");

/// Upper bound for a whole campaign (never a synchronisation).
const LIMIT: Duration = Duration::from_secs(240);

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

fn name(i: usize) -> String {
    format!("leaf-{i:02}")
}

/// The bus of leaf `i`: three buses, leaves dealt round-robin.
fn bus(i: usize) -> String {
    format!("rs485-{}", i % 3)
}

struct Floor {
    broker: Mosquitto,
    probe: MqttProbe,
    files: FileServer,
    plugins: PluginsDir,
    data: tempfile::TempDir,
    sims: Vec<PtySim>,
}

/// `n` XMODEM leaves at 1.0.0 on three buses; `tweak(i, config)` changes
/// one simulator (a refusing bootloader, a held transfer).
async fn floor(n: usize, tweak: impl Fn(usize, &mut XmodemSimConfig)) -> Floor {
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let sims = (0..n)
        .map(|i| {
            let mut c = xmodem_device();
            // ~0.7 s a transfer of the test image: long enough for two
            // transfers on one bus to overlap if the gateway let them.
            c.line_rate = Some(115_200);
            tweak(i, &mut c);
            PtySim::spawn(c).unwrap()
        })
        .collect();
    Floor {
        broker,
        probe,
        files: FileServer::start().await,
        plugins: PluginsDir::with(&[artifacts::XMODEM]),
        data: tempfile::tempdir().unwrap(),
        sims,
    }
}

impl Floor {
    fn config(&self) -> String {
        self.config_holding(true)
    }

    /// The config; with `holding` false a held simulator's leaf gets no long
    /// block timeout (after a release: a restarted gateway meets a receiver
    /// still in the killed one's session and must give up on it as a real
    /// sender would, not wait ten minutes for an answer).
    fn config_holding(&self, holding: bool) -> String {
        let leaves: Vec<LeafSpec> = self
            .sims
            .iter()
            .enumerate()
            .map(|(i, sim)| {
                let mut leaf = LeafSpec::xmodem(&name(i), &sim.url());
                // A held transfer must outlast the test's wait for the kill.
                if holding && sim.handle().config().hold_after.is_some() {
                    leaf.options
                        .push(("block_timeout_ms".into(), "600000".into()));
                }
                leaf.extra = format!(
                    "bus = {:?}\ntags = [\"line-3\", {:?}]\n",
                    bus(i),
                    if i % 2 == 0 { "press" } else { "oven" }
                );
                leaf
            })
            .collect();
        let mut c = gateway_config(
            self.data.path(),
            self.plugins.path(),
            Some(&self.broker.url()),
            &leaves,
        );
        for b in 0..3 {
            c.push_str(&format!(
                "[[bus]]\nname = \"rs485-{b}\"\nmax_parallel = 1\n\n"
            ));
        }
        c
    }

    fn token_file(&self) -> std::path::PathBuf {
        self.data.path().join("api-token")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .unwrap()
            .trim()
            .to_string()
    }

    /// The 2.0.0 image, served; its URL and SHA-256.
    fn image(&self) -> (String, String) {
        let img = versioned_image(8_192, "2.0.0");
        let sha = hex::encode(sha2::Sha256::digest(&img));
        (self.files.add("fw-2.0.0.bin", img), sha)
    }

    /// `otagw ARGS` against the gateway at `api`: exit code, stdout, stderr.
    async fn cli(&self, api: std::net::SocketAddr, args: &[&str]) -> (Option<i32>, String, String) {
        let token = self.token_file();
        let out = tokio::process::Command::new(GATEWAY_BIN)
            .args(args)
            .args(["--api", &format!("http://{api}")])
            .arg("--token-file")
            .arg(&token)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        // A follow that never ends is a failure, not a hung test.
        let out = tokio::time::timeout(LIMIT, out)
            .await
            .unwrap_or_else(|_| panic!("otagw {args:?} did not end within {LIMIT:?}"))
            .expect("run otagw");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Floor {
    /// `otagw upgrade` of the served 2.0.0 image with `plan` (and any other
    /// arguments): exit code, stdout, stderr.
    async fn upgrade(
        &self,
        api: std::net::SocketAddr,
        plan: &[&str],
    ) -> (Option<i32>, String, String) {
        let (url, sha) = self.image();
        let mut args = vec![
            "upgrade",
            "--image",
            &url,
            "--sha256",
            &sha,
            "--version",
            "2.0.0",
        ];
        args.extend_from_slice(plan);
        self.cli(api, &args).await
    }

    /// The platform's 2.0.0 notice for every leaf, ids from `first_id`:
    /// the image's URL and bytes.
    async fn notify_all(&self, first_id: u64) -> (String, Vec<u8>) {
        let img = versioned_image(8_192, "2.0.0");
        let url = self.files.add("fw-2.0.0.bin", img.clone());
        for i in 0..self.sims.len() {
            self.probe
                .publish(
                    &topic("upgrade", &name(i)),
                    notice(first_id + i as u64, "2.0.0", &url, &img),
                )
                .await;
        }
        (url, img)
    }

    /// [`Floor::upgrade`] without `--follow`: the campaign's id it prints.
    async fn start_campaign(&self, api: std::net::SocketAddr, plan: &[&str]) -> String {
        let (code, out, err) = self.upgrade(api, plan).await;
        assert_eq!(code, Some(0), "{out}\n{err}");
        let id = out.trim().to_string();
        assert!(id.starts_with('c'), "prints the campaign id: {out}");
        id
    }
}

/// The first campaign the gateway shows paused (within `LIMIT`).
async fn first_paused(api: std::net::SocketAddr) -> serde_json::Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let all = http_get_json(api, "/api/campaigns").await;
        if let Some(c) = all
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["state"] == "paused")
        {
            return c.clone();
        }
        assert!(Instant::now() < deadline, "no paused campaign: {all:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET a campaign until `done` holds for it (at most `LIMIT`): each answer
/// is a new state of the campaign, not a timer.
async fn campaign_until(
    api: std::net::SocketAddr,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let c = http_get_json(api, &format!("/api/campaigns/{id}")).await;
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what} never came: {c:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn members(c: &serde_json::Value) -> Vec<&serde_json::Value> {
    c["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["members"].as_array().unwrap())
        .collect()
}

fn member<'a>(c: &'a serde_json::Value, dn: &str) -> &'a serde_json::Value {
    let device = format!("{LEAF_PK}/{dn}");
    members(c)
        .into_iter()
        .find(|m| m["device"] == device.as_str())
        .unwrap_or_else(|| panic!("{device} not in {c:#}"))
}

/// No two transfers of leaves on one bus overlapped (the simulators' clocks).
fn assert_one_at_a_time_per_bus(sims: &[PtySim]) {
    for b in 0..3 {
        let mut spans: Vec<(Instant, Instant, usize)> = Vec::new();
        for (i, sim) in sims.iter().enumerate().filter(|(i, _)| i % 3 == b) {
            for (start, end) in sim.handle().transfers() {
                spans.push((start, end.expect("no transfer left open"), i));
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{} and {} flashed at once on rs485-{b}",
                name(w[0].2),
                name(w[1].2)
            );
        }
    }
}

/// Acceptance 1: 24 leaves on three buses, a canary of 2 then waves of 50 %,
/// through `otagw upgrade --follow` piped (one line per event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_then_waves_upgrade_24_leaves_one_at_a_time_per_bus() {
    let f = floor(24, |_, _| {}).await;
    let gw = Daemon::start(&f.config()).await;
    let (code, out, err) = f
        .upgrade(
            gw.api,
            &[
                "--tag", "line-3", "--canary", "2", "--wave", "50%", "--follow",
            ],
        )
        .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let id = out.lines().next().unwrap().trim().to_string();
    // Piped: a line per event, a summary, no bar.
    assert!(
        out.contains(&format!("{LEAF_PK}/leaf-00 succeeded (runs 2.0.0)")),
        "{out}"
    );
    assert!(out.contains("wave 1 opened"), "{out}");
    assert!(
        out.contains(&format!("campaign {id} finished: 24 of 24 succeeded")),
        "{out}"
    );
    assert!(
        !out.contains('#') && !err.contains('#'),
        "no bars when piped:\n{out}\n{err}"
    );

    let c = http_get_json(gw.api, &format!("/api/campaigns/{id}")).await;
    let groups = c["groups"].as_array().unwrap();
    let sizes: Vec<usize> = groups
        .iter()
        .map(|g| g["members"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [2, 11, 11], "{c:#}");
    // The canary finished (by the simulators' clocks) before any other leaf
    // was flashed at all.
    let canary: Vec<usize> = groups[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["device"].as_str().unwrap()[LEAF_PK.len() + 6..]
                .parse()
                .unwrap()
        })
        .collect();
    let canary_end = canary
        .iter()
        .map(|&i| f.sims[i].handle().transfers()[0].1.unwrap())
        .max()
        .unwrap();
    for (i, sim) in f
        .sims
        .iter()
        .enumerate()
        .filter(|(i, _)| !canary.contains(i))
    {
        let first = sim.handle().transfers()[0].0;
        assert!(
            canary_end <= first,
            "{} started before the canary ended",
            name(i)
        );
    }
    assert_one_at_a_time_per_bus(&f.sims);
    for (i, sim) in f.sims.iter().enumerate() {
        assert_eq!(sim.handle().version(), "2.0.0", "{}", name(i));
        assert_eq!(sim.handle().images_received(), 1, "{}", name(i));
    }
    // The platform heard every leaf's new version from the leaf itself.
    f.probe
        .wait_until(LIMIT, "informs of 2.0.0", |m| {
            (0..24).all(|i| has_inform(m, &topic("inform", &name(i)), "2.0.0"))
        })
        .await;
    // The summary upstream carries the campaign.
    f.probe
        .wait_until(LIMIT, "a summary with the finished campaign", |m| {
            m.iter().any(|x| {
                x.topic.ends_with("/user/ota/summary")
                    && serde_json::from_slice::<serde_json::Value>(&x.payload).is_ok_and(|v| {
                        v["params"]["campaigns"].as_array().is_some_and(|a| {
                            a.iter().any(|c| {
                                c["id"] == id.as_str()
                                    && c["state"] == "finished"
                                    && c["succeeded"] == 24
                            })
                        })
                    })
            })
        })
        .await;
    // The version distribution shows them all on 2.0.0.
    let versions = gw.api_get("/api/versions").await;
    let v = versions.as_array().unwrap();
    assert_eq!(v.len(), 1, "{versions:#}");
    assert_eq!(v[0]["version"], "2.0.0");
    assert_eq!(v[0]["count"], 24);
    gw.stop().await;
}

/// Acceptance 2: the image fails on 3 of the first 6 leaves; the campaign
/// pauses at the error threshold with the reason, goes on after an
/// approval, and a stop leaves the rest untouched and not started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_pause_at_the_error_threshold_and_a_stop_leaves_the_rest_not_started() {
    // Leaves 2, 3 and 4 are the first of wave 1 on each bus (the canary is
    // 0 and 1): their bootloaders refuse the image.
    let f = floor(24, |i, c| c.refuse_image = (2..=4).contains(&i)).await;
    let gw = Daemon::start(&f.config()).await;
    let id = f
        .start_campaign(
            gw.api,
            &[
                "--canary",
                "2",
                "--wave",
                "50%",
                "--error-threshold",
                "20",
                "--min-executed",
                "3",
            ],
        )
        .await;
    // Paused, and what had started before the pause has ended.
    let c = campaign_until(gw.api, &id, "the pause", |c| {
        c["state"] == "paused" && c["counts"]["running"] == 0
    })
    .await;
    let reason = c["pause_reason"].as_str().unwrap();
    assert!(
        reason.contains("error threshold: 3 of 11 leaves in wave 1 failed"),
        "{reason}"
    );
    for i in 2..=4 {
        let m = member(&c, &name(i));
        assert_eq!(m["state"], "failed", "{m}");
        assert_eq!(m["counted"], true, "a device failure counts: {m}");
        assert!(m["reason"].as_str().unwrap().contains("refused"), "{m}");
    }
    // The pause held everything not started back: untouched, and nothing
    // told to the platform about them.
    let mut pending = 0;
    for i in 5..24 {
        if member(&c, &name(i))["state"] == "pending" {
            pending += 1;
            assert!(
                f.sims[i].handle().transfers().is_empty(),
                "{} was touched",
                name(i)
            );
            assert!(
                f.probe.on(&topic("progress", &name(i))).is_empty(),
                "{}",
                name(i)
            );
        }
    }
    assert!(pending >= 15, "the pause came late: {c:#}");
    let succeeded = c["counts"]["succeeded"].as_u64().unwrap();
    let (code, out, err) = f.cli(gw.api, &["campaigns", &id]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("paused: error threshold"), "{out}");

    // Approve: it goes on.
    let (code, out, err) = f
        .cli(
            gw.api,
            &[
                "campaign",
                "approve",
                &id,
                "--reason",
                "three bad units known",
            ],
        )
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("running"), "{out}");
    campaign_until(gw.api, &id, "a success after the approval", |c| {
        c["counts"]["succeeded"].as_u64() > Some(succeeded)
    })
    .await;
    // Stop: what runs finishes, nothing new starts.
    let (code, out, err) = f.cli(gw.api, &["campaign", "stop", &id]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let c = campaign_until(gw.api, &id, "the running ones to end", |c| {
        c["state"] == "stopped" && c["counts"]["running"] == 0
    })
    .await;
    let counts = &c["counts"];
    assert_eq!(counts["failed"], 3, "no false failures: {counts}");
    let not_started = counts["not_started"].as_u64().unwrap();
    assert!(not_started >= 6, "the stop came late: {counts}");
    for (i, sim) in f.sims.iter().enumerate() {
        let m = member(&c, &name(i));
        match m["state"].as_str().unwrap() {
            "succeeded" => assert_eq!(sim.handle().version(), "2.0.0"),
            "failed" => assert_eq!(sim.handle().version(), "1.0.0"),
            "not_started" => {
                assert_eq!(sim.handle().version(), "1.0.0");
                assert!(
                    sim.handle().transfers().is_empty(),
                    "{} was touched",
                    name(i)
                );
                // The platform heard nothing about its upgrade.
                assert!(
                    f.probe.on(&topic("progress", &name(i))).is_empty(),
                    "{} reported progress",
                    name(i)
                );
            }
            other => panic!("{} is {other} after the stop", name(i)),
        }
    }
    let transitions: Vec<&str> = c["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reason"].as_str().unwrap())
        .collect();
    assert!(
        transitions.iter().any(|t| t.starts_with("error threshold")),
        "{transitions:?}"
    );
    assert!(
        transitions
            .iter()
            .any(|t| t.contains("three bad units known")),
        "{transitions:?}"
    );
    assert!(
        transitions.iter().any(|t| t.starts_with("stopped")),
        "{transitions:?}"
    );
    // Verbs that the state no longer allows are refused with the reason.
    let (code, _, err) = f.cli(gw.api, &["campaign", "resume", &id]).await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("409") && err.contains("stopped"), "{err}");
    assert_one_at_a_time_per_bus(&f.sims);
    gw.stop().await;
}

/// Acceptance 3: the gateway killed (-9) in the middle of a campaign comes
/// back and goes on where it was: nothing that finished runs again, and
/// the groups' accounting is what it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_resumes_its_campaign_where_it_was() {
    // Six leaves: canary leaf-00; wave 1 leaf-01..03; wave 2 leaf-04, 05.
    // leaf-03's transfer is held half-way: the kill comes then.
    let f = floor(6, |i, c| {
        if i == 3 {
            c.hold_after = Some(3);
        }
    })
    .await;
    let cfg_path = f.data.path().join("otagw.toml");
    let gw = GatewayProcess::start(GATEWAY_BIN, &f.config(), &cfg_path).await;
    let id = f
        .start_campaign(gw.api, &["--canary", "1", "--wave", "50%"])
        .await;
    f.sims[3].handle().holding().await;
    let before = campaign_until(gw.api, &id, "leaf-01 and leaf-02 done", |c| {
        c["counts"]["succeeded"] == 3
    })
    .await;
    assert_eq!(member(&before, "leaf-03")["state"], "running");
    gw.kill().await;
    f.sims[3].handle().release();

    let gw = GatewayProcess::start(GATEWAY_BIN, &f.config_holding(false), &cfg_path).await;
    let (code, out, err) = f.cli(gw.api, &["campaigns", &id, "--follow"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let after = http_get_json(gw.api, &format!("/api/campaigns/{id}")).await;
    assert_eq!(after["state"], "finished", "{after:#}");
    let counts: Vec<(u64, u64)> = after["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["counts"]["total"].as_u64().unwrap(),
                g["counts"]["succeeded"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts, [(1, 1), (3, 3), (2, 2)], "{after:#}");
    for (i, sim) in f.sims.iter().enumerate() {
        assert_eq!(sim.handle().version(), "2.0.0", "{}", name(i));
        assert_eq!(
            sim.handle().images_received(),
            1,
            "{} flashed twice",
            name(i)
        );
        assert_eq!(member(&after, &name(i))["attempts"], 1, "{}", name(i));
    }
    // What finished before the kill kept its times: it did not run again.
    for i in 0..3 {
        assert_eq!(
            member(&after, &name(i))["ended_ms"],
            member(&before, &name(i))["ended_ms"],
            "{}",
            name(i)
        );
    }
    let opened: Vec<&str> = after["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reason"].as_str().unwrap())
        .filter(|r| r.contains("opened"))
        .collect();
    assert_eq!(opened.len(), 2, "each wave opened once: {opened:?}");
    assert_one_at_a_time_per_bus(&f.sims);
    gw.terminate().await;
}

/// Acceptance 4: bad campaign requests are 4xx with a message, and start
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_campaign_requests_are_refused_and_start_nothing() {
    let f = floor(3, |_, _| {}).await;
    let gw = Daemon::start(&f.config()).await;
    let (url, sha) = f.image();
    let token = f.token();
    let request = |selection: serde_json::Value, plan: serde_json::Value| {
        serde_json::to_vec(&serde_json::json!({
            "version": "2.0.0",
            "image": { "url": url, "sha256": sha, "size": 8192 },
            "selection": selection,
            "plan": plan,
        }))
        .unwrap()
    };
    let ok = request(serde_json::json!({}), serde_json::json!({}));
    // What, the token, the body, the status, what the message says.
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a bad selection",
            Some(&token),
            request(
                serde_json::json!({"from_version": ">=x"}),
                serde_json::json!({}),
            ),
            400,
            "from_version",
        ),
        (
            "a selection of nothing",
            Some(&token),
            request(
                serde_json::json!({"tags": ["line-9"]}),
                serde_json::json!({}),
            ),
            400,
            "matches no leaf",
        ),
        (
            "an unknown family",
            Some(&token),
            request(
                serde_json::json!({"family": "modbus"}),
                serde_json::json!({}),
            ),
            400,
            "unknown family \"modbus\"",
        ),
        (
            "a zero-size wave",
            Some(&token),
            request(serde_json::json!({}), serde_json::json!({"waves": ["0%"]})),
            400,
            "empty group",
        ),
        (
            "an unknown key",
            Some(&token),
            request(
                serde_json::json!({"famly": "xmodem"}),
                serde_json::json!({}),
            ),
            400,
            "famly",
        ),
        ("no token", None, ok.clone(), 401, "needs the API token"),
        (
            "a wrong token",
            Some("0123"),
            ok.clone(),
            403,
            "wrong API token",
        ),
    ];
    for (what, token, body, status, says) in cases {
        let (got, answer) = http_request(gw.api, "POST", "/api/campaigns", token, &body).await;
        assert_eq!(got, status, "{what}: {answer}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{what}: {msg:?} does not say {says:?}");
    }
    // Verbs and uploads need the token too.
    let (got, _) = http_request(gw.api, "POST", "/api/campaigns/c1/stop", None, b"").await;
    assert_eq!(got, 401);
    let (got, _) = http_request(gw.api, "POST", "/api/images", Some("x"), b"abc").await;
    assert_eq!(got, 403);
    // Nothing was started.
    assert_eq!(gw.api_get("/api/campaigns").await, serde_json::json!([]));
    for sim in &f.sims {
        assert!(sim.handle().transfers().is_empty());
    }
    // The CLI says the gateway's reason and exits non-zero.
    let (code, _, err) = f
        .cli(
            gw.api,
            &[
                "upgrade",
                "--image",
                &url,
                "--sha256",
                &sha,
                "--version",
                "2.0.0",
                "--family",
                "modbus",
            ],
        )
        .await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("unknown family \"modbus\""), "{err}");
    let (code, _, err) = f
        .cli(
            gw.api,
            &[
                "upgrade",
                "--image",
                &url,
                "--version",
                "2.0.0",
                "--wave",
                "0",
            ],
        )
        .await;
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("empty group"), "{err}");
    // A wrong token file: 77, and nothing started.
    let wrong = f.data.path().join("wrong-token");
    std::fs::write(&wrong, "0123456789\n").unwrap();
    let out = tokio::process::Command::new(GATEWAY_BIN)
        .args([
            "campaign",
            "stop",
            "c1",
            "--api",
            &format!("http://{}", gw.api),
        ])
        .arg("--token-file")
        .arg(&wrong)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("wrong API token"), "{err}");
    assert_eq!(gw.api_get("/api/campaigns").await, serde_json::json!([]));
    gw.stop().await;
}

/// Acceptance 5: `otagw upgrade --follow` on a terminal (a pty through
/// `script`) shows a bar per leaf; a local image file is uploaded first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_follow_on_a_terminal_shows_a_bar_per_leaf() {
    let f = floor(3, |_, _| {}).await;
    let gw = Daemon::start(&f.config()).await;
    let file = f.data.path().join("fw-2.0.0.bin");
    std::fs::write(&file, versioned_image(8_192, "2.0.0")).unwrap();
    let line = format!(
        "stty cols 100 rows 30; '{GATEWAY_BIN}' upgrade --image '{}' --version 2.0.0 --follow \
         --api http://{} --token-file '{}'",
        file.display(),
        gw.api,
        f.token_file().display()
    );
    let out = tokio::process::Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("uploaded"), "{text}");
    for i in 0..3 {
        let bar = text
            .lines()
            .find(|l| l.contains(&format!("{LEAF_PK}/{}", name(i))) && l.contains("100%"))
            .unwrap_or_else(|| panic!("no finished bar for {}:\n{text}", name(i)));
        assert!(bar.contains("[###"), "{bar}");
        assert!(bar.contains("runs 2.0.0"), "{bar}");
    }
    assert!(text.contains("3 of 3 succeeded"), "{text}");
    for sim in &f.sims {
        assert_eq!(sim.handle().version(), "2.0.0");
    }
    gw.stop().await;
}

/// Item 2: without a campaign, platform notices for three leaves of one
/// bus (`[[bus]] max_parallel = 1`, each leaf on a port of its own) run
/// one after the other, while `[jobs] max_parallel` would allow all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_notices_for_one_bus_take_turns() {
    let f = floor(3, |_, _| {}).await;
    let config = f
        .config()
        .replace("bus = \"rs485-1\"", "bus = \"rs485-0\"")
        .replace("bus = \"rs485-2\"", "bus = \"rs485-0\"");
    let gw = Daemon::start(&config).await;
    let img = versioned_image(8_192, "2.0.0");
    let url = f.files.add("fw-2.0.0.bin", img.clone());
    for i in 0..3 {
        f.probe
            .publish(
                &topic("upgrade", &name(i)),
                notice(10 + i as u64, "2.0.0", &url, &img),
            )
            .await;
    }
    f.probe
        .wait_until(LIMIT, "informs of 2.0.0", |m| {
            (0..3).all(|i| has_inform(m, &topic("inform", &name(i)), "2.0.0"))
        })
        .await;
    let mut spans: Vec<(Instant, Instant)> = f
        .sims
        .iter()
        .flat_map(|s| s.handle().transfers())
        .map(|(a, b)| (a, b.unwrap()))
        .collect();
    spans.sort();
    assert_eq!(spans.len(), 3);
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two leaves of rs485-0 flashed at once");
    }
    let devices = gw.api_get("/api/devices").await;
    assert!(
        devices
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["bus"] == "rs485-0"),
        "{devices:#}"
    );
    gw.stop().await;
}

/// Acceptance 3, the narrowest window: the gateway dies right after a
/// member's job end is persisted, before the campaign hears of it (the
/// `job-ended-unpublished` fault point aborts the process there). After
/// the restart the campaign takes the end from the journal: the leaf is
/// not flashed again, and its group's account is what the job said (here a
/// canary whose bootloader refused the image: the campaign waits for an
/// approval before the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_job_end_and_its_campaign_runs_nothing_twice() {
    let f = floor(3, |i, c| c.refuse_image = i == 0).await;
    let cfg_path = f.data.path().join("otagw.toml");
    let gw = GatewayProcess::start_with_env(
        GATEWAY_BIN,
        &f.config(),
        &cfg_path,
        &[("FAILPOINTS", "job-ended-unpublished=1*return")],
    )
    .await;
    let id = f.start_campaign(gw.api, &["--canary", "1"]).await;
    let status = gw.exited(LIMIT).await;
    assert!(
        !status.success(),
        "the fault point ends the gateway: {status}"
    );
    let tries = f.sims[0].handle().transfers().len();
    assert!(tries > 0, "the canary was tried");

    let gw = GatewayProcess::start(GATEWAY_BIN, &f.config(), &cfg_path).await;
    let c = campaign_until(gw.api, &id, "the approval pause", |c| {
        c["state"] == "paused"
    })
    .await;
    let canary = member(&c, &name(0));
    assert_eq!(canary["state"], "failed", "{c:#}");
    assert_eq!(canary["attempts"], 1, "{c:#}");
    assert_eq!(
        f.sims[0].handle().transfers().len(),
        tries,
        "the canary ran twice"
    );
    assert!(
        c["pause_reason"]
            .as_str()
            .unwrap()
            .contains("below its success threshold"),
        "{c:#}"
    );
    for i in 1..3 {
        assert_eq!(member(&c, &name(i))["state"], "pending");
        assert!(f.sims[i].handle().transfers().is_empty());
    }
    // The platform heard the canary's failure (published again after the
    // restart).
    f.probe
        .wait_until(LIMIT, "the canary's -4", |m| {
            has_step(m, &topic("progress", &name(0)), "-4")
        })
        .await;
    let (code, out, err) = f.cli(gw.api, &["campaign", "approve", &id]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = f.cli(gw.api, &["campaigns", &id, "--follow"]).await;
    assert_eq!(code, Some(1), "not every leaf succeeded: {out}\n{err}");
    assert!(out.contains("2 of 3 succeeded, 1 failed"), "{out}");
    assert!(
        out.contains(&format!("{LEAF_PK}/leaf-00 failed: ")),
        "{out}"
    );
    for i in 1..3 {
        assert_eq!(f.sims[i].handle().version(), "2.0.0");
    }
    gw.terminate().await;
}

/// Item 3: under `[jobs] policy = "plan"`, the platform's notices for one
/// package collect into a campaign that runs the configured plan (a canary,
/// then an approval before the rest). Held leaves tell the platform nothing
/// until they start; then each reports its own progress and version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_notices_under_a_plan_wait_for_the_canary_and_an_approval() {
    let f = floor(4, |_, _| {}).await;
    let config = format!(
        "{}[jobs]\npolicy = \"plan\"\n\n[jobs.plan]\ncanary = \"1\"\nwaves = [\"100%\"]\n\
         approve = true\ncollect = \"1s\"\n",
        f.config()
    );
    let gw = Daemon::start(&config).await;
    let (url, img) = f.notify_all(20).await;
    // A redelivery of one of them joins nothing twice.
    f.probe
        .publish(&topic("upgrade", &name(1)), notice(21, "2.0.0", &url, &img))
        .await;
    let c = first_paused(gw.api).await;
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(c["origin"], "platform");
    assert_eq!(c["counts"]["total"], 4, "{c:#}");
    assert!(
        c["pause_reason"].as_str().unwrap().contains("approve"),
        "{c:#}"
    );
    let canary = &c["groups"][0]["members"][0];
    assert_eq!(canary["state"], "succeeded", "{c:#}");
    let canary_dn = canary["device"].as_str().unwrap()[LEAF_PK.len() + 1..].to_string();
    f.probe
        .wait_until(LIMIT, "the canary's inform of 2.0.0", |m| {
            has_inform(m, &topic("inform", &canary_dn), "2.0.0")
        })
        .await;
    for i in (0..4).filter(|i| name(*i) != canary_dn) {
        assert!(f.sims[i].handle().transfers().is_empty(), "{}", name(i));
        assert!(
            f.probe.on(&topic("progress", &name(i))).is_empty(),
            "{} reported before it started",
            name(i)
        );
    }
    let (code, out, err) = f.cli(gw.api, &["campaign", "approve", &id]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = f.cli(gw.api, &["campaigns", &id, "--follow"]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    f.probe
        .wait_until(LIMIT, "every leaf's progress and inform", |m| {
            (0..4).all(|i| {
                has_step(m, &topic("progress", &name(i)), "100")
                    && has_inform(m, &topic("inform", &name(i)), "2.0.0")
            })
        })
        .await;
    for sim in &f.sims {
        assert_eq!(sim.handle().images_received(), 1);
    }
    gw.stop().await;
}

/// Item 5: the API over HTTPS (`[api] tls_cert`, `tls_key`): `otagw
/// upgrade` runs a campaign through it with the CA given; without the CA,
/// or over plain HTTP, nothing gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_https_runs_a_campaign_and_refuses_what_it_cannot_trust() {
    let f = floor(2, |_, _| {}).await;
    let certs = tempfile::tempdir().unwrap();
    otagw_testkit::make_certs(certs.path());
    let c = |n: &str| certs.path().join(n).display().to_string();
    let config = f.config().replace(
        "[api]\nlisten = \"127.0.0.1:0\"\n",
        &format!(
            "[api]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            c("server.pem"),
            c("server.key")
        ),
    );
    assert!(config.contains("tls_cert"), "{config}");
    let gw = Daemon::start(&config).await;
    let (url, sha) = f.image();
    let https = format!("https://{}", gw.api);
    let otagw = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(GATEWAY_BIN);
        cmd.args(args)
            .arg("--token-file")
            .arg(f.token_file())
            .env_remove("RUST_LOG");
        cmd
    };
    let out = otagw(&[
        "upgrade",
        "--api",
        &https,
        "--ca-file",
        &c("ca.pem"),
        "--image",
        &url,
        "--sha256",
        &sha,
        "--version",
        "2.0.0",
        "--follow",
    ])
    .output()
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 of 2 succeeded"), "{text}");
    // Without the CA the certificate is not trusted; plain HTTP is no API.
    for args in [
        vec!["campaigns", "--api", &https],
        vec!["campaigns", "--api", &format!("http://{}", gw.api)],
    ] {
        let out = otagw(&args).output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{args:?}: {err}");
        assert!(err.contains("cannot reach the gateway"), "{err}");
    }
    // `otagw status` reaches it too.
    let out = tokio::process::Command::new(GATEWAY_BIN)
        .args(["status", "--api", &https, "--ca-file", &c("ca.pem")])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("leaf-00") && table.contains("2.0.0"),
        "{table}"
    );
    gw.stop().await;
}

/// Bad input: a local campaign's image URL that answers 403 fails its
/// leaves -2 (download trouble, not counted against the error threshold)
/// instead of waiting for a fresh URL no platform will send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_image_url_fails_the_leaves_instead_of_waiting() {
    let f = floor(2, |_, _| {}).await;
    let gw = Daemon::start(&f.config()).await;
    // A signed URL that expired: the server refuses it from the start. The
    // campaign is made through the API with the digest and size known, as
    // `otagw upgrade --sha256` would when the server answered HEAD.
    let (url, sha) = f.image();
    f.files.fault("fw-2.0.0.bin", Fault::Status(403));
    let body = serde_json::to_vec(&serde_json::json!({
        "version": "2.0.0",
        "image": { "url": url, "sha256": sha, "size": 8192 },
        "selection": {},
        "plan": { "error_threshold": 0 },
    }))
    .unwrap();
    let (status, answer) =
        http_request(gw.api, "POST", "/api/campaigns", Some(&f.token()), &body).await;
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    let (code, out, err) = f.cli(gw.api, &["campaigns", &id, "--follow"]).await;
    assert_eq!(code, Some(1), "not every leaf succeeded: {out}\n{err}");
    assert!(out.contains("0 of 2 succeeded, 2 failed"), "{out}");
    let c = http_get_json(gw.api, &format!("/api/campaigns/{id}")).await;
    assert_eq!(
        c["state"], "finished",
        "no error pause for download trouble: {c:#}"
    );
    for m in members(&c) {
        assert_eq!(m["counted"], false, "{m}");
        assert!(m["reason"].as_str().unwrap().starts_with("-2"), "{m}");
    }
    for i in 0..2 {
        f.probe
            .wait_until(LIMIT, "-2 reported", |m| {
                has_step(m, &topic("progress", &name(i)), "-2")
            })
            .await;
    }
    gw.stop().await;
}

/// A platform campaign stopped by the operator: the leaves it never started
/// stay untouched, and the platform hears, once each, that the gateway
/// declined them (-1 saying so), so its tasks end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_platform_campaign_tells_the_platform_which_leaves_were_not_started() {
    let f = floor(3, |_, _| {}).await;
    let config = format!(
        "{}[jobs]\npolicy = \"plan\"\n\n[jobs.plan]\ncanary = \"1\"\napprove = true\n\
         collect = \"1s\"\n",
        f.config()
    );
    let gw = Daemon::start(&config).await;
    f.notify_all(30).await;
    let id = first_paused(gw.api).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, err) = f
        .cli(
            gw.api,
            &["campaign", "stop", &id, "--reason", "wrong batch"],
        )
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let c = http_get_json(gw.api, &format!("/api/campaigns/{id}")).await;
    let held: Vec<String> = members(&c)
        .into_iter()
        .filter(|m| m["state"] == "not_started")
        .map(|m| m["device"].as_str().unwrap()[LEAF_PK.len() + 1..].to_string())
        .collect();
    assert_eq!(held.len(), 2, "{c:#}");
    for dn in &held {
        f.probe
            .wait_until(LIMIT, "the decline", |m| {
                m.iter().any(|x| {
                    x.topic == topic("progress", dn)
                        && serde_json::from_slice::<serde_json::Value>(&x.payload).is_ok_and(|v| {
                            v["params"]["step"] == "-1"
                                && v["params"]["desc"].as_str().is_some_and(|d| {
                                    d.contains("not started") && d.contains("wrong batch")
                                })
                        })
                })
            })
            .await;
        let i: usize = dn[5..].parse().unwrap();
        assert!(
            f.sims[i].handle().transfers().is_empty(),
            "{dn} was touched"
        );
        assert_eq!(f.probe.on(&topic("progress", dn)).len(), 1, "once: {dn}");
    }
    gw.stop().await;
}
