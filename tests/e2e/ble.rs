//! The BLE link (`gateway/src/link/ble.rs`) through a real host stack
//! (trouble-host) against Google Bumble's virtual controllers: one Python
//! process whose controller C0 the gateway reaches as HCI over TCP and whose
//! C1 carries a peripheral (`tests/testkit/ble/echo_peripheral.py`).

use std::time::Duration;

use otagw::link::ble::{BleAdapter, GattPlan};
use otagw::link::gatt::parse_uuid;
use otagw_e2e::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PERIPHERAL: &str = "C4:11:22:33:44:55";

/// The peripheral process and the adapter URL of its controller C0.
async fn peripheral() -> (Child, String) {
    // The port is chosen here: Bumble's tcp-server does not say which it bound.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testkit/ble/echo_peripheral.py"
    );
    let mut child = Command::new("python3")
        .args([script, &format!("tcp-server:127.0.0.1:{port}"), PERIPHERAL])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with bumble (pip install bumble==0.0.236)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next_line().await.unwrap() {
            Some(l) if l == "ready" => break,
            Some(_) => {}
            None => panic!("the peripheral exited before it was ready"),
        }
    }
    // Keep reading its event lines: a closed pipe would fail its next print.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("hci+tcp://127.0.0.1:{port}"))
}

fn smp_plan() -> GattPlan {
    let smp = parse_uuid("da2e7828-fbce-4e01-ae9e-261174997c48").unwrap();
    GattPlan {
        service: parse_uuid("8d53dc1d-1db7-4cd3-868b-8a527460aa84").unwrap(),
        write: smp,
        write_with_response: false,
        notify: smp,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ble_link_carries_bytes_reads_characteristics_and_reconnects() {
    let (_peripheral, adapter_url) = peripheral().await;
    let adapter = BleAdapter::start(&adapter_url, 1).await.unwrap();
    let url = format!("ble://{PERIPHERAL}");
    let mut link = adapter
        .open(&url, smp_plan(), Duration::from_secs(10))
        .await
        .unwrap();
    // The ATT MTU was exchanged up from 23.
    assert!(link.mtu() > 200, "mtu {}", link.mtu());

    let echo = |n: usize| (0..n).map(|i| (i * 7) as u8).collect::<Vec<u8>>();
    let data = echo(link.mtu() as usize);
    link.write(&data).await.unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let more = link.read(4096, Duration::from_secs(5)).await.unwrap();
        assert!(!more.is_empty(), "the notification came back");
        got.extend(more);
    }
    assert_eq!(got, data);

    // Another service's characteristic, in 16-bit form.
    assert_eq!(link.gatt_read("2a26").await.unwrap(), b"1.0.0");
    let e = link.gatt_read("2a27").await.unwrap_err().to_string();
    assert!(e.contains("no characteristic"), "{e}");

    // The device resets: it disconnects and advertises again; reopen finds it.
    link.write(b"reset").await.unwrap();
    link.reopen(Duration::from_secs(10)).await.unwrap();
    link.write(b"again").await.unwrap();
    assert_eq!(
        link.read(4096, Duration::from_secs(5)).await.unwrap(),
        b"again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_nobody_advertises_is_not_found_in_bounded_time() {
    let (_peripheral, adapter_url) = peripheral().await;
    let adapter = BleAdapter::start(&adapter_url, 1).await.unwrap();
    let e = adapter
        .open(
            "ble://C4:00:00:00:00:01",
            smp_plan(),
            Duration::from_millis(1500),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
    // The adapter still serves the device that is there.
    adapter
        .open(
            &format!("ble://{PERIPHERAL}"),
            smp_plan(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_adapter_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = BleAdapter::start(&format!("hci+tcp://127.0.0.1:{port}"), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot reach the HCI controller"), "{e}");
}

/// `otagw flash` to a ble:// link without an adapter says what to configure.
#[tokio::test]
async fn a_ble_link_without_an_adapter_says_what_to_set() {
    let plugins = PluginsDir::with(&[artifacts::SMP]);
    let cache = tempfile::tempdir().unwrap();
    let image = cache.path().join("fw.bin");
    std::fs::write(&image, b"not flashed").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .args([
            "identify",
            "--family",
            "smp",
            "--link",
            &format!("ble://{PERIPHERAL}"),
        ])
        .args(["--plugins-dir", plugins.path().to_str().unwrap()])
        .args(["--cache-dir", cache.path().to_str().unwrap()])
        .env_remove("OTAGW_BLE_ADAPTER")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a BLE adapter") && err.contains("--ble-adapter"),
        "{err}"
    );
}

/// The BLE leaf simulator (`examples/ble-sim`: Bumble controllers, each
/// peripheral an SMP/MCUboot leaf-sim behind the SMP GATT service): its
/// process, its adapter URL, and every event line it printed so far.
struct BleSim {
    _child: Child,
    adapter: String,
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Drop for BleSim {
    /// A failing test shows what the radio saw.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for e in self.events.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                eprintln!("ble-sim: {e}");
            }
        }
    }
}

async fn ble_sim(devices: &[String]) -> BleSim {
    ble_sim_on("tcp-server:127.0.0.1:0", devices).await
}

/// The simulator with controller C0 on `hci` (a Bumble transport:
/// `tcp-server:HOST:PORT` or `pty:PATH`).
async fn ble_sim_on(hci: &str, devices: &[String]) -> BleSim {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/ble-sim/ble_sim.py"
    );
    let mut cmd = Command::new("python3");
    cmd.args([script, "--hci", hci])
        .args(["--leaf-sim", env!("CARGO_BIN_EXE_otagw-e2e-leaf-sim")]);
    for d in devices {
        cmd.args(["--device", d]);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with bumble (pip install bumble==0.0.236)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next_line().await.unwrap().expect("a ready line");
    let hci = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hci="))
        .unwrap_or_else(|| panic!("not a ready line: {ready}"))
        .to_string();
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line) {
                sink.lock().unwrap().push(v);
            }
        }
    });
    let adapter = match hci.strip_prefix("pty:") {
        Some(path) => format!("hci+serial://{path}?baud=1000000"),
        None => format!("hci+tcp://{hci}"),
    };
    BleSim {
        _child: child,
        adapter,
        events,
    }
}

