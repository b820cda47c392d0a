//! Issue 18: the operator's console. The dashboard in a real browser
//! (Debian's headless Chromium through its chromedriver, over WebDriver),
//! `/metrics` checked by Prometheus's own `promtool`, the access rules over
//! raw HTTP. A real broker (mosquitto) is the platform, images come from a
//! real HTTP server, XMODEM leaves sit on real pseudo-terminals.

use std::process::Stdio;
use std::time::{Duration, Instant};

use otagw_e2e::*;
use sha2::Digest as _;

/// Upper bound for anything the gateway does here (never a synchronisation).
const LIMIT: Duration = Duration::from_secs(120);

fn name(i: usize) -> String {
    format!("leaf-{i:02}")
}

fn topic(kind: &str, dn: &str) -> String {
    format!("/ota/device/{kind}/{LEAF_PK}/{dn}")
}

fn key(i: usize) -> String {
    format!("{LEAF_PK}/{}#default", name(i))
}

const LEAF_SECRET: &str = "leaf-secret-do-not-show";
const UPSTREAM_PASSWORD: &str = "upstream-password-do-not-show";

struct Floor {
    broker: Mosquitto,
    probe: MqttProbe,
    files: FileServer,
    plugins: PluginsDir,
    data: tempfile::TempDir,
    sims: Vec<PtySim>,
}

