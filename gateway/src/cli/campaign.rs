//! `otagw upgrade`, `otagw campaigns` and `otagw campaign VERB ID`: rollouts
//! through the running gateway's API, without an MQTT client.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use sha2::Digest as _;

use crate::rollout::{
    CampaignRequest, CampaignView, ImageRequest, PlanSpec, Selection, Size, UploadedImage, Verb,
    VerbRequest,
};

/// Where the gateway's API is and what proves the caller may change things.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The gateway's configuration: the API address and token file default
    /// to its [api] listen and token_file.
    #[arg(long, short, env = "OTAGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// The gateway's API (default: the configuration's [api] listen, else
    /// http://127.0.0.1:8080).
    #[arg(long, env = "OTAGW_API")]
    pub api: Option<String>,
    /// The file holding the API token (default: the configuration's [api]
    /// token_file, else /var/lib/otagw/api-token, the package's).
    #[arg(long, env = "OTAGW_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) of an API served over HTTPS with a
    /// certificate of its own ([api] tls_cert); the system's roots besides.
    #[arg(long, env = "OTAGW_API_CA")]
    pub ca_file: Option<PathBuf>,
}

/// An HTTP client for the gateway's API, trusting `ca_file` besides the
/// system's roots.
pub(crate) fn http_client(ca_file: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    crate::tls::init();
    let mut b = reqwest::Client::builder();
    if let Some(ca) = ca_file {
        let pem =
            std::fs::read(ca).with_context(|| format!("cannot read --ca-file {}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-file {}: not PEM certificates", ca.display()))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    Ok(b.build()?)
}

/// The package's data directory, where the token is without a configuration.
const PACKAGED_TOKEN: &str = "/var/lib/otagw/api-token";

/// A client of one gateway's API.
struct Client {
    base: String,
    token_file: PathBuf,
    http: reqwest::Client,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let cfg = match &self.config {
            Some(p) => Some(crate::config::Config::load(p)?),
            None => None,
        };
        let base = match (&self.api, &cfg) {
            (Some(a), _) => a.clone(),
            (None, Some(c)) => match c.api.listen {
                Some(addr) => {
                    let scheme = if c.api.tls_cert.is_some() {
                        "https"
                    } else {
                        "http"
                    };
                    if addr.ip().is_unspecified() {
                        format!("{scheme}://127.0.0.1:{}", addr.port())
                    } else {
                        format!("{scheme}://{addr}")
                    }
                }
                None => anyhow::bail!(
                    "the configuration has no [api] listen: the gateway has no API to talk to"
                ),
            },
            (None, None) => "http://127.0.0.1:8080".into(),
        };
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let token_file = match (&self.token_file, &cfg) {
            (Some(t), _) => t.clone(),
            (None, Some(c)) => c.api_token_path(),
            (None, None) => PACKAGED_TOKEN.into(),
        };
        Ok(Client {
            base,
            token_file,
            http: http_client(self.ca_file.as_deref())?,
        })
    }
}

impl Client {
    fn token(&self) -> anyhow::Result<String> {
        crate::api::read_token(&self.token_file).with_context(|| {
            format!(
                "cannot read the API token {} (run as root or the otagw user, or pass \
                 --token-file / --config)",
                self.token_file.display()
            )
        })
    }

    fn unreachable(&self, url: &str, e: &reqwest::Error) -> anyhow::Error {
        let why = if e.is_connect() {
            "nothing answers there".to_string()
        } else {
            e.to_string()
        };
        super::Unavailable(format!(
            "cannot reach the gateway at {url} ({why}): is `otagw run` running? Pass its API \
             with --api or --config"
        ))
        .into()
    }