/// A 512 KiB imgtool-signed image through `otagw flash` over BLE: uploaded,
/// tested, reset (the peripheral disconnects and advertises again),
/// confirmed; slot 0 then holds exactly the image and `otagw identify`
/// reads the new version over BLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smp_over_ble_flashes_a_signed_image_through_otagw_flash() {
    let work = tempfile::tempdir().unwrap();
    let key = imgtool::keygen(work.path(), "ecdsa-p256");
    let payload: Vec<u8> = (0..512 * 1024u32)
        .map(|i| (i * 13 + i / 509) as u8)
        .collect();
    let img = imgtool::sign(work.path(), &key, &payload, "2.0.0");
    let file = work.path().join("fw-2.0.0.bin");
    std::fs::write(&file, &img).unwrap();
    let slot0 = work.path().join("slot0.bin");
    let address = "C0:00:00:00:00:01";
    let sim = ble_sim(&[format!("{address},name=leaf1,slot0={}", slot0.display())]).await;

    let plugins = PluginsDir::with(&[artifacts::SMP]);
    let cache = tempfile::tempdir().unwrap();
    let link = format!("ble://{address}");
    let common = [
        "--family",
        "smp",
        "--link",
        &link,
        "--ble-adapter",
        &sim.adapter,
        "--plugins-dir",
        plugins.path().to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let public_key = format!("public_key={}", imgtool::public_key_hex(&key, "ecdsa-p256"));
    let out = Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .arg("flash")
        .args(common)
        .args(["--image", file.to_str().unwrap(), "-o", &public_key])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "flash over BLE: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held = std::fs::read(&slot0).unwrap();
    assert_eq!(&held[..img.len()], &img[..], "slot 0 holds the image");
    assert!(
        held[img.len()..].iter().all(|b| *b == 0xFF),
        "erased after it"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .arg("identify")
        .args(common)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("version 2.0.0"),
        "{said}"
    );

    // The peripheral reset once (disconnect, advertise again) and came back.
    let events = sim.events.lock().unwrap().clone();
    let resets = events
        .iter()
        .filter(|e| e["event"] == "disconnect" && e["why"] == "reset")
        .count();
    assert_eq!(resets, 1, "{events:?}");
    // Connected for bulk transfer: an interval of 7.5 to 30 ms, not the
    // host stack's default 80 ms.
    for e in events.iter().filter(|e| e["event"] == "connect") {
        let ms = e["interval_ms"].as_f64().unwrap();
        assert!((7.5..=30.0).contains(&ms), "{e}");
    }
}