/// `n` XMODEM leaves at 1.0.0; `tweak(i, config)` changes one simulator.
async fn floor(n: usize, tweak: impl Fn(usize, &mut XmodemSimConfig)) -> Floor {
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let sims = (0..n)
        .map(|i| {
            let mut c = xmodem_device();
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
    /// The config, with secrets the API must never show.
    fn config(&self) -> String {
        let leaves: Vec<LeafSpec> = self
            .sims
            .iter()
            .enumerate()
            .map(|(i, sim)| {
                let mut l = LeafSpec::xmodem(&name(i), &sim.url());
                l.extra = format!("device_secret = \"{LEAF_SECRET}\"\n");
                l
            })
            .collect();
        gateway_config(
            self.data.path(),
            self.plugins.path(),
            Some(&self.broker.url()),
            &leaves,
        )
        .replace(
            "auth = \"none\"\n",
            &format!(
                "auth = \"password\"\nusername = \"gw\"\npassword = \"{UPSTREAM_PASSWORD}\"\n"
            ),
        )
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.data.path().join("api-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    async fn push(&self, i: usize, id: u64, version: &str, image: &[u8], file: &str) {
        let url = self.files.add(file, image.to_vec());
        self.probe
            .publish(
                &topic("upgrade", &name(i)),
                notice(id, version, &url, image),
            )
            .await;
    }
}

/// A raw HTTP/1.1 exchange with any headers (a `Host` among them replaces
/// the address): status, headers (lowercase names), body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// `/api/events` opened with the header line `auth`.
async fn sse_open(addr: std::net::SocketAddr, auth: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s
}

/// The first batch of `/api/events` (the whole state), read until the
/// `cache` event that ends it.
async fn sse_first_batch(addr: std::net::SocketAddr, bearer: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = sse_open(addr, &format!("Authorization: {bearer}")).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(LIMIT, async {
        while !String::from_utf8_lossy(&got).contains("event: cache") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended early");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first batch within the limit");
    String::from_utf8_lossy(&got).into_owned()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Poll `check` until it gives a value (at most `LIMIT`).
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Headless Chromium driven through chromedriver; both die with it.
struct Chrome {
    client: fantoccini::Client,
    _procs: Procs,
}

/// chromedriver and the browser it starts, killed when dropped (also when
/// the session never came up).
struct Procs {
    driver: tokio::process::Child,
    profile: tempfile::TempDir,
}

impl Chrome {
    async fn start() -> Chrome {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver: install Debian's chromium and chromium-driver (.ci/run does)");
        until("chromedriver listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        })
        .await;
        let procs = Procs {
            driver,
            profile: tempfile::tempdir().unwrap(),
        };
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", procs.profile.path().display()),
                ]
            }
        });
        let client = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(caps.as_object().unwrap().clone())
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
        Chrome {
            client,
            _procs: procs,
        }
    }

    /// Run `js` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, js: &str, args: Vec<serde_json::Value>) -> serde_json::Value {
        self.client.execute(js, args).await.expect("script runs")
    }

    /// A device row as the page shows it: version, state, progress, error.
    async fn row(&self, key: &str) -> serde_json::Value {
        self.js(
            "const r = document.querySelector(`table#devices tr[data-key=\"${arguments[0]}\"]`);
             if (!r) return null;
             const t = (c) => { const e = r.querySelector(c); return e ? e.textContent.trim() : null; };
             const p = r.querySelector('progress');
             return { version: t('td.version'), state: t('td.state'), error: t('td.error'),
                      progress: p ? p.value : null };",
            vec![key.into()],
        )
        .await
    }

    /// The chart's count for a version (0 when it has no segment).
    async fn chart(&self, version: &str) -> u64 {
        self.js(
            "let n = 0;
             for (const e of document.querySelectorAll(`svg#version-chart [data-version=\"${arguments[0]}\"][data-count]`))
                 n += Number(e.getAttribute('data-count'));
             return n;",
            vec![version.into()],
        )
        .await
        .as_u64()
        .unwrap_or(0)
    }

    async fn click(&self, css: &str) {
        self.client
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            vec![css.into()],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // chromedriver's process group, and every browser process of this
        // profile (the browser may set up groups of its own).
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(format!("user-data-dir={}", self.profile.path().display()))
            .status();
    }
}

/// Acceptance 1: a real browser sees a leaf go through its upgrade live,
/// the version chart change, a failure's reason, and a change refused
/// without the token, then allowed after the login; the page's weight and
/// first paint are measured (BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_an_upgrade_live_in_a_real_browser() {
    // leaf-00 flashes slowly enough to be seen mid-way; leaf-02's
    // bootloader refuses every image.
    let f = floor(3, |i, c| match i {
        0 => c.line_rate = Some(19_200),
        2 => c.refuse_image = true,
        _ => {}
    })
    .await;
    let gw = Daemon::start(&f.config()).await;
    let base = format!("http://{}", gw.api);
    let chrome = Chrome::start().await;
    chrome.client.goto(&format!("{base}/")).await.unwrap();
    // What a first visit weighs, and when it first paints.
    let load = until("the page loaded", || async {
        let v = chrome
            .js(
                "const n = performance.getEntriesByType('navigation')[0];
                 if (!n || n.loadEventEnd === 0) return null;
                 const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                 let bytes = n.transferSize;
                 for (const r of performance.getEntriesByType('resource'))
                     if (!r.name.includes('/api/events')) bytes += r.transferSize;
                 return { bytes, fcp: fcp ? fcp.startTime : null };",
                vec![],
            )
            .await;
        (!v.is_null() && !v["fcp"].is_null()).then_some(v)
    })
    .await;
    println!(
        "dashboard first visit: {} bytes transferred, first contentful paint at {:.0} ms",
        load["bytes"], load["fcp"]
    );
    assert!(
        load["bytes"].as_u64().unwrap() < 200_000,
        "the page must weigh under 200 KB: {load}"
    );
    // The overview's chart: three leaves on 1.0.0.
    until("the chart shows 3 × 1.0.0", || async {
        (chrome.chart("1.0.0").await == 3).then_some(())
    })
    .await;
    assert_eq!(chrome.chart("2.0.0").await, 0);
    chrome
        .js("window.__sameDocument = 42; return null;", vec![])
        .await;
    chrome.click("a[href=\"#/devices\"]").await;
    until("three device rows", || async {
        let n = chrome
            .js(
                "return document.querySelectorAll('table#devices tr[data-key]').length;",
                vec![],
            )
            .await;
        (n == 3).then_some(())
    })
    .await;
    assert_eq!(chrome.row(&key(0)).await["version"], "1.0.0");

    let img = versioned_image(8_192, "2.0.0");
    f.push(0, 1, "2.0.0", &img, "fw-2.0.0.bin").await;
    f.push(2, 2, "2.0.0", &img, "fw-2.0.0.bin").await;
    // leaf-00's row goes through its progress to the new version.
    let mut seen_progress = Vec::new();
    let mut shot = std::env::var("OTAGW_DASHBOARD_SCREENSHOT").ok();
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = chrome.row(&key(0)).await;
        if r["version"] == "2.0.0" {
            break;
        }
        if let Some(p) = r["progress"].as_f64()
            && r["state"].as_str().is_some_and(|s| s.contains("flashing"))
        {
            seen_progress.push(p);
            // `OTAGW_DASHBOARD_SCREENSHOT=docs/dashboard.png`: the README's picture.
            if p >= 50.0
                && let Some(path) = shot.take()
            {
                let png = chrome.client.screenshot().await.unwrap();
                std::fs::write(path, png).unwrap();
            }
        }
        assert!(Instant::now() < deadline, "leaf-00 never showed 2.0.0: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen_progress.iter().any(|p| *p > 0.0 && *p < 100.0),
        "the row showed no progress while flashing: {seen_progress:?}"
    );
    // leaf-02's failure, with its reason.
    let failed = until("leaf-02 failed with a reason", || async {
        let r = chrome.row(&key(2)).await;
        (r["state"].as_str().is_some_and(|s| s.contains("failed"))
            && r["error"].as_str().is_some_and(|e| e.len() > 10))
        .then_some(r)
    })
    .await;
    let api_error = gw.api_get("/api/devices").await;
    let reason = api_error
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_name"] == name(2))
        .unwrap()["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    let start: String = reason.chars().take(20).collect();
    assert!(
        failed["error"].as_str().unwrap().contains(&start),
        "{failed} vs {reason}"
    );
    // Back to the overview: the chart moved, and nothing was reloaded.
    chrome.click("a[href=\"#/\"]").await;
    until("the chart shows 1 × 2.0.0", || async {
        (chrome.chart("2.0.0").await == 1 && chrome.chart("1.0.0").await == 2).then_some(())
    })
    .await;
    assert_eq!(
        chrome.js("return window.__sameDocument;", vec![]).await,
        42,
        "the page was reloaded"
    );

    // A campaign whose download stalls: it stays running while the
    // operator acts on it.
    let slow = versioned_image(8_192, "2.1.0");
    let url = f.files.add("fw-2.1.0.bin", slow.clone());
    f.files.fault("fw-2.1.0.bin", Fault::StallAfter(1024));
    let req = serde_json::json!({
        "version": "2.1.0",
        "image": { "url": url, "sha256": hex::encode(sha2::Sha256::digest(&slow)), "size": 8192 },
        "selection": { "devices": [name(1)] },
        "plan": {},
    });
    let (status, c) = http_request(
        gw.api,
        "POST",
        "/api/campaigns",
        Some(&f.token()),
        req.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    chrome.click("a[href=\"#/jobs\"]").await;
    let pause = format!("[data-campaign=\"{id}\"] button[data-verb=\"pause\"]");
    until("the campaign's pause button", || async {
        let n = chrome
            .js(
                "return document.querySelectorAll(arguments[0]).length;",
                vec![pause.clone().into()],
            )
            .await;
        (n == 1).then_some(())
    })
    .await;
    // Without the token: refused, and the page says why.
    chrome.click(&pause).await;
    let said = until("the refusal shown", || async {
        let t = chrome.text("#notice").await;
        t.contains("token").then_some(t)
    })
    .await;
    assert!(said.contains("token"), "{said}");
    assert_eq!(
        gw.api_get(&format!("/api/campaigns/{id}")).await["state"],
        "running"
    );
    // Logged in with the token, the same click pauses it.
    let input = until("the login form", || async {
        chrome
            .client
            .find(fantoccini::Locator::Css("form#login input[name=token]"))
            .await
            .ok()
    })
    .await;
    // The token, then Enter (WebDriver's key U+E007) submits the form.
    input
        .send_keys(&format!("{}\u{E007}", f.token()))
        .await
        .unwrap();
    until("logged in", || async {
        let s = chrome
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 fetch('/api/session').then(r => r.json()).then(done);",
                vec![],
            )
            .await
            .unwrap();
        (s["authenticated"] == true).then_some(())
    })
    .await;
    until("paused from the page", || async {
        if chrome
            .js(
                "return document.querySelectorAll(arguments[0]).length;",
                vec![pause.clone().into()],
            )
            .await
            == 1
        {
            let _ = chrome
                .client
                .find(fantoccini::Locator::Css(&pause))
                .await
                .ok()?
                .click()
                .await;
        }
        (gw.api_get(&format!("/api/campaigns/{id}")).await["state"] == "paused").then_some(())
    })
    .await;
    until("the page shows it paused", || async {
        chrome
            .text(&format!("[data-campaign=\"{id}\"]"))
            .await
            .contains("paused")
            .then_some(())
    })
    .await;
    // The gateway stops with the page still following its events: the
    // stream ends, it does not hold the shutdown.
    tokio::time::timeout(LIMIT, gw.stop())
        .await
        .expect("the gateway stops while a dashboard is open");
    chrome.close().await;
    drop(f);
}

/// Acceptance 2: `/metrics` passes `promtool check metrics`, and its
/// counters are the jobs this test ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_the_jobs_that_ran() {
    let f = floor(2, |i, c| c.refuse_image = i == 1).await;
    let gw = Daemon::start(&f.config()).await;
    let img = versioned_image(8_192, "2.0.0");
    // One after the other: the second finds the image in the cache.
    f.push(0, 1, "2.0.0", &img, "fw-2.0.0.bin").await;
    f.probe
        .wait_until(LIMIT, "leaf-00 done", |m| {
            has_inform(m, &topic("inform", &name(0)), "2.0.0")
        })
        .await;
    f.push(1, 2, "2.0.0", &img, "fw-2.0.0.bin").await;
    let step = until("leaf-01 failed", || async {
        let d = gw.api_get("/api/jobs").await;
        d.as_array()
            .unwrap()
            .iter()
            .find(|j| j["device_name"] == name(1) && j["state"] == "failed")
            .map(|j| j["step"].as_i64().unwrap())
    })
    .await;
    // The counters follow the job's end (its report goes out first).
    let (status, headers, text) = until("both ends counted", || async {
        let r = http(gw.api, "GET", "/metrics", &[], b"").await;
        r.2.lines()
            .filter(|l| l.starts_with("otagw_jobs_ended_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
            .eq(&2.0)
            .then_some(r)
    })
    .await;
    assert_eq!(status, 200);
    assert!(
        header(&headers, "content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{headers:?}"
    );
    // Prometheus's own checker (Debian's prometheus package).
    let mut check = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool: install Debian's prometheus package (.ci/run does)");
    use tokio::io::AsyncWriteExt;
    let mut stdin = check.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = check.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the exposition format parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let failed_as = match step {
        -3 => "verify_failed",
        -4 => "flash_failed",
        -2 => "download_failed",
        _ => "failed",
    };
    let x = ("family", "xmodem");
    assert_eq!(value("otagw_job_runs_total", &[x]), 2.0, "{text}");
    assert_eq!(
        value("otagw_jobs_ended_total", &[x, ("outcome", "succeeded")]),
        1.0
    );
    assert_eq!(
        value("otagw_jobs_ended_total", &[x, ("outcome", failed_as)]),
        1.0,
        "{text}"
    );
    assert_eq!(value("otagw_jobs_ended_total", &[x]), 2.0);
    assert_eq!(value("otagw_download_bytes_total", &[]), 8192.0);
    assert_eq!(value("otagw_cache_misses_total", &[]), 1.0);
    assert_eq!(value("otagw_cache_hits_total", &[]), 1.0);
    assert_eq!(value("otagw_cache_bytes", &[]), 8192.0);
    assert_eq!(value("otagw_leaves", &[x, ("state", "succeeded")]), 1.0);
    assert_eq!(value("otagw_leaves", &[x, ("state", "failed")]), 1.0);
    assert_eq!(value("otagw_upstream_connected", &[]), 1.0);
    assert_eq!(value("otagw_plugins", &[("status", "loaded")]), 1.0);
    // The histograms: one successful flash of 8 KiB, one failed; a plugin
    // per job.
    let hist = |name: &str, outcome: Option<&str>| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.get("family") == Some("xmodem")
                    && s.labels.get("outcome") == outcome
            })
            .and_then(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => {
                    Some(h.iter().map(|c| c.count).fold(0.0, f64::max))
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name}: {text}"))
    };
    let ok = Some("succeeded");
    assert_eq!(hist("otagw_flash_duration_seconds", ok), 1.0);
    assert_eq!(hist("otagw_flash_duration_seconds", Some("failed")), 1.0);
    assert_eq!(hist("otagw_flash_image_bytes", None), 1.0);
    assert!(hist("otagw_plugin_instantiate_seconds", None) >= 2.0);
    gw.stop().await;
}

/// Acceptance (auth): beyond loopback every view needs the token or a
/// login; a login is a cookie, and changes through it need the session's
/// CSRF token from this origin; health answers without any; nothing secret
/// is ever in an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_every_view_needs_the_token_and_nothing_secret_is_shown() {
    let f = floor(1, |_, _| {}).await;
    let config = f.config().replace(
        "[api]\nlisten = \"127.0.0.1:0\"",
        "[api]\nlisten = \"0.0.0.0:0\"",
    );
    assert!(config.contains("0.0.0.0:0"));
    let gw = Daemon::start(&config).await;
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], gw.api.port()));
    let token = f.token();
    let bearer = format!("Bearer {token}");
    // Health for supervisors: no token.
    let (status, _, body) = http(api, "GET", "/healthz", &[], b"").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    until("ready", || async {
        let (status, _, body) = http(api, "GET", "/readyz", &[], b"").await;
        (status == 200).then_some(body)
    })
    .await;
    // The page itself holds no data: it loads, under its CSP.
    let (status, headers, page) = http(api, "GET", "/", &[], b"").await;
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "{page}");
    assert!(
        header(&headers, "content-security-policy")
            .is_some_and(|c| c.contains("script-src 'self'")),
        "{headers:?}"
    );
    // Everything with data: 401 without the token, 200 with it.
    let views = [
        "/api/gateway",
        "/api/overview",
        "/api/devices",
        "/api/devices/a1LeafPK/leaf-00/history",
        "/api/jobs",
        "/api/plugins",
        "/api/cache",
        "/api/versions",
        "/api/campaigns",
        "/metrics",
    ];
    for v in views {
        let (status, _, body) = http(api, "GET", v, &[], b"").await;
        assert_eq!(status, 401, "{v}: {body}");
        assert!(body.contains("token_file"), "{v}: {body}");
        let (status, _, body) = http(api, "GET", v, &[("Authorization", &bearer)], b"").await;
        assert_eq!(status, 200, "{v}: {body}");
        for secret in [LEAF_SECRET, UPSTREAM_PASSWORD, token.as_str()] {
            assert!(!body.contains(secret), "{v} shows a secret: {body}");
        }
    }
    let (status, _, _) = http(api, "GET", "/api/events", &[], b"").await;
    assert_eq!(status, 401);
    // The event stream's first batch (the whole state) and the readiness
    // details hold nothing secret either.
    let first = sse_first_batch(api, &bearer).await;
    assert!(first.contains("event: devices"), "{first}");
    let (_, _, ready) = http(api, "GET", "/readyz", &[("Authorization", &bearer)], b"").await;
    for secret in [LEAF_SECRET, UPSTREAM_PASSWORD, token.as_str()] {
        assert!(!first.contains(secret), "the events show a secret");
        assert!(!ready.contains(secret), "/readyz shows a secret");
    }
    // A login: JSON only, the right token only.
    let json = ("Content-Type", "application/json");
    let login = |t: &str| serde_json::json!({ "token": t }).to_string();
    let (status, _, _) = http(api, "POST", "/api/login", &[json], login("nope").as_bytes()).await;
    assert_eq!(status, 403);
    let (status, _, _) = http(
        api,
        "POST",
        "/api/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        format!("token={token}").as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "a cross-site form cannot log in");
    let (status, headers, _) =
        http(api, "POST", "/api/login", &[json], login(&token).as_bytes()).await;
    assert_eq!(status, 204);
    let set = header(&headers, "set-cookie").unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let with_cookie = ("Cookie", cookie.as_str());
    let (status, _, body) = http(api, "GET", "/api/devices", &[with_cookie], b"").await;
    assert_eq!(status, 200, "{body}");
    let (_, _, body) = http(api, "GET", "/api/session", &[with_cookie], b"").await;
    let session: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(session["authenticated"], true);
    assert_eq!(session["reads_need_login"], true);
    let csrf = session["csrf"].as_str().unwrap().to_string();
    assert!(!body.contains(&token));
    // A change through the cookie: refused without the CSRF token or from
    // another origin; let through (to a 404: no such campaign) with both.
    let verb = "/api/campaigns/c9/pause";
    let (status, _, _) = http(api, "POST", verb, &[with_cookie], b"").await;
    assert_eq!(status, 403);
    let origin = format!("http://{api}");
    let (status, _, _) = http(
        api,
        "POST",
        verb,
        &[
            with_cookie,
            ("X-Otagw-Csrf", &csrf),
            ("Origin", "http://evil.example"),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, body) = http(
        api,
        "POST",
        verb,
        &[with_cookie, ("X-Otagw-Csrf", &csrf), ("Origin", &origin)],
        b"",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no campaign c9"), "{body}");
    // After the logout the cookie is worth nothing, and an event stream it
    // opened ends.
    let mut stream = sse_open(api, &format!("Cookie: {cookie}")).await;
    {
        // Under way first: its answer began with the state.
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("event: reset") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the stream was refused: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    }
    let (status, _, _) = http(api, "POST", "/api/logout", &[with_cookie], b"").await;
    assert_eq!(status, 204);
    tokio::time::timeout(LIMIT, async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await
    .expect("the logged-out stream ends");
    let (status, _, _) = http(api, "GET", "/api/devices", &[with_cookie], b"").await;
    assert_eq!(status, 401);
    gw.stop().await;

    // Not ready while the upstream cannot be reached: /readyz says which
    // check fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = f
        .config()
        .replace(&f.broker.url(), &format!("mqtt://127.0.0.1:{port}"));
    let gw = Daemon::start(&config).await;
    // On loopback reads are open, to requests for a loopback name only: a
    // page that re-points its own name at 127.0.0.1 is refused.
    let (status, _, _) = http(gw.api, "GET", "/api/devices", &[], b"").await;
    assert_eq!(status, 200);
    let evil = [("Host", "evil.example:8080")];
    let (status, _, body) = http(gw.api, "GET", "/api/devices", &evil, b"").await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = http(gw.api, "GET", "/readyz", &evil, b"").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        !body.contains("127.0.0.1"),
        "no details for strangers: {body}"
    );
    let (status, _, body) = http(gw.api, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 503, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let upstream = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "upstream")
        .unwrap();
    assert_eq!(upstream["ok"], false, "{r}");
    assert!(
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "plugins" && c["ok"] == true),
        "{r}"
    );
    gw.stop().await;
}
