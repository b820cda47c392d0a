//! `otagw doctor --config FILE`: checks a deployment and says what is wrong
//! in words an operator can act on, one line per check (`ok`, `warn`,
//! `FAIL`); exit 1 on any failure. It changes nothing: it opens no serial
//! port (it checks that this user may), binds nothing, writes only a probe
//! file in data_dir (removed at once).
//!
//! Checks: the configuration; every device's family and options against the
//! plugins (as `otagw check`); every device's link (a serial port exists and
//! this user may read and write it; a TCP serial server accepts a
//! connection); the BLE adapter when one is configured; the upstream broker
//! answers on its port; the clock is plausible (TLS certificates need it);
//! data_dir is writable and has room for the cache.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::config::Config;
use crate::link::LinkUrl;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The gateway's configuration.
    #[arg(long, short)]
    pub config: PathBuf,
}

/// How long a network check may take.
const CONNECT: Duration = Duration::from_secs(5);

/// The earliest date a working clock can show (certificates are checked
/// against it): 2025-01-01.
const EPOCH_FLOOR_SECS: u64 = 1_735_689_600;

#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: &str) {
        println!("ok    {what}");
    }
    fn warn(&mut self, what: &str) {
        println!("warn  {what}");
    }
    fn fail(&mut self, what: &str) {
        self.failed += 1;
        println!("FAIL  {what}");
    }
}

pub async fn run(a: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut r = Report::default();
    let cfg = match Config::load(&a.config) {
        Ok(c) => c,
        Err(e) => {
            r.fail(&format!("configuration: {e}"));
            return Ok(ExitCode::from(super::exit::FAILED));
        }
    };
    r.ok(&format!(
        "configuration {} ({} devices)",
        a.config.display(),
        cfg.devices.len()
    ));
    for w in cfg.warnings() {
        r.warn(&w);
    }

    match super::config::check_devices(&cfg).await {
        Ok(problems) if problems.is_empty() => r.ok(&format!(
            "plugins in {}: every device's family is there and takes its options",
            cfg.gateway.plugins_dir.display()
        )),
        Ok(problems) => problems.iter().for_each(|p| r.fail(p)),
        Err(e) => r.fail(&format!("plugins: {e}")),
    }
    r.ok(&format!(
        "plugins run on {}",
        cfg.plugins.limits(cfg.jobs.max_parallel).engine
    ));
    match cfg.memory_limit_warning(crate::config::own_memory_limit()) {
        Some(w) => r.warn(&w),
        None => r.ok(&format!(
            "memory: up to {} MiB at once (the unit's MemoryMax must allow it)",
            cfg.memory_budget_mib()
        )),
    }

    for d in &cfg.devices {
        let who = format!("device {}/{}", d.product_key, d.device_name);
        match link(&d.link).await {
            Ok(what) => r.ok(&format!("{who}: {what}")),
            Err(why) => r.fail(&format!("{who}: {why}")),
        }
    }

    if let Some(adapter) = &cfg.ble.adapter {
        match ble_adapter(adapter).await {
            Ok(what) => r.ok(&format!("BLE adapter {adapter}: {what}")),
            Err(why) => r.fail(&format!("BLE adapter {adapter}: {why}")),
        }
    }

    match &cfg.upstream {
        None => r.ok("upstream: standalone (the embedded broker takes notices)"),
        Some(u) => match upstream(&u.url).await {
            Ok(what) => r.ok(&format!(
                "upstream {}: {what} (credentials are checked when `otagw run` connects)",
                u.url
            )),
            Err(why) => r.fail(&format!("upstream {}: {why}", u.url)),
        },
    }

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    if now < EPOCH_FLOOR_SECS {
        r.fail(
            "clock: it is before 2025: TLS certificates will not validate (set the time, \
             e.g. enable NTP with `timedatectl set-ntp true`)",
        );
    } else {
        r.ok("clock: plausible");
    }

    // The image cache needs its room where its files go.
    let (state, cache) = match &cfg.cache.dir {
        Some(dir) => (0, Some(dir)),
        None => (cfg.cache.max_size_mib << 20, None),
    };
    let mut dirs = vec![(&cfg.gateway.data_dir, state)];
    if let Some(dir) = cache {
        dirs.push((dir, cfg.cache.max_size_mib << 20));
    }
    for (dir, room) in dirs {
        match data_dir(dir, room) {
            Ok((what, None)) => r.ok(&what),
            Ok((what, Some(warning))) => {
                r.ok(&what);
                r.warn(&warning)
            }
            Err(why) => r.fail(&why),
        }
    }

    if r.failed > 0 {
        println!(
            "{} problem{} found",
            r.failed,
            if r.failed == 1 { "" } else { "s" }
        );
        Ok(ExitCode::from(super::exit::FAILED))
    } else {
        println!("no problems found");
        Ok(ExitCode::SUCCESS)
    }
}

