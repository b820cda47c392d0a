//! Links refuse what they cannot do with a clear error, never a panic.

use std::time::Duration;

use otagw::link::{Link, LinkError, Parity, SerialConfig};
use otagw_e2e::*;

#[tokio::test]
async fn a_pty_refuses_even_parity_and_modem_lines_but_keeps_working() {
    let sim = PtySim::spawn(XmodemSimConfig {
        enter_command: Some(b"x".to_vec()),
        version_command: Some(b"v".to_vec()),
        version: "3.2.1".into(),
        ..Default::default()
    })
    .unwrap();
    let mut link = Link::open(&sim.url()).await.expect("open the pty");
    let even = SerialConfig {
        parity: Parity::Even,
        ..SerialConfig::default()
    };
    let err = link.configure(&even).expect_err("a pty has no parity");
    assert!(matches!(err, LinkError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("115200 8E1"), "{err}");
    let err = link
        .set_lines(true, false)
        .expect_err("a pty has no DTR/RTS");
    assert!(matches!(err, LinkError::Unsupported { .. }), "{err:?}");
    link.configure(&SerialConfig::default())
        .expect("8N1 is fine");

    // Still usable afterwards.
    link.write(b"v").await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        let chunk = link.read(64, Duration::from_secs(5)).await.unwrap();
        assert!(!chunk.is_empty(), "the device answers");
        got.extend(chunk);
    }
    assert_eq!(got, b"3.2.1\r\n");
    sim.shutdown().await;
}

#[tokio::test]
async fn tcp_links_have_no_serial_settings_and_report_a_closed_peer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut link = Link::open(&format!("tcp://{addr}")).await.unwrap();
    let (peer, _) = listener.accept().await.unwrap();
    assert!(matches!(
        link.configure(&SerialConfig::default()),
        Err(LinkError::Unsupported { .. })
    ));
    assert!(
        link.read(1, Duration::from_millis(10))
            .await
            .unwrap()
            .is_empty(),
        "timeout = empty"
    );
    drop(peer);
    let err = link
        .read(1, Duration::from_secs(10))
        .await
        .expect_err("closed");
    assert!(matches!(err, LinkError::Closed { .. }), "{err:?}");
}

#[tokio::test]
async fn opening_a_missing_port_or_dead_server_says_which() {
    let err = Link::open("serial:///dev/does-not-exist")
        .await
        .expect_err("no such port");
    assert!(err.to_string().contains("/dev/does-not-exist"), "{err}");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = Link::open(&format!("tcp://{addr}"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains(&addr.port().to_string()), "{err}");
}
