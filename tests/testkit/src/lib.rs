//! Real parts for otagw's tests (CONVENTIONS 12), shared by the gateway's own
//! tests and the end-to-end harness: a mosquitto broker process on a loopback
//! port ([`Mosquitto`]), an HTTP file server with Range support, request
//! records and fault injection ([`FileServer`]), an MQTT client that
//! records everything it sees ([`MqttProbe`]), and a strict double of the
//! Alibaba Cloud IoT platform for a gateway and its sub-devices
//! ([`AliyunPlatform`], on a [`Mosquitto::start_with_log_topic`] broker).
//!
//! Each part stops when dropped. Nothing here sleeps to synchronise: waits are
//! on events, with a timeout as the upper bound.

mod files;
mod mosquitto;
pub mod platform;
mod probe;
mod tls;

pub use files::{Fault, FileServer, Request};
pub use mosquitto::Mosquitto;
pub use platform::{AliyunPlatform, Identity, PlatformEvent, PlatformOptions, Violation};
pub use probe::{Message, MqttProbe};
pub use tls::make_certs;

/// A free TCP port on 127.0.0.1 (bound and released; programs that cannot
/// report the port they bound, like mosquitto, get it this way).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The md5 of `bytes`, lowercase hex, computed by the `md5sum` tool so tests
/// do not check the gateway's hashing with the gateway's own code.
pub fn md5_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run md5sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feed md5sum");
    let out = child.wait_with_output().expect("md5sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum prints a digest")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn probe_sees_what_is_published_through_mosquitto_across_a_restart() {
        let mut broker = Mosquitto::start().await;
        let probe = MqttProbe::connect(broker.port(), "#").await;
        probe.publish("a/b", "one").await;
        probe
            .wait_until(Duration::from_secs(10), "one", |m| {
                m.iter().any(|m| m.text() == "one")
            })
            .await;
        broker.restart().await;
        let again = MqttProbe::connect(broker.port(), "#").await;
        again.publish("a/b", "two").await;
        again
            .wait_until(Duration::from_secs(10), "two", |m| {
                m.iter().any(|m| m.text() == "two")
            })
            .await;
        assert_eq!(again.on("a/b").len(), 1);
    }

    #[tokio::test]
    async fn file_server_serves_ranges_and_records_requests() {
        let fs = FileServer::start().await;
        let url = fs.add("fw.bin", (0..=255u8).collect::<Vec<_>>());
        let mut s = tokio::net::TcpStream::connect(
            url.trim_start_matches("http://").split('/').next().unwrap(),
        )
        .await
        .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            b"GET /fw.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=250-\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 206"), "{text}");
        assert!(resp.ends_with(&[250, 251, 252, 253, 254, 255]));
        assert_eq!(
            fs.requests("fw.bin"),
            vec![Request {
                path: "fw.bin".into(),
                range: Some("bytes=250-".into()),
                status: 206
            }]
        );
    }
}
