//! Drives the simulator with an independent sender (`sender/`) over real links: a pty opened
//! with tokio-serial, the way the gateway opens it, and TCP on an ephemeral port.

mod sender;

use std::future::Future;
use std::time::Duration;

use otagw_leaf_sim::{Faults, Mode, Protocol, PtySim, Received, TcpSim, XmodemSimConfig};
use sender::{SendError, SendOpts, Sender};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_serial::SerialPortBuilderExt;

/// Upper bound for anything a test waits for.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn fast(cfg: XmodemSimConfig) -> XmodemSimConfig {
    XmodemSimConfig {
        poll_interval: Duration::from_millis(100),
        block_timeout: Duration::from_millis(300),
        ..cfg
    }
}

/// An image of `len` bytes with a version marker near the start.
fn image(len: usize, version: &str) -> Vec<u8> {
    let mut data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let marker = format!("FWVER:{version}\0");
    data[16..16 + marker.len()].copy_from_slice(marker.as_bytes());
    data
}

fn open_pty(sim: &PtySim) -> tokio_serial::SerialStream {
    tokio_serial::new(sim.path().to_string_lossy(), 115_200)
        .open_native_async()
        .expect("open the pty slave with tokio-serial")
}

async fn tcp(sim: &TcpSim) -> TcpStream {
    TcpStream::connect(sim.local_addr()).await.expect("connect")
}

async fn next_image(received: impl Future<Output = Received>) -> Received {
    within("the image", received).await
}

#[tokio::test]
async fn pty_xmodem_1k_crc_with_enter_and_version_commands() {
    let sim = PtySim::spawn(fast(XmodemSimConfig {
        enter_command: Some(b"update\r".to_vec()),
        version_command: Some(b"version\r".to_vec()),
        version: "1.0.0".into(),
        ..XmodemSimConfig::default()
    }))
    .unwrap();
    assert!(sim.url().starts_with("serial:///dev/pts/"));
    let mut s = Sender::new(open_pty(&sim), SendOpts::default());
    s.write(b"version\r").await.unwrap();
    assert_eq!(within("version", s.read_line()).await.unwrap(), "1.0.0\r\n");
    s.write(b"update\r").await.unwrap();
    let data = image(5000, "2.0.0");
    let sent = within("the transfer", s.xmodem(&data)).await.unwrap();
    assert!(sent.used_1k);
    let got = next_image(sim.handle().next_image()).await;
    assert_eq!(got.data, sent.padded, "XMODEM keeps the pad");
    assert_eq!(&got.data[..data.len()], &data[..]);
    assert_eq!((got.blocks, got.naks), (sent.transmissions, 0));
    assert_eq!(sim.handle().version(), "2.0.0");
    // Back in application mode with the new version.
    s.write(b"version\r").await.unwrap();
    assert_eq!(within("version", s.read_line()).await.unwrap(), "2.0.0\r\n");
    sim.shutdown().await;
}

#[tokio::test]
async fn pty_crc128_mode_forces_128_byte_blocks() {
    let sim = PtySim::spawn(fast(XmodemSimConfig {
        mode: Mode::Crc128,
        ..XmodemSimConfig::default()
    }))
    .unwrap();
    let mut s = Sender::new(open_pty(&sim), SendOpts::default());
    let data = image(1000, "1.1");
    let sent = within("the transfer", s.xmodem(&data)).await.unwrap();
    assert!(!sent.used_1k);
    let got = next_image(sim.handle().next_image()).await;
    assert_eq!(got.data, sent.padded);
    assert_eq!(got.blocks, 8);
    assert_eq!(got.naks, 1, "the one refused 1K block");
    sim.shutdown().await;
}

#[tokio::test]
async fn pty_can_be_closed_and_reopened_between_transfers() {
    let sim = PtySim::spawn(fast(XmodemSimConfig::default())).unwrap();
    for round in 0..3u8 {
        let mut s = Sender::new(open_pty(&sim), SendOpts::default());
        let data = vec![round; 300];
        let sent = within("the transfer", s.xmodem(&data)).await.unwrap();
        let got = next_image(sim.handle().next_image()).await;
        assert_eq!(got.data, sent.padded);
        drop(s); // closes the slave, as a gateway does after a job
    }
    assert!(!sim.is_dead());
    sim.shutdown().await;
}

