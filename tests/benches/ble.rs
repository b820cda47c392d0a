//! Issue 13: SMP image upload over Bluetooth LE, `otagw flash` against a reference central
//! written with Google Bumble's own host stack (`examples/ble-sim/check_sim.py`), both
//! uploading to the same simulated peripheral in the same run.
//!
//! ```sh
//! python3 -m pip install -r examples/ble-sim/requirements.txt imgtool
//! cargo bench -p otagw-e2e --bench ble
//! OTAGW_BENCH_QUICK=1 cargo bench -p otagw-e2e --bench ble   # 128 KiB, one round
//! ```
//!
//! One `ble_sim.py` process with one peripheral (its `leaf-sim smp --raw-tcp` behind the
//! GATT characteristic) serves every run. Each round signs two new images (new versions,
//! so nothing is resumed or skipped) and uploads one with each central:
//! - **reference**: `check_sim.py --hci tcp-client:... --image FILE --packet-size 2048`:
//!   Bumble's host stack, ATT MTU 247, SMP requests as large as the device's 2048-byte buffer
//!   (as otagw sends them), each cut into writes without response, one request in flight;
//! - **otagw**: `otagw flash --family smp --link ble://... --ble-adapter hci+tcp://...`
//!   (the tests package's `otagw-e2e-gateway`, warm plugin cache): verify, connect, upload,
//!   test, reset, reconnect, confirm, identify.
//!
//! Both are measured the same way, from the radio's side: the simulator's `upload_started`
//! and `upload_complete` events (its clock) bound the upload; bytes/s = image size / that
//! time. otagw's whole job (process start to exit) is reported beside it.
//!
//! The link-layer ceiling: Bumble's LocalLink has no connection events (it delivers at once;
//! the simulator README says so), so the ceiling is computed for a real radio given what
//! the simulator granted (the ATT MTU from its `mtu` event, the interval from `connect`):
//! LE 1M PHY, LE Data Length 251, each data PDU answered by an empty one (T_IFS 150 µs) and
//! connection events that fill the interval. That is the best any central can do on 1M; the
//! share column says how far the simulated run is from it (above 1 means the simulation is
//! faster than the radio could be, i.e. the software is not the bottleneck).
//! `OTAGW_BENCH_SIZE` (bytes) and `OTAGW_BENCH_ROUNDS` (default 3) override the defaults.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use otagw_e2e::{PluginsDir, artifacts, imgtool};

const GATEWAY: &str = env!("CARGO_BIN_EXE_otagw-e2e-gateway");
const LEAF_SIM: &str = env!("CARGO_BIN_EXE_otagw-e2e-leaf-sim");
const SIM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/ble-sim/ble_sim.py"
);
const CHECK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/ble-sim/check_sim.py"
);
const ADDRESS: &str = "C0:00:00:00:00:01";

type Events = Arc<Mutex<Vec<serde_json::Value>>>;