/// A device's link: reachable, and usable by this user.
async fn link(url: &str) -> Result<String, String> {
    if url.starts_with("ble://") {
        return Ok("BLE (checked with the adapter)".into());
    }
    match LinkUrl::parse(url).map_err(|e| e.to_string())? {
        LinkUrl::Serial { path, .. } => serial_access(Path::new(&path)),
        LinkUrl::Tcp { host, port } => tcp(&host, port).await,
    }
}

/// A serial port exists and this user may read and write it.
fn serial_access(path: &Path) -> Result<String, String> {
    use rustix::fs::{Access, access};
    if !path.exists() {
        return Err(format!(
            "{} does not exist: is the adapter plugged in? (`otagw ports` lists the serial \
             ports; /dev/serial/by-id names do not change when it is replugged)",
            path.display()
        ));
    }
    access(path, Access::READ_OK | Access::WRITE_OK).map_err(|e| {
        format!(
            "{}: this user may not read and write it ({e}): add the user to its group \
             (usually `dialout`: `usermod -aG dialout USER`, then log in again)",
            path.display()
        )
    })?;
    Ok(format!(
        "{} is there and this user may use it",
        path.display()
    ))
}

/// A TCP service accepts a connection within [`CONNECT`].
async fn tcp(host: &str, port: u16) -> Result<String, String> {
    match tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(format!("{host}:{port} accepts connections")),
        Ok(Err(e)) => Err(format!(
            "{host}:{port}: {e} (is the device server on, and is this its address and port?)"
        )),
        Err(_) => Err(format!(
            "{host}:{port}: no answer within {CONNECT:?} (a firewall, or the wrong address)"
        )),
    }
}

async fn ble_adapter(spec: &str) -> Result<String, String> {
    if let Some(rest) = spec.strip_prefix("hci+tcp://") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{spec}: no port"))?;
        let port: u16 = port.parse().map_err(|_| format!("{spec}: bad port"))?;
        return tcp(host, port).await;
    }
    if let Some(rest) = spec.strip_prefix("hci+serial://") {
        let path = rest.split('?').next().unwrap_or(rest);
        return serial_access(Path::new(path));
    }
    Ok("checked when `otagw ble scan` or `otagw run` opens it".into())
}

/// The upstream broker's port answers.
async fn upstream(url: &str) -> Result<String, String> {
    let u = url::Url::parse(url).map_err(|e| e.to_string())?;
    let host = u.host_str().ok_or("no host")?.to_string();
    let port = u
        .port()
        .unwrap_or(if u.scheme() == "mqtts" { 8883 } else { 1883 });
    tcp(&host, port).await
}

/// data_dir (or the directory it would be created in) is writable and has
/// room for the image cache.
fn data_dir(dir: &Path, cache_bytes: u64) -> Result<(String, Option<String>), String> {
    let existing = dir
        .ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("/"));
    let probe = existing.join(".otagw-doctor-probe");
    std::fs::write(&probe, b"probe").map_err(|e| {
        format!(
            "{}: cannot write in {} ({e}): give this user that directory (or set data_dir / \
             [cache] dir to one it owns)",
            dir.display(),
            existing.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    let free = rustix::fs::statvfs(existing)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let what = format!("{}: writable, {} MiB free", dir.display(), free >> 20);
    let warning = (free < cache_bytes).then(|| {
        format!(
            "{}: {} MiB free is less than the cache may use ([cache] max_size_mib = {}): \
             lower it or free space",
            dir.display(),
            free >> 20,
            cache_bytes >> 20
        )
    });
    Ok((what, warning))
}