/// The BLE simulator's own tests (`examples/ble-sim/test_ble_sim.py`, its
/// central written with Bumble's API, not ours), so `cargo test` runs them.
#[tokio::test]
async fn the_ble_simulator_passes_its_own_tests() {
    let out = Command::new("python3")
        .args(["-m", "unittest", "test_ble_sim"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ble-sim"))
        .env("OTAGW_LEAF_SIM", env!("CARGO_BIN_EXE_otagw-e2e-leaf-sim"))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three BLE leaves behind one adapter and one serial leaf, one notice each,
/// through mosquitto: all report 2.0.0, and with `max_connections = 1` the
/// BLE leaves' connections never overlap (the simulator's connection log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_upgrades_ble_leaves_one_connection_at_a_time_beside_a_serial_one() {
    test_log();
    const LIMIT: Duration = Duration::from_secs(240);
    let work = tempfile::tempdir().unwrap();
    let key = imgtool::keygen(work.path(), "ecdsa-p256");
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let signed = imgtool::sign(work.path(), &key, &payload, "2.0.0");
    let public_key = imgtool::public_key_hex(&key, "ecdsa-p256");
    let addresses = [
        "C0:00:00:00:00:11",
        "C0:00:00:00:00:12",
        "C0:00:00:00:00:13",
    ];
    let sim = ble_sim(
        &addresses
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{a},name=ble{i}"))
            .collect::<Vec<_>>(),
    )
    .await;
    let serial = PtySim::spawn(xmodem_device()).unwrap();

    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let smp_url = files.add("app.signed.bin", signed.clone());
    let xmodem_img = versioned_image(40_000, "2.0.0");
    let xmodem_url = files.add("fw.bin", xmodem_img.clone());
    let plugins = PluginsDir::with(&[artifacts::SMP, artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let mut leaves: Vec<LeafSpec> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            LeafSpec::smp(
                &format!("ble-{i}"),
                &format!("ble://{a}"),
                &[("public_key", &public_key)],
            )
        })
        .collect();
    leaves.push(LeafSpec::xmodem("serial-0", &serial.url()));
    let config = format!(
        "{}\n[ble]\nadapter = {:?}\nmax_connections = 1\n",
        gateway_config(data.path(), plugins.path(), Some(&broker.url()), &leaves),
        sim.adapter
    );
    let gw = Daemon::start(&config).await;
    let topic = |kind: &str, dn: &str| format!("/ota/device/{kind}/{LEAF_PK}/{dn}");
    let names: Vec<String> = leaves.iter().map(|l| l.device_name.clone()).collect();
    for (i, dn) in names.iter().enumerate() {
        probe
            .wait_until(LIMIT, "inform of 1.0.0", |m| {
                has_inform(m, &topic("inform", dn), "1.0.0")
            })
            .await;
        let (url, img) = if dn.starts_with("ble") {
            (&smp_url, &signed)
        } else {
            (&xmodem_url, &xmodem_img)
        };
        probe
            .publish(
                &topic("upgrade", dn),
                notice(100 + i as u64, "2.0.0", url, img),
            )
            .await;
    }
    probe
        .wait_until(LIMIT, "every leaf runs 2.0.0", |m| {
            names
                .iter()
                .all(|dn| has_inform(m, &topic("inform", dn), "2.0.0"))
        })
        .await;
    gw.stop().await;

    // Connection intervals from the simulator's log: never two at once.
    let events = sim.events.lock().unwrap().clone();
    let mut open: Option<String> = None;
    let mut connections = 0;
    for e in &events {
        match e["event"].as_str() {
            Some("connect") => {
                let dev = e["device"].as_str().unwrap_or_default().to_string();
                assert!(
                    open.is_none(),
                    "{dev} connected while {open:?} was: {events:?}"
                );
                open = Some(dev);
                connections += 1;
            }
            Some("disconnect") => open = None,
            _ => {}
        }
    }
    assert!(
        connections >= 6,
        "identify and flash each connect: {connections}"
    );
    assert_padded(&serial.handle().next_image().await.data, &xmodem_img, 0x1a);
    serial.shutdown().await;
}

/// `otagw ble scan` lists what advertises: each simulated peripheral with
/// its address and type, its name (marked when the advertisement carries
/// only a shortened one: Bumble's controller passes on no scan response
/// data) and the SMP service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ble_scan_lists_advertisers_with_names_and_services() {
    let sim = ble_sim(&[
        "C0:00:00:00:00:21,name=leaf1".to_string(),
        "C0:00:00:00:00:22,name=press-line-3-leaf".to_string(),
    ])
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .args(["ble", "scan", "--seconds", "2", "--json"])
        .args(["--ble-adapter", &sim.adapter])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let by_address = |a: &str| {
        found
            .iter()
            .find(|d| d["address"] == a)
            .unwrap_or_else(|| panic!("{a} not in {stdout}"))
    };
    for (address, name, shortened) in [
        ("C0:00:00:00:00:21", "leaf1", false),
        ("C0:00:00:00:00:22", "press-li", true),
    ] {
        let d = by_address(address);
        assert_eq!(d["name"], name, "{stdout}");
        assert_eq!(d["name_shortened"], shortened, "{stdout}");
        assert_eq!(d["addr_type"], "random", "{stdout}");
        assert_eq!(d["connectable"], true, "{stdout}");
        assert!(
            d["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "8d53dc1d-1db7-4cd3-868b-8a527460aa84"),
            "{stdout}"
        );
    }
    assert_eq!(found.len(), 2, "{stdout}");

    // The table a technician reads, and the hint when the adapter is missing.
    let out = Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .args(["ble", "scan", "--seconds", "1"])
        .args(["--ble-adapter", &sim.adapter])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ADDRESS"), "{table}");
    assert!(table.contains("press-li…"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("C0:00:00:00:00:21") && l.contains("smp (")),
        "{table}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
        .args(["ble", "scan"])
        .env_remove("OTAGW_BLE_ADAPTER")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ble-adapter"));
}

/// `otagw flash` of `img` to the simulated peripheral at `address`, with
/// extra plugin options; its exit status, stdout and stderr. Bounded: a
/// flash that never ends fails the test instead of hanging it.
async fn flash_over_ble(
    sim: &BleSim,
    address: &str,
    file: &std::path::Path,
    options: &[String],
) -> (bool, String, String) {
    let plugins = PluginsDir::with(&[artifacts::SMP]);
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"));
    cmd.arg("flash")
        .args(["--family", "smp", "--link", &format!("ble://{address}")])
        .args(["--ble-adapter", &sim.adapter, "--ble-timeout-secs", "5"])
        .args(["--plugins-dir", plugins.path().to_str().unwrap()])
        .args(["--cache-dir", cache.path().to_str().unwrap()])
        .args(["--image", file.to_str().unwrap()]);
    for o in options {
        cmd.args(["-o", o]);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.kill_on_drop(true).output())
        .await
        .expect("otagw flash ends")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A signed image for the fault tests: its file and the key option.
fn signed_image(dir: &std::path::Path, len: u32) -> (std::path::PathBuf, Vec<u8>, String) {
    let key = imgtool::keygen(dir, "ecdsa-p256");
    let payload: Vec<u8> = (0..len).map(|i| (i * 31 + i / 257) as u8).collect();
    let img = imgtool::sign(dir, &key, &payload, "2.0.0");
    let file = dir.join("fw-2.0.0.bin");
    std::fs::write(&file, &img).unwrap();
    let option = format!("public_key={}", imgtool::public_key_hex(&key, "ecdsa-p256"));
    (file, img, option)
}

/// The peripheral leaves radio range mid-upload (the simulator drops the
/// link as a supervision timeout would) and comes back: the gateway
/// connects again and the upload resumes from the offset the device holds,
/// not from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_mid_upload_resumes_from_the_device_offset() {
    let work = tempfile::tempdir().unwrap();
    let (file, img, key) = signed_image(work.path(), 160 * 1024);
    let slot0 = work.path().join("slot0.bin");
    let address = "C0:00:00:00:00:31";
    let sim = ble_sim(&[format!(
        "{address},out-of-range=65536,out-of-range-ms=700,slot0={}",
        slot0.display()
    )])
    .await;
    let (ok, stdout, stderr) = flash_over_ble(&sim, address, &file, &[key]).await;
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("resumed at offset"), "{stdout}");
    assert_eq!(&std::fs::read(&slot0).unwrap()[..img.len()], &img[..]);

    let events = sim.events.lock().unwrap().clone();
    let lost = events
        .iter()
        .position(|e| e["event"] == "disconnect" && e["why"] == "out_of_range")
        .unwrap_or_else(|| panic!("no out-of-range drop: {events:?}"));
    let before = events[..lost]
        .iter()
        .filter(|e| e["event"] == "upload")
        .map(|e| e["off"].as_u64().unwrap())
        .max()
        .unwrap();
    let after: Vec<u64> = events[lost..]
        .iter()
        .filter(|e| e["event"] == "upload")
        .map(|e| e["off"].as_u64().unwrap())
        .collect();
    assert!(before >= 60_000, "{before}");
    assert!(
        after.first().is_some_and(|o| *o >= before),
        "after reconnecting the device went on from {before}: {after:?}"
    );
    assert!(
        !events[lost..]
            .iter()
            .any(|e| e["event"] == "upload_started"),
        "the upload started over: {events:?}"
    );
}

/// A peripheral that resets and never comes back: -4 with the reason, once
/// reset_wait_ms has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peripheral_that_never_comes_back_fails_the_flash_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let (file, _img, key) = signed_image(work.path(), 16 * 1024);
    let address = "C0:00:00:00:00:32";
    let sim = ble_sim(&[format!("{address},no-return")]).await;
    let (ok, stdout, stderr) = flash_over_ble(
        &sim,
        address,
        &file,
        &[key, "reset_wait_ms=3000".to_string()],
    )
    .await;
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("(step -4)")
            && stderr.contains("reset_wait_ms = 3000")
            && stderr.contains("did not come back"),
        "{stderr}"
    );
    let events = sim.events.lock().unwrap().clone();
    assert!(events.iter().any(|e| e["event"] == "gone"), "{events:?}");
}

