//! The gateway's Prometheus metrics (`GET /metrics`, text format 0.0.4).
//!
//! Counters and histograms are fed where things happen (the job runner,
//! the daemon's upstream loop); gauges of state (jobs and leaves by state,
//! cache, outbox, plugins, upstream) are set from a [`Gauges`] snapshot
//! at each scrape, so they cannot drift from what the API shows. One
//! registry per daemon (not the process-wide default): tests run several
//! gateways in one process.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Seconds buckets for a flash: a BLE or RS-485 transfer of a few hundred
/// kilobytes takes minutes.
const FLASH_SECONDS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Image sizes, 4 KiB to 16 MiB.
const IMAGE_BYTES: &[f64] = &[
    4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];
/// Plugin instantiation: tens of microseconds pooled, milliseconds cold.
const INSTANTIATE_SECONDS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5];

/// How a job ended, as the `outcome` label says it.
pub fn outcome_label(step: Option<i32>) -> &'static str {
    match step {
        None => "succeeded",
        Some(-2) => "download_failed",
        Some(-3) => "verify_failed",
        Some(-4) => "flash_failed",
        Some(_) => "failed",
    }
}

/// The state shown at a scrape.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// `(family, state)` of every leaf (idle, queued, flashing, ...).
    pub leaves: Vec<(String, String)>,
    pub cache_bytes: u64,
    pub cache_images: usize,
    pub cache_cap_bytes: u64,
    pub upstream_connected: bool,
    pub outbox_messages: usize,
    pub outbox_oldest_seconds: Option<f64>,
    pub plugins_loaded: usize,
    pub plugins_broken: usize,
    pub campaigns: Vec<String>,
}

pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: the gauges are reset and refilled for each.
    scrape: std::sync::Mutex<()>,
    pub job_runs: IntCounterVec,
    pub jobs_ended: IntCounterVec,
    pub flash_seconds: HistogramVec,
    pub flash_bytes: HistogramVec,
    pub download_bytes: IntCounter,
    pub download_failures: IntCounterVec,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub plugin_faults: IntCounterVec,
    pub plugin_instantiate: HistogramVec,
    pub upstream_reconnects: IntCounter,
    pub link_errors: IntCounterVec,
    leaves: IntGaugeVec,
    jobs: IntGaugeVec,
    cache_bytes: IntGauge,
    cache_images: IntGauge,
    cache_cap: IntGauge,
    upstream_connected: IntGauge,
    outbox_messages: IntGauge,
    outbox_oldest: prometheus::Gauge,
    plugins: IntGaugeVec,
    campaigns: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], b: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(b.to_vec()), labels)
        .expect("a valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("otagw".into()), None).expect("a valid prefix");
        let info = IntGaugeVec::new(
            Opts::new("build_info", "otagw's version; always 1"),
            &["version"],
        )
        .expect("a valid metric");
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(info)).expect("registered once");
        let c = IntCounter::new(
            "download_bytes_total",
            "Image bytes downloaded from the platform's URLs",
        )
        .expect("a valid metric");
        r.register(Box::new(c.clone())).expect("registered once");
        let hits = IntCounter::new(
            "cache_hits_total",
            "Jobs whose image was already complete in the cache",
        )
        .expect("a valid metric");
        r.register(Box::new(hits.clone())).expect("registered once");
        let misses = IntCounter::new(
            "cache_misses_total",
            "Jobs whose image had to be downloaded (or resumed)",
        )
        .expect("a valid metric");
        r.register(Box::new(misses.clone()))
            .expect("registered once");
        let reconnects = IntCounter::new(
            "upstream_reconnects_total",
            "Connections to the upstream broker after the first",
        )
        .expect("a valid metric");
        r.register(Box::new(reconnects.clone()))
            .expect("registered once");
        let oldest = prometheus::Gauge::new(
            "outbox_oldest_age_seconds",
            "Age of the oldest message waiting in the outbox (0 when empty)",
        )
        .expect("a valid metric");
        r.register(Box::new(oldest.clone()))
            .expect("registered once");
        Metrics {
            job_runs: counter(
                &r,
                "job_runs_total",
                "Times a job took its link and began work (a job resumed after a restart or \
                 a fresh URL begins again)",
                &["family"],
            ),
            jobs_ended: counter(
                &r,
                "jobs_ended_total",
                "Jobs that ended, by outcome (succeeded, download_failed, verify_failed, \
                 flash_failed, failed)",
                &["family", "outcome"],
            ),
            flash_seconds: histogram(
                &r,
                "flash_duration_seconds",
                "Time a flash took, by outcome (succeeded, failed)",
                &["family", "outcome"],
                FLASH_SECONDS,
            ),
            flash_bytes: histogram(
                &r,
                "flash_image_bytes",
                "Size of the images flashed successfully",
                &["family"],
                IMAGE_BYTES,
            ),
            download_bytes: c,
            download_failures: counter(
                &r,
                "download_failures_total",
                "Downloads that failed, by reason (http, expired_url, digest)",
                &["reason"],
            ),
            cache_hits: hits,
            cache_misses: misses,
            plugin_faults: counter(
                &r,
                "plugin_faults_total",
                "Failures of a plugin itself (not of the device), by reason (trap, memory, \
                 cpu, deadline, instantiate, contract)",
                &["family", "reason"],
            ),
            plugin_instantiate: histogram(
                &r,
                "plugin_instantiate_seconds",
                "Time to instantiate a plugin for a job",
                &["family"],
                INSTANTIATE_SECONDS,
            ),
            upstream_reconnects: reconnects,
            link_errors: counter(
                &r,
                "link_errors_total",
                "Errors opening or using a leaf's link, by transport (serial, tcp, ble, other)",
                &["transport"],
            ),
            leaves: gauge_vec(
                &r,
                "leaves",
                "Leaves by family and state (idle, queued, downloading, verifying, flashing, \
                 identifying, succeeded, failed)",
                &["family", "state"],
            ),
            jobs: gauge_vec(
                &r,
                "jobs",
                "Jobs under way (queued to identifying) by family and state",
                &["family", "state"],
            ),
            cache_bytes: gauge(&r, "cache_bytes", "Bytes of complete images in the cache"),
            cache_images: gauge(&r, "cache_images", "Complete images in the cache"),
            cache_cap: gauge(
                &r,
                "cache_capacity_bytes",
                "The cache's cap ([cache] max_bytes)",
            ),
            upstream_connected: gauge(
                &r,
                "upstream_connected",
                "1 while the upstream broker has accepted the connection",
            ),
            outbox_messages: gauge(
                &r,
                "outbox_messages",
                "Durable messages waiting for the upstream broker's acknowledgement",
            ),
            outbox_oldest: oldest,
            plugins: gauge_vec(
                &r,
                "plugins",
                "Plugin files by status (loaded, broken)",
                &["status"],
            ),
            campaigns: gauge_vec(&r, "campaigns", "Rollout campaigns by state", &["state"]),
            registry: r,
            scrape: std::sync::Mutex::new(()),
        }
    }

    /// Set the gauges from `g` and render everything.
    pub fn render(&self, g: &Gauges) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.leaves.reset();
        self.jobs.reset();
        for (family, state) in &g.leaves {
            self.leaves.with_label_values(&[family, state]).inc();
            if matches!(
                state.as_str(),
                "queued" | "downloading" | "verifying" | "flashing" | "identifying"
            ) {
                self.jobs.with_label_values(&[family, state]).inc();
            }
        }
        self.cache_bytes.set(clamp(g.cache_bytes));
        self.cache_images.set(g.cache_images as i64);
        self.cache_cap.set(clamp(g.cache_cap_bytes));
        self.upstream_connected.set(i64::from(g.upstream_connected));
        self.outbox_messages.set(g.outbox_messages as i64);
        self.outbox_oldest
            .set(g.outbox_oldest_seconds.unwrap_or(0.0));
        self.plugins
            .with_label_values(&["loaded"])
            .set(g.plugins_loaded as i64);
        self.plugins
            .with_label_values(&["broken"])
            .set(g.plugins_broken as i64);
        self.campaigns.reset();
        for s in ["collecting", "running", "paused", "stopped", "finished"] {
            self.campaigns.with_label_values(&[s]).set(0);
        }
        for s in &g.campaigns {
            self.campaigns.with_label_values(&[s]).inc();
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// A plugin instantiated for `family` in `seconds`.
    pub fn instantiated(&self, family: &str, seconds: f64) {
        self.plugin_instantiate
            .with_label_values(&[family])
            .observe(seconds);
    }

    /// Count a plugin's own failure (`None`: not the plugin's fault).
    pub fn plugin_fault(&self, family: &str, e: &crate::plugin::PluginError) {
        use crate::plugin::PluginError as E;
        let reason = match e {
            E::Trap { .. } => "trap",
            E::Memory { .. } => "memory",
            E::Cpu { .. } => "cpu",
            E::Deadline { .. } => "deadline",
            E::Instantiate { .. } => "instantiate",
            E::ContractMismatch { .. } => "contract",
            _ => return,
        };
        self.plugin_faults
            .with_label_values(&[family, reason])
            .inc();
    }

    /// A flash that ended after `seconds`; its image's `bytes` count when
    /// it succeeded.
    pub fn flashed(&self, family: &str, ok: bool, bytes: u64, seconds: f64) {
        let outcome = if ok { "succeeded" } else { "failed" };
        self.flash_seconds
            .with_label_values(&[family, outcome])
            .observe(seconds);
        if ok {
            self.flash_bytes
                .with_label_values(&[family])
                .observe(bytes as f64);
        }
    }

    pub fn link_error(&self, link_url: &str) {
        let transport = match link_url.split_once("://").map(|(s, _)| s) {
            Some("ble") => "ble",
            Some("tcp") => "tcp",
            Some("serial") => "serial",
            _ => "other",
        };
        self.link_errors.with_label_values(&[transport]).inc();
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_follow_the_snapshot_and_counters_accumulate() {
        let m = Metrics::new();
        m.job_runs.with_label_values(&["xmodem"]).inc();
        m.jobs_ended
            .with_label_values(&["xmodem", outcome_label(Some(-4))])
            .inc();
        let g = Gauges {
            leaves: vec![
                ("xmodem".into(), "flashing".into()),
                ("xmodem".into(), "idle".into()),
                ("xmodem".into(), "idle".into()),
            ],
            campaigns: vec!["running".into()],
            ..Gauges::default()
        };
        let text = m.render(&g);
        assert!(
            text.contains("otagw_job_runs_total{family=\"xmodem\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("otagw_jobs_ended_total{family=\"xmodem\",outcome=\"flash_failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("otagw_leaves{family=\"xmodem\",state=\"idle\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("otagw_jobs{family=\"xmodem\",state=\"flashing\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("otagw_campaigns{state=\"running\"} 1"),
            "{text}"
        );
        // A leaf that went idle is not shown flashing at the next scrape.
        let text = m.render(&Gauges::default());
        assert!(!text.contains("state=\"flashing\""), "{text}");
        assert!(text.contains("otagw_build_info{version="), "{text}");
    }
}