    /// The body of a successful answer, or the API's own error message.
    async fn answer<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        r: Result<reqwest::Response, reqwest::Error>,
    ) -> anyhow::Result<T> {
        let r = r.map_err(|e| self.unreachable(url, &e))?;
        let status = r.status();
        let body = r.bytes().await.map_err(|e| self.unreachable(url, &e))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(super::Refused {
                status: status.as_u16(),
                message: msg,
            }
            .into());
        }
        serde_json::from_slice(&body).with_context(|| format!("{url} answered something else"))
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let r = self.http.get(&url).send().await;
        self.answer(&url, r).await
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        json: bool,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.post(&url).bearer_auth(self.token()?).body(body);
        if json {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
        }
        let r = req.send().await;
        self.answer(&url, r).await
    }
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The image: a file here (uploaded to the gateway) or an http(s) URL
    /// the gateway downloads it from.
    #[arg(long)]
    pub image: String,
    /// The version the image installs (what the leaves report afterwards).
    #[arg(long)]
    pub version: String,
    /// The SHA-256 of an image given by URL (without it, the image is
    /// downloaded here once to compute it).
    #[arg(long)]
    pub sha256: Option<String>,
    /// Only leaves of this family.
    #[arg(long)]
    pub family: Option<String>,
    /// Only leaves with this `[[device]] tags` entry (repeat: all of them).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Only leaves on this bus (`[[bus]]` name, `ble`).
    #[arg(long)]
    pub bus: Option<String>,
    /// Only these leaves: PK/DN, a device name, or a glob ("press-*");
    /// repeat for more.
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Only leaves running this version now: 1.2.0, !1.2.0 (any other) or
    /// a range (">=1.0, <2.0").
    #[arg(long)]
    pub from_version: Option<String>,
    /// Only leaves whose hardware id (or model) read by identify is this.
    #[arg(long)]
    pub model: Option<String>,
    /// The firmware module the image is for.
    #[arg(long, default_value = "default")]
    pub module: String,
    /// A canary group first: a count (2) or a share (10%).
    #[arg(long)]
    pub canary: Option<String>,
    /// These leaves are the canary group (PK/DN; repeat).
    #[arg(long = "canary-device", conflicts_with = "canary")]
    pub canary_devices: Vec<String>,
    /// Then waves of this size: a count or a share of the rest (repeat for
    /// different sizes; the last repeats). Default: one wave of the rest.
    #[arg(long = "wave")]
    pub waves: Vec<String>,
    /// The share of a group that must succeed before the next starts.
    #[arg(long, default_value_t = 100)]
    pub success_threshold: u8,
    /// Pause when device or plugin failures exceed this share of a group.
    #[arg(long)]
    pub error_threshold: Option<u8>,
    /// ... counted once this many of the group have finished.
    #[arg(long, default_value_t = 1)]
    pub min_executed: u32,
    /// Wait for `otagw campaign approve` before every group after the first.
    #[arg(long)]
    pub approve: bool,
    /// At most this many starts per minute.
    #[arg(long)]
    pub rate: Option<u32>,
    /// Follow the campaign to its end: a progress bar per leaf on a
    /// terminal, a line per event otherwise; exit 0 only if every leaf
    /// succeeded.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct CampaignsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// One campaign in detail (every leaf), instead of the list.
    pub id: Option<String>,
    /// With ID: follow it to its end, as `otagw upgrade --follow`.
    #[arg(long, requires = "id")]
    pub follow: bool,
    /// Print JSON (the API's answer).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CampaignArgs {
    /// What to do.
    #[arg(value_enum)]
    pub verb: Verb,
    /// The campaign (`otagw campaigns` lists them).
    pub id: String,
    /// Why, for the campaign's record.
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

fn size(what: &str, s: &str) -> anyhow::Result<Size> {
    Size::parse(s).map_err(|e| super::Usage(format!("{what}: {e}")).into())
}

/// The image's SHA-256 and size, reading it once.
async fn hash_url(http: &reqwest::Client, url: &str) -> anyhow::Result<(String, u64)> {
    use futures_util::StreamExt;
    eprintln!("reading {url} once to compute its SHA-256 (give --sha256 to skip this)");
    let r = http
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| super::Unavailable(format!("cannot download {url}: {e}")))?;
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| super::Unavailable(format!("reading {url}: {e}")))?;
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    Ok((hex::encode(h.finalize()), n))
}