struct Sim {
    child: Child,
    hci: String,
    events: Events,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sim() -> Sim {
    let mut child = Command::new("python3")
        .args([
            SIM,
            "--hci",
            "tcp-server:127.0.0.1:0",
            "--leaf-sim",
            LEAF_SIM,
        ])
        .args(["--device", &format!("{ADDRESS},buf-size=2048")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with bumble (pip install -r examples/ble-sim/requirements.txt)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("a ready line").unwrap();
    let hci = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hci="))
        .unwrap_or_else(|| panic!("not a ready line: {ready}"))
        .to_string();
    let events: Events = Arc::default();
    let sink = events.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    Sim { child, hci, events }
}

/// The upload's time on the simulator's clock, among the events from `from` on.
fn upload_seconds(events: &Events, from: usize) -> f64 {
    let ev = events.lock().unwrap();
    let t = |kind: &str| {
        ev[from..]
            .iter()
            .find(|e| e["event"] == kind)
            .and_then(|e| e["t"].as_f64())
            .unwrap_or_else(|| panic!("no {kind} event"))
    };
    t("upload_complete") - t("upload_started")
}

fn last(events: &Events, kind: &str, field: &str) -> f64 {
    let ev = events.lock().unwrap();
    ev.iter()
        .rev()
        .find(|e| e["event"] == kind)
        .and_then(|e| e[field].as_f64())
        .unwrap_or_else(|| panic!("no {kind} event"))
}

/// ATT payload bytes/s on LE 1M PHY with Data Length 251: a write without response of
/// `mtu - 3` bytes is an L2CAP PDU of `mtu + 4` bytes, cut into LL PDUs of at most 251;
/// each LL PDU takes (10 + len) bytes × 8 µs on air, T_IFS, an empty answer (80 µs), T_IFS.
fn ceiling_1m(att_mtu: f64) -> f64 {
    let payload = att_mtu - 3.0;
    let mut l2cap = att_mtu + 4.0;
    let mut micros = 0.0;
    while l2cap > 0.0 {
        let len = l2cap.min(251.0);
        micros += (10.0 + len) * 8.0 + 150.0 + 80.0 + 150.0;
        l2cap -= len;
    }
    payload / (micros / 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> ExitCode {
    if Command::new("python3")
        .args(["-c", "import bumble, imgtool"])
        .status()
        .map_or(true, |s| !s.success())
    {
        println!("skipped: needs `pip install -r examples/ble-sim/requirements.txt imgtool`");
        return ExitCode::SUCCESS;
    }
    let quick = std::env::var_os("OTAGW_BENCH_QUICK").is_some();
    let size: u32 = std::env::var("OTAGW_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 128 * 1024 } else { 512 * 1024 });
    let rounds: u32 = std::env::var("OTAGW_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });

    let work = tempfile::tempdir().unwrap();
    let key = imgtool::keygen(work.path(), "ecdsa-p256");
    let public_key = format!("public_key={}", imgtool::public_key_hex(&key, "ecdsa-p256"));
    let plugins = PluginsDir::with(&[artifacts::SMP]);
    let cache = tempfile::tempdir().unwrap();
    let sim = start_sim();
    let adapter = format!("hci+tcp://{}", sim.hci);
    let image = |dir: &Path, version: &str| {
        let payload: Vec<u8> = (0..size).map(|i| (i * 13 + i / 509) as u8).collect();
        let img = imgtool::sign(dir, &key, &payload, version);
        let file = dir.join(format!("fw-{version}.bin"));
        std::fs::write(&file, &img).unwrap();
        (file, img.len())
    };

    let (mut reference, mut otagw, mut jobs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Reference: Bumble's central, upload only.
        let (file, len) = image(work.path(), &format!("2.{round}.1"));
        let from = sim.events.lock().unwrap().len();
        let out = Command::new("python3")
            .args([CHECK, "--hci", &format!("tcp-client:{}", sim.hci)])
            .args(["--address", ADDRESS, "--image", file.to_str().unwrap()])
            .args(["--packet-size", "2048"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "check_sim: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        reference.push(len as f64 / upload_seconds(&sim.events, from));

        // otagw: the whole flash.
        let (file, len) = image(work.path(), &format!("2.{round}.2"));
        let from = sim.events.lock().unwrap().len();
        let started = Instant::now();
        let out = Command::new(GATEWAY)
            .args([
                "flash",
                "--family",
                "smp",
                "--link",
                &format!("ble://{ADDRESS}"),
            ])
            .args(["--ble-adapter", &adapter])
            .args(["--plugins-dir", plugins.path().to_str().unwrap()])
            .args(["--cache-dir", cache.path().to_str().unwrap()])
            .args(["--image", file.to_str().unwrap(), "-o", &public_key])
            .output()
            .unwrap();
        let job = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "otagw flash: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        otagw.push(len as f64 / upload_seconds(&sim.events, from));
        jobs.push(job);
        println!(
            "round {round}: reference {:.0} B/s, otagw {:.0} B/s (job {job:.2} s)",
            reference[round as usize], otagw[round as usize]
        );
    }

    let mtu = last(&sim.events, "mtu", "mtu");
    let interval = last(&sim.events, "connect", "interval_ms");
    let ceiling = ceiling_1m(mtu);
    let (r, o) = (median(reference), median(otagw));
    println!();
    println!(
        "image {size} bytes payload, {rounds} round(s), medians; ATT MTU {mtu}, interval {interval} ms (otagw's connection)"
    );
    println!("| central | upload B/s | × reference | × 1M PHY ceiling ({ceiling:.0} B/s) |");
    println!("|---|---|---|---|");
    println!(
        "| Bumble (check_sim.py) | {r:.0} | 1.000 | {:.3} |",
        r / ceiling
    );
    println!(
        "| otagw flash | {o:.0} | {:.3} | {:.3} |",
        o / r,
        o / ceiling
    );
    println!(
        "otagw's whole job (verify, connect, upload, test, reset, reconnect, confirm, identify): {:.2} s median",
        median(jobs)
    );
    ExitCode::SUCCESS
}