/// A tampered image fails verification (-3) before the gateway connects:
/// the peripheral sees no connection at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_image_fails_verify_without_a_connection() {
    let work = tempfile::tempdir().unwrap();
    let (file, mut img, key) = signed_image(work.path(), 16 * 1024);
    img[4096] ^= 0x01;
    std::fs::write(&file, &img).unwrap();
    let address = "C0:00:00:00:00:33";
    let sim = ble_sim(&[address.to_string()]).await;
    let (ok, stdout, stderr) = flash_over_ble(&sim, address, &file, &[key]).await;
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("(step -3)") && stderr.contains("verify"),
        "{stderr}"
    );
    let events = sim.events.lock().unwrap().clone();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "connect" || e["event"] == "hci_connected"),
        "{events:?}"
    );
}

/// An address nobody advertises, through `otagw flash`: -4 "not found"
/// once --ble-timeout-secs has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flashing_an_address_nobody_advertises_fails_not_found() {
    let work = tempfile::tempdir().unwrap();
    let (file, _img, key) = signed_image(work.path(), 4096);
    let sim = ble_sim(&["C0:00:00:00:00:34".to_string()]).await;
    let (ok, stdout, stderr) = flash_over_ble(&sim, "C0:00:00:00:00:99", &file, &[key]).await;
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("(step -4)") && stderr.contains("not found: nothing with this address"),
        "{stderr}"
    );
}

