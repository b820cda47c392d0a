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