#[tokio::test]
async fn tcp_checksum_mode() {
    let sim = TcpSim::bind(
        "127.0.0.1:0",
        fast(XmodemSimConfig {
            mode: Mode::Checksum,
            ..XmodemSimConfig::default()
        }),
    )
    .await
    .unwrap();
    assert!(sim.url().starts_with("tcp://127.0.0.1:"));
    let mut s = Sender::new(tcp(&sim).await, SendOpts::default());
    let data = image(700, "c");
    let sent = within("the transfer", s.xmodem(&data)).await.unwrap();
    assert!(!sent.used_1k, "checksum mode never takes 1K blocks");
    let got = next_image(sim.handle().next_image()).await;
    assert_eq!(got.data, sent.padded);
    assert_eq!(got.blocks, 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn tcp_ymodem_keeps_exactly_the_declared_size() {
    let sim = TcpSim::bind(
        "127.0.0.1:0",
        fast(XmodemSimConfig {
            protocol: Protocol::Ymodem,
            ..XmodemSimConfig::default()
        }),
    )
    .await
    .unwrap();
    let mut s = Sender::new(tcp(&sim).await, SendOpts::default());
    let data = image(3333, "3.3.3");
    within("the transfer", s.ymodem("fw.bin", &data))
        .await
        .unwrap();
    let got = next_image(sim.handle().next_image()).await;
    assert_eq!(got.data, data);
    assert_eq!(got.name.as_deref(), Some("fw.bin"));
    assert_eq!(got.declared_size, Some(3333));
    assert_eq!(sim.handle().version(), "3.3.3");
    sim.shutdown().await;
}

#[tokio::test]
async fn pty_ymodem() {
    let sim = PtySim::spawn(fast(XmodemSimConfig {
        protocol: Protocol::Ymodem,
        ..XmodemSimConfig::default()
    }))
    .unwrap();
    let mut s = Sender::new(open_pty(&sim), SendOpts::default());
    let data = image(1500, "y");
    within("the transfer", s.ymodem("a.bin", &data))
        .await
        .unwrap();
    assert_eq!(next_image(sim.handle().next_image()).await.data, data);
    sim.shutdown().await;
}

/// Runs one XMODEM transfer of 4 KiB (32 blocks of 128 bytes) against a TCP device with `faults`.
async fn tcp_with_faults(faults: Faults) -> (TcpSim, Result<sender::Sent, SendError>, Vec<u8>) {
    let sim = TcpSim::bind(
        "127.0.0.1:0",
        fast(XmodemSimConfig {
            faults,
            ..XmodemSimConfig::default()
        }),
    )
    .await
    .unwrap();
    let opts = SendOpts {
        use_1k: false,
        answer_timeout: Duration::from_secs(1),
        retries: 3,
    };
    let mut s = Sender::new(tcp(&sim).await, opts);
    let data = image(4096, "f");
    let result = within("the transfer", s.xmodem(&data)).await;
    (sim, result, data)
}

#[tokio::test]
async fn recoverable_faults_cost_one_nak_each() {
    for faults in ["drop=2:10", "corrupt=3", "nak=1", "drop=4:2000"] {
        let (sim, result, data) = tcp_with_faults(faults.parse().unwrap()).await;
        let sent = result.unwrap_or_else(|e| panic!("{faults}: {e:?}"));
        let got = next_image(sim.handle().next_image()).await;
        assert_eq!(got.data, data, "{faults}");
        assert_eq!((got.blocks, got.naks, sent.naks), (32, 1, 1), "{faults}");
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn cancel_fault_sends_can_can() {
    let (sim, result, _) = tcp_with_faults("cancel=2".parse().unwrap()).await;
    assert_eq!(result.unwrap_err(), SendError::Cancelled);
    let reason = within("the abort", sim.handle().next_abort()).await;
    assert!(reason.contains("cancelled after block 2"), "{reason}");
    assert_eq!(sim.handle().images_received(), 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn stall_fault_goes_silent_then_a_new_connection_works() {
    let (sim, result, _) = tcp_with_faults("stall=1".parse().unwrap()).await;
    assert!(matches!(result, Err(SendError::Timeout(_))), "{result:?}");
    let reason = within("the abort", sim.handle().next_abort()).await;
    assert!(reason.contains("stalled after block 1"), "{reason}");
    // The fault fired once; a new connection (a retry) gets a working device.
    let mut s = Sender::new(tcp(&sim).await, SendOpts::default());
    within("the transfer", s.xmodem(&[1; 200])).await.unwrap();
    next_image(sim.handle().next_image()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn tcp_disconnect_fault_closes_the_connection() {
    let (sim, result, _) = tcp_with_faults("disconnect=2".parse().unwrap()).await;
    assert!(matches!(result, Err(SendError::Link(_))), "{result:?}");
    let reason = within("the abort", sim.handle().next_abort()).await;
    assert!(reason.contains("disconnected after block 2"), "{reason}");
    let mut s = Sender::new(tcp(&sim).await, SendOpts::default());
    within("the transfer", s.xmodem(&[2; 2000])).await.unwrap();
    next_image(sim.handle().next_image()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn pty_disconnect_fault_closes_the_master() {
    let sim = PtySim::spawn(fast(XmodemSimConfig {
        faults: "disconnect=1".parse().unwrap(),
        ..XmodemSimConfig::default()
    }))
    .unwrap();
    let opts = SendOpts {
        answer_timeout: Duration::from_millis(500),
        retries: 2,
        ..SendOpts::default()
    };
    let mut s = Sender::new(open_pty(&sim), opts);
    let result = within("the transfer", s.xmodem(&[3; 3000])).await;
    assert!(result.is_err(), "{result:?}");
    within("the pty to die", sim.dead()).await;
    assert!(sim.is_dead());
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_devices() {
    let tcp_sim = TcpSim::bind("127.0.0.1:0", XmodemSimConfig::default())
        .await
        .unwrap();
    let addr = tcp_sim.local_addr();
    let _conn = tcp(&tcp_sim).await;
    within("the tcp shutdown", tcp_sim.shutdown()).await;
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");

    let pty = PtySim::spawn(XmodemSimConfig::default()).unwrap();
    let path = pty.path().to_owned();
    within("the pty shutdown", pty.shutdown()).await;
    assert!(!path.exists(), "the pty is gone once the master is closed");

    let pty = PtySim::spawn(XmodemSimConfig::default()).unwrap();
    let path = pty.path().to_owned();
    drop(pty);
    // Dropping aborts the task; the master closes as soon as the runtime drops the task.
    within("the dropped pty to disappear", async {
        while path.exists() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}