pub async fn upgrade(a: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let client = a.api.client()?;
    // Refuse a bad command line before anything is uploaded.
    let plan = PlanSpec {
        canary: a
            .canary
            .as_deref()
            .map(|c| size("--canary", c))
            .transpose()?,
        canary_devices: a.canary_devices.clone(),
        waves: a
            .waves
            .iter()
            .map(|w| size("--wave", w))
            .collect::<anyhow::Result<_>>()?,
        success_threshold: a.success_threshold,
        error_threshold: a.error_threshold,
        min_executed: a.min_executed,
        approve: a.approve,
        rate_per_minute: a.rate,
    };
    plan.check().map_err(super::Usage)?;
    let selection = Selection {
        module: Some(a.module.clone()),
        family: a.family.clone(),
        model: a.model.clone(),
        from_version: a.from_version.clone(),
        devices: a.devices.clone(),
        tags: a.tags.clone(),
        bus: a.bus.clone(),
    };
    selection.check().map_err(super::Usage)?;
    let image = if a.image.starts_with("http://") || a.image.starts_with("https://") {
        let (sha256, size) = match &a.sha256 {
            Some(s) => {
                // The size still has to be known: the server says it.
                let len = client
                    .http
                    .head(&a.image)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    // The header itself: a HEAD answer has no body to size.
                    .and_then(|r| {
                        r.headers()
                            .get(reqwest::header::CONTENT_LENGTH)?
                            .to_str()
                            .ok()?
                            .parse::<u64>()
                            .ok()
                    })
                    .filter(|n| *n > 0);
                let given = s.trim().to_ascii_lowercase();
                match len {
                    Some(n) => (given, n),
                    None => {
                        let (got, n) = hash_url(&client.http, &a.image).await?;
                        if got != given {
                            return Err(super::Usage(format!(
                                "{} has SHA-256 {got}, not the {given} given with --sha256",
                                a.image
                            ))
                            .into());
                        }
                        (got, n)
                    }
                }
            }
            None => hash_url(&client.http, &a.image).await?,
        };
        ImageRequest {
            url: Some(a.image.clone()),
            sha256,
            size,
        }
    } else {
        let bytes = tokio::fs::read(&a.image)
            .await
            .with_context(|| format!("cannot read the image {}", a.image))?;
        let up: UploadedImage = client
            .post("/api/images", bytes.into(), false)
            .await
            .context("uploading the image")?;
        eprintln!(
            "uploaded {} ({} bytes, sha256 {})",
            a.image, up.size, up.sha256
        );
        ImageRequest {
            url: None,
            sha256: up.sha256,
            size: up.size,
        }
    };
    let req = CampaignRequest {
        version: a.version.clone(),
        image,
        selection,
        plan,
    };
    let c: CampaignView = client
        .post("/api/campaigns", serde_json::to_vec(&req)?.into(), true)
        .await?;
    println!("{}", c.id);
    eprintln!(
        "campaign {}: {} leaves to {} in {} (follow it: otagw campaigns {} --follow)",
        c.id,
        c.counts.total,
        c.version,
        c.groups
            .iter()
            .map(|g| format!("{} of {}", g.name, g.members.len()))
            .collect::<Vec<_>>()
            .join(", "),
        c.id
    );
    if a.follow {
        return follow(&client, &c.id).await;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn campaigns(a: CampaignsArgs) -> anyhow::Result<ExitCode> {
    let client = a.api.client()?;
    match &a.id {
        None => {
            let all: Vec<CampaignView> = client.get("/api/campaigns").await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", list(&all));
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(id) if a.follow => follow(&client, id).await,
        Some(id) => {
            let c: CampaignView = client.get(&format!("/api/campaigns/{id}")).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", detail(&c));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn campaign(a: CampaignArgs) -> anyhow::Result<ExitCode> {
    let client = a.api.client()?;
    let body = serde_json::to_vec(&VerbRequest { reason: a.reason })?;
    let c: CampaignView = client
        .post(
            &format!("/api/campaigns/{}/{}", a.id, a.verb.name()),
            body.into(),
            true,
        )
        .await?;
    println!(
        "campaign {}: {}{}",
        c.id,
        c.state,
        c.pause_reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// The campaigns as a table.
pub fn list(all: &[CampaignView]) -> String {
    let header = [
        "ID",
        "VERSION",
        "STATE",
        "GROUP",
        "LEAVES",
        "SUCCEEDED",
        "FAILED",
        "WHY",
    ];
    let rows: Vec<[String; 8]> = all
        .iter()
        .map(|c| {
            [
                c.id.clone(),
                c.version.clone(),
                c.state.clone(),
                c.groups
                    .get(c.current_group)
                    .map_or_else(|| "-".into(), |g| g.name.clone()),
                c.counts.total.to_string(),
                c.counts.succeeded.to_string(),
                c.counts.failed.to_string(),
                c.pause_reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    super::aligned(&header, &rows)
}

/// One campaign with every leaf.
pub fn detail(c: &CampaignView) -> String {
    let mut out = format!(
        "campaign {}: {} to {} ({} leaves: {} succeeded, {} failed, {} running, {} pending, {} \
         not started)\n",
        c.id,
        c.state,
        c.version,
        c.counts.total,
        c.counts.succeeded,
        c.counts.failed,
        c.counts.running,
        c.counts.pending,
        c.counts.not_started
    );
    if let Some(r) = &c.pause_reason {
        out.push_str(&format!("paused: {r}\n"));
    }
    let header = [
        "GROUP", "DEVICE", "BUS", "FROM", "STATE", "PROGRESS", "DETAIL",
    ];
    let mut rows = Vec::new();
    for g in &c.groups {
        for m in &g.members {
            rows.push([
                g.name.clone(),
                m.device.clone(),
                m.bus.clone(),
                m.from_version.clone(),
                m.phase.clone().unwrap_or_else(|| m.state.clone()),
                m.progress.map_or_else(|| "-".into(), |p| format!("{p}%")),
                member_detail(m),
            ]);
        }
    }
    out.push_str(&super::aligned(&header, &rows));
    out
}

fn member_detail(m: &crate::rollout::MemberView) -> String {
    match (&m.version, &m.reason) {
        (Some(v), _) => format!("runs {v}"),
        (_, Some(r)) => r.clone(),
        _ => "-".into(),
    }
}

/// How one member is shown: what changes make a line when piped.
fn shown(m: &crate::rollout::MemberView) -> String {
    match (&m.phase, m.state.as_str()) {
        (Some(p), "running") => p.clone(),
        _ => m.state.clone(),
    }
}

/// Follow campaign `id` until it is over and nothing of it runs: bars on a
/// terminal, lines otherwise. Exit 0 only if every leaf succeeded.
async fn follow(client: &Client, id: &str) -> anyhow::Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let stop = super::StopSignal::catch();
    tokio::pin!(let stopped = stop.wait(););
    let mut bars: BTreeMap<String, indicatif::ProgressBar> = BTreeMap::new();
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:<24} [{bar:30}] {pos:>3}% {msg}")
        .expect("a valid template")
        .progress_chars("##-");
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut transitions = 0;
    let path = format!("/api/campaigns/{id}");
    // The gateway may restart meanwhile (campaigns resume): keep asking for
    // a minute before giving up.
    let mut unreachable_since: Option<std::time::Instant> = None;
    let c = loop {
        let c: CampaignView = match client.get(&path).await {
            Ok(c) => {
                unreachable_since = None;
                c
            }
            Err(e) if e.is::<super::Unavailable>() => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(60) {
                    return Err(e);
                }
                tokio::select! {
                    code = &mut stopped => return Ok(ExitCode::from(code)),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        for t in &c.transitions[transitions.min(c.transitions.len())..] {
            let line = format!("campaign {}: {} ({})", c.id, t.reason, t.to.name());
            if tty {
                multi.println(line)?;
            } else {
                println!("{line}");
            }
        }
        transitions = c.transitions.len();
        for m in c.members() {
            let key = format!("{} {}", m.device, m.module);
            let now = shown(m);
            if tty {
                let ended = m.state != "pending" && m.state != "running";
                // A leaf run again (retry) gets a fresh bar.
                if !ended && bars.get(&key).is_some_and(|b| b.is_finished()) {
                    bars.remove(&key);
                }
                let bar = bars.entry(key.clone()).or_insert_with(|| {
                    let b = multi.add(indicatif::ProgressBar::new(100));
                    b.set_style(style.clone());
                    b.set_prefix(m.device.clone());
                    b
                });
                bar.set_position(u64::from(m.progress.unwrap_or(0)));
                let detail = match (&m.version, &m.reason) {
                    (Some(v), _) => format!("{now}: runs {v}"),
                    (_, Some(r)) => format!("{now}: {r}"),
                    _ => now.clone(),
                };
                bar.set_message(detail);
                if ended && !bar.is_finished() {
                    bar.abandon();
                }
            } else if last.get(&key) != Some(&now) {
                let more = match (&m.version, &m.reason) {
                    (Some(v), _) => format!(" (runs {v})"),
                    (_, Some(r)) => format!(" ({r})"),
                    _ => String::new(),
                };
                println!("{} {}{more}", m.device, now);
            }
            last.insert(key, now);
        }
        if matches!(c.state.as_str(), "finished" | "stopped") && c.counts.running == 0 {
            break c;
        }
        tokio::select! {
            code = &mut stopped => {
                for b in bars.values() {
                    b.abandon();
                }
                eprintln!(
                    "stopped following; the campaign goes on in the gateway (otagw campaigns {id})"
                );
                return Ok(ExitCode::from(code));
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    for b in bars.values() {
        if !b.is_finished() {
            b.abandon();
        }
    }
    let n = c.counts;
    println!(
        "campaign {} {}: {} of {} succeeded, {} failed, {} not started",
        c.id, c.state, n.succeeded, n.total, n.failed, n.not_started
    );
    for m in c.members().filter(|m| m.state == "failed") {
        println!(
            "  {} failed: {}",
            m.device,
            m.reason.as_deref().unwrap_or("-")
        );
    }
    Ok(if n.succeeded == n.total {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::exit::FAILED)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_and_token_come_from_the_configuration_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("otagw.toml");
        std::fs::write(
            &cfg,
            "[gateway]\nproduct_key = \"g\"\ndevice_name = \"g\"\ndata_dir = \"state\"\n\
             plugins_dir = \"p\"\n\n[api]\nlisten = \"0.0.0.0:8181\"\n",
        )
        .unwrap();
        let args = |api: Option<&str>, token: Option<&str>| ApiArgs {
            config: Some(cfg.clone()),
            api: api.map(str::to_string),
            token_file: token.map(PathBuf::from),
            ca_file: None,
        };
        let c = args(None, None).client().unwrap();
        assert_eq!(
            c.base, "http://127.0.0.1:8181",
            "a wildcard listen is reached on loopback"
        );
        assert_eq!(c.token_file, dir.path().join("state/api-token"));
        let c = args(Some("10.0.0.2:9000/"), Some("/run/t"))
            .client()
            .unwrap();
        assert_eq!(c.base, "http://10.0.0.2:9000");
        assert_eq!(c.token_file, PathBuf::from("/run/t"));
        let bare = ApiArgs {
            config: None,
            api: None,
            token_file: None,
            ca_file: None,
        }
        .client()
        .unwrap();
        assert_eq!(bare.base, "http://127.0.0.1:8080");
        assert_eq!(bare.token_file, PathBuf::from(PACKAGED_TOKEN));
        // A token file that cannot be read says what to do.
        let err = format!("{:#}", c.token().unwrap_err());
        assert!(err.contains("--token-file"), "{err}");
    }

    #[test]
    fn a_campaign_renders_as_a_list_and_in_detail() {
        let json = serde_json::json!({
            "id": "c1", "origin": "local", "version": "2.0.0", "module": "default",
            "image": {"sign_method": "sha256", "sign": "ab", "size": 1},
            "state": "paused", "pause_reason": "error threshold: 2 of 4", "current_group": 1,
            "counts": {"total": 2, "pending": 0, "running": 0, "succeeded": 1, "failed": 1,
                       "failed_counted": 1, "not_started": 0},
            "groups": [
                {"name": "canary", "approved": false,
                 "counts": {"total": 1, "pending": 0, "running": 0, "succeeded": 1, "failed": 0,
                            "failed_counted": 0, "not_started": 0},
                 "members": [{"device": "pk/a", "module": "default", "bus": "rs485-1",
                              "from_version": "1.0", "state": "succeeded", "progress": 100,
                              "version": "2.0.0", "counted": false, "attempts": 1}]},
                {"name": "wave 1", "approved": false,
                 "counts": {"total": 1, "pending": 0, "running": 0, "succeeded": 0, "failed": 1,
                            "failed_counted": 1, "not_started": 0},
                 "members": [{"device": "pk/b", "module": "default", "bus": "rs485-1",
                              "from_version": "1.0", "state": "failed",
                              "reason": "-4: refused", "counted": true, "attempts": 1}]}],
            "selection": {}, "plan": {"waves": [], "success_threshold": 100, "min_executed": 1,
                                      "approve": false},
            "created_ms": 1, "transitions": []
        });
        let c: CampaignView = serde_json::from_value(json).unwrap();
        let l = list(std::slice::from_ref(&c));
        let row = l.lines().nth(1).unwrap();
        assert!(
            row.starts_with("c1")
                && row.contains("wave 1")
                && row.ends_with("error threshold: 2 of 4"),
            "{l}"
        );
        let d = detail(&c);
        assert!(d.contains("paused: error threshold"), "{d}");
        assert!(
            d.lines()
                .any(|l| l.starts_with("canary") && l.ends_with("runs 2.0.0")),
            "{d}"
        );
        assert!(
            d.lines()
                .any(|l| l.starts_with("wave 1") && l.ends_with("-4: refused")),
            "{d}"
        );
    }
}