/// The BLE adapter's TCP port is closed: the BLE leaf's job fails -4 saying
/// the controller cannot be reached and what to check, and the serial leaf
/// beside it upgrades as if nothing happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_adapter_port_fails_ble_jobs_and_leaves_the_serial_leaf_alone() {
    const LIMIT: Duration = Duration::from_secs(120);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let work = tempfile::tempdir().unwrap();
    let (_file, signed, key) = signed_image(work.path(), 4096);
    let serial = PtySim::spawn(xmodem_device()).unwrap();
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let smp_url = files.add("app.signed.bin", signed.clone());
    let xmodem_img = versioned_image(20_000, "2.0.0");
    let xmodem_url = files.add("fw.bin", xmodem_img.clone());
    let plugins = PluginsDir::with(&[artifacts::SMP, artifacts::XMODEM]);
    let data = tempfile::tempdir().unwrap();
    let key_hex = key.trim_start_matches("public_key=").to_string();
    let leaves = [
        LeafSpec::smp(
            "ble-0",
            "ble://C0:00:00:00:00:41",
            &[("public_key", &key_hex)],
        ),
        LeafSpec::xmodem("serial-0", &serial.url()),
    ];
    let config = format!(
        "{}\n[ble]\nadapter = \"hci+tcp://127.0.0.1:{closed}\"\nconnect_timeout = \"3s\"\n",
        gateway_config(data.path(), plugins.path(), Some(&broker.url()), &leaves),
    );
    let gw = Daemon::start(&config).await;
    let topic = |kind: &str, dn: &str| format!("/ota/device/{kind}/{LEAF_PK}/{dn}");
    probe
        .wait_until(LIMIT, "the serial leaf's inform", |m| {
            has_inform(m, &topic("inform", "serial-0"), "1.0.0")
        })
        .await;
    probe
        .publish(
            &topic("upgrade", "ble-0"),
            notice(1, "2.0.0", &smp_url, &signed),
        )
        .await;
    probe
        .publish(
            &topic("upgrade", "serial-0"),
            notice(2, "2.0.0", &xmodem_url, &xmodem_img),
        )
        .await;
    probe
        .wait_until(
            LIMIT,
            "the BLE job fails, the serial leaf runs 2.0.0",
            |m| {
                has_inform(m, &topic("inform", "serial-0"), "2.0.0")
                    && has_step(m, &topic("progress", "ble-0"), "-4")
            },
        )
        .await;
    let failed = payloads(&probe, &topic("progress", "ble-0"));
    let desc = failed
        .iter()
        .find(|p| p["params"]["step"] == "-4")
        .map(|p| p["params"]["desc"].to_string())
        .unwrap();
    assert!(
        desc.contains(&format!(
            "cannot reach the HCI controller at 127.0.0.1:{closed}"
        )),
        "{desc}"
    );
    assert!(
        !probe
            .on(&topic("inform", "ble-0"))
            .iter()
            .any(|m| m.text().contains("2.0.0")),
        "nothing untrue about the BLE leaf"
    );
    gw.stop().await;
    assert_padded(&serial.handle().next_image().await.data, &xmodem_img, 0x1a);
    serial.shutdown().await;
}

/// An H4 UART controller (`hci+serial://`): the simulator's controller C0 on
/// a pseudo-terminal (Bumble's `pty:` transport), as an nRF52840 dongle with
/// Zephyr's hci_uart appears on /dev/ttyACM0. `otagw identify` finds the
/// peripheral through it and reads its version over SMP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hci_uart_adapter_reaches_a_peripheral() {
    let dir = tempfile::tempdir().unwrap();
    let tty = dir.path().join("hci-uart");
    let address = "C0:00:00:00:00:51";
    let sim = ble_sim_on(
        &format!("pty:{}", tty.display()),
        &[format!("{address},version=1.4.2")],
    )
    .await;
    assert!(sim.adapter.starts_with("hci+serial:///"), "{}", sim.adapter);
    let plugins = PluginsDir::with(&[artifacts::SMP]);
    let cache = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(env!("CARGO_BIN_EXE_otagw-e2e-gateway"))
            .arg("identify")
            .args(["--family", "smp", "--link", &format!("ble://{address}")])
            .args(["--ble-adapter", &sim.adapter, "--ble-timeout-secs", "10"])
            .args(["--plugins-dir", plugins.path().to_str().unwrap()])
            .args(["--cache-dir", cache.path().to_str().unwrap()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("identify ends")
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("version 1.4.2"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = sim.events.lock().unwrap().clone();
    assert!(events.iter().any(|e| e["event"] == "connect"), "{events:?}");
}
