//! Contract 0.2 through the real host and a real plugin component
//! (`tests/plugins/gatt-probe`, built with the SDK): GATT access on a BLE link
//! (a fake peripheral behind the gateway's `Transport` + `GattLink` traits:
//! no radio exists here), `link.reopen` against a device that drops its
//! serial port on reset and brings it back under the same path, options
//! checked against the schema before the plugin runs, and 0.1 and 0.2
//! plugins side by side.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use otagw::link::gatt::{GattError, GattFuture, GattLink, GattValue, Uuid, parse_uuid};
use otagw::link::{Link, LinkKind, Transport};
use otagw::plugin::{FlashError, JobMeta, PluginError};
use otagw_e2e::*;
use otagw_leaf_sim::transport::{Device, SessionEnd, UnreadProbe};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio_util::sync::CancellationToken;

const CONTROL: &str = "8ec90001-f315-4f60-9fb8-838830daea50";
const PACKET: &str = "8ec90002-f315-4f60-9fb8-838830daea50";
const REVISION: &str = "2a26";
/// The ATT payload of the fake connection: small, so the image goes in many pieces.
const MTU: u32 = 20;

/// What the fake peripheral saw and holds.
#[derive(Debug, Default)]
struct Peripheral {
    subscribed: bool,
    indications: VecDeque<GattValue>,
    expected: u32,
    received: Vec<u8>,
    pieces: Vec<usize>,
    executed: bool,
    writes: usize,
}

/// A BLE peripheral speaking the probe's miniature DFU, behind the same
/// traits as a real BLE transport. Its default characteristic carries
/// nothing: reads wait, writes vanish.
struct FakeBle(Arc<Mutex<Peripheral>>);

fn uuid(text: &str) -> Uuid {
    parse_uuid(text).unwrap()
}

impl Peripheral {
    fn indicate(&mut self, data: Vec<u8>) {
        if self.subscribed {
            self.indications.push_back(GattValue {
                characteristic: uuid(CONTROL),
                data,
            });
        }
    }

    fn write(&mut self, c: Uuid, data: &[u8], with_response: bool) -> Result<(), GattError> {
        self.writes += 1;
        if c == uuid(CONTROL) {
            if !with_response {
                return Err(GattError::Invalid(
                    "the control point needs a write request".into(),
                ));
            }
            match data {
                [0x01, size @ ..] if size.len() == 4 => {
                    self.expected = u32::from_le_bytes(size.try_into().unwrap());
                    self.received.clear();
                    self.indicate(vec![0x60, 0x01, 0x01]);
                }
                [0x03] => {
                    let sum = self
                        .received
                        .iter()
                        .fold(0u32, |a, b| a.wrapping_add(u32::from(*b)));
                    let mut answer = vec![0x60, 0x03, 0x01];
                    answer.extend_from_slice(&(self.received.len() as u32).to_le_bytes());
                    answer.extend_from_slice(&sum.to_le_bytes());
                    self.indicate(answer);
                }
                [0x04] => {
                    self.executed = self.received.len() as u32 == self.expected;
                    self.indicate(vec![0x60, 0x04, 0x01]);
                }
                other => return Err(GattError::Invalid(format!("opcode {other:02x?}"))),
            }
            Ok(())
        } else if c == uuid(PACKET) {
            if with_response {
                return Err(GattError::Invalid("packets go without response".into()));
            }
            self.pieces.push(data.len());
            self.received.extend_from_slice(data);
            Ok(())
        } else {
            Err(GattError::NotFound(c.to_string()))
        }
    }
}

impl GattLink for FakeBle {
    fn write<'a>(&'a mut self, c: Uuid, data: &'a [u8], with_response: bool) -> GattFuture<'a, ()> {
        let r = self.0.lock().unwrap().write(c, data, with_response);
        Box::pin(async move { r })
    }

    fn read(&mut self, c: Uuid) -> GattFuture<'_, Vec<u8>> {
        let p = self.0.lock().unwrap();
        let r = if c == uuid(REVISION) {
            Ok(if p.executed {
                b"2.0.0".to_vec()
            } else {
                b"1.0.0".to_vec()
            })
        } else {
            Err(GattError::NotFound(c.to_string()))
        };
        Box::pin(async move { r })
    }

    fn subscribe(&mut self, c: Uuid, indicate: bool) -> GattFuture<'_, ()> {
        let r = if c == uuid(CONTROL) && indicate {
            self.0.lock().unwrap().subscribed = true;
            Ok(())
        } else {
            Err(GattError::Invalid(format!(
                "{c} cannot be subscribed that way"
            )))
        };
        Box::pin(async move { r })
    }

    fn unsubscribe(&mut self, c: Uuid) -> GattFuture<'_, ()> {
        if c == uuid(CONTROL) {
            self.0.lock().unwrap().subscribed = false;
        }
        Box::pin(async { Ok(()) })
    }

    fn receive(&mut self, timeout: Duration) -> GattFuture<'_, Option<GattValue>> {
        let next = self.0.lock().unwrap().indications.pop_front();
        Box::pin(async move {
            if next.is_none() {
                tokio::time::sleep(timeout).await;
            }
            Ok(next)
        })
    }
}

impl AsyncRead for FakeBle {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for FakeBle {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for FakeBle {
    fn gatt(&mut self) -> Option<&mut dyn GattLink> {
        Some(self)
    }
}

fn ble_link() -> (Link, Arc<Mutex<Peripheral>>) {
    let p = Arc::new(Mutex::new(Peripheral::default()));
    let link = Link::new(
        "ble://fake".into(),
        LinkKind::Ble,
        MTU,
        Box::new(FakeBle(p.clone())),
    );
    (link, p)
}

fn meta(options: &[(&str, &str)]) -> JobMeta {
    JobMeta {
        version: Some("2.0.0".into()),
        module: "default".into(),
        options: opts(options),
    }
}

#[tokio::test]
async fn a_plugin_flashes_over_two_gatt_characteristics_and_reads_a_third() {
    let dir = PluginsDir::with(&[artifacts::GATT_PROBE]);
    let host = host_with(&dir, None).await;
    let img = image(1000, 3);
    for style in ["lower", "upper"] {
        let (link, peripheral) = ble_link();
        let mut s = host.session("gatt-probe", None).await.unwrap();
        let (link, r) = s
            .flash(link, source(&img), &meta(&[("uuid_style", style)]))
            .await;
        // The probe checks each indication is tagged exactly as it subscribed.
        let report = r.unwrap_or_else(|e| panic!("{style}: {e}"));
        assert_eq!(report.bytes_sent, 1000);
        {
            let p = peripheral.lock().unwrap();
            assert_eq!(p.received, img, "{style}");
            assert!(
                p.pieces.iter().all(|n| *n <= MTU as usize),
                "{:?}",
                p.pieces
            );
            assert_eq!(p.pieces.len(), 50);
            assert!(p.executed);
        }
        let (_, info) = s.identify(link, &opts(&[("uuid_style", style)])).await;
        let info = info.unwrap();
        assert_eq!(info.version, "2.0.0");
        assert_eq!(info.hardware_id.as_deref(), Some("probe-1"));
    }
}

#[tokio::test]
async fn gatt_on_a_byte_stream_is_refused_by_the_host() {
    let dir = PluginsDir::with(&[artifacts::GATT_PROBE]);
    let host = host_with(&dir, None).await;
    let sim = PtySim::spawn(XmodemSimConfig::default()).unwrap();
    let link = Link::open(&sim.url()).await.unwrap();
    let mut s = host.session("gatt-probe", None).await.unwrap();
    let (_, r) = s.flash(link, source(&image(100, 1)), &meta(&[])).await;
    match r {
        Err(PluginError::Failed {
            error: FlashError::Unsupported(why),
            ..
        }) => {
            assert!(
                why.contains("only Bluetooth LE links have characteristics"),
                "{why}"
            );
        }
        other => panic!("expected the host's refusal, got {other:?}"),
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn bad_options_are_refused_before_the_plugin_or_the_device_sees_them() {
    let dir = PluginsDir::with(&[artifacts::GATT_PROBE]);
    let host = host_with(&dir, None).await;
    for (options, expect) in [
        (vec![("uuid-styel", "lower")], "did you mean `uuid_style`"),
        (vec![("uuid_style", "uper")], "`uuid_style`"),
        (vec![("reopen_ms", "2h")], "`reopen_ms`"),
        (vec![("reopen_ms", "é")], "`reopen_ms`"),
    ] {
        let (link, peripheral) = ble_link();
        let mut s = host.session("gatt-probe", None).await.unwrap();
        let (_, r) = s.flash(link, source(&image(100, 1)), &meta(&options)).await;
        let e = r.expect_err("bad options");
        assert!(matches!(e, PluginError::Options { .. }), "{e}");
        assert_eq!(e.step_code(), -1);
        let text = e.to_string();
        assert!(text.contains(expect), "{options:?}: {text}");
        assert!(text.contains("nothing was sent to the device"), "{text}");
        assert_eq!(peripheral.lock().unwrap().writes, 0, "{options:?}");
    }
}

/// A device on a USB-CDC port that re-enumerates on reset: on `reset` it
/// removes its port's path and closes its pty; the test then brings it back
/// (a new pty) under the same path, answering `version` with 2.0.0.
#[derive(Debug, Clone)]
struct Reenumerating {
    path: PathBuf,
    version: &'static str,
}

impl Device for Reenumerating {
    fn serve_session<S>(
        &self,
        io: S,
        cancel: &CancellationToken,
        _unread: Option<&UnreadProbe>,
    ) -> impl Future<Output = SessionEnd> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let me = self.clone();
        let cancel = cancel.clone();
        async move {
            let mut lines = BufReader::new(io);
            let mut line = String::new();
            loop {
                line.clear();
                let n = tokio::select! {
                    n = lines.read_line(&mut line) => n,
                    () = cancel.cancelled() => return SessionEnd::Shutdown,
                };
                match (n, line.trim()) {
                    (Ok(0), _) => return SessionEnd::PeerClosed,
                    (Err(e), _) => return SessionEnd::LinkError(e),
                    (Ok(_), "reset") => {
                        let _ = std::fs::remove_file(&me.path);
                        return SessionEnd::Disconnected;
                    }
                    (Ok(_), "version") => {
                        let answer = format!("{}\n", me.version);
                        if let Err(e) = lines.get_mut().write_all(answer.as_bytes()).await {
                            return SessionEnd::LinkError(e);
                        }
                    }
                    (Ok(_), _) => {}
                }
            }
        }
    }

    fn housekeeping_interval(&self) -> Duration {
        Duration::from_millis(200)
    }
}

#[tokio::test]
async fn reopen_waits_for_a_port_that_goes_away_and_comes_back() {
    let dir = PluginsDir::with(&[artifacts::GATT_PROBE]);
    let host = host_with(&dir, None).await;
    let ports = tempfile::tempdir().unwrap();
    let path = ports.path().join("ttyACM-leaf");
    let before = PtySim::spawn_device(Reenumerating {
        path: path.clone(),
        version: "1.0.0",
    })
    .unwrap();
    std::os::unix::fs::symlink(before.path(), &path).unwrap();

    let link = Link::open(&format!("serial://{}", path.display()))
        .await
        .unwrap();
    let mut s = host.session("gatt-probe", None).await.unwrap();
    let job_meta = meta(&[("mode", "reset"), ("reopen_ms", "20s")]);
    let job = s.flash(link, source(&image(10, 1)), &job_meta);
    let device = async {
        // The device resets: its port goes away...
        before.dead().await;
        assert!(!path.exists(), "the old port's path is gone");
        // ...and comes back as another pty under the same name.
        let after = PtySim::spawn_device(Reenumerating {
            path: path.clone(),
            version: "2.0.0",
        })
        .unwrap();
        std::os::unix::fs::symlink(after.path(), &path).unwrap();
        after
    };
    let ((_, r), after) = tokio::join!(job, device);
    let report = r.expect("the job goes on after the port came back");
    assert_eq!(report.summary, "back as 2.0.0");
    after.shutdown().await;
}

#[tokio::test]
async fn reopen_gives_up_when_the_device_does_not_come_back() {
    let dir = PluginsDir::with(&[artifacts::GATT_PROBE]);
    let host = host_with(&dir, None).await;
    let ports = tempfile::tempdir().unwrap();
    let path = ports.path().join("ttyACM-gone");
    let sim = PtySim::spawn_device(Reenumerating {
        path: path.clone(),
        version: "1.0.0",
    })
    .unwrap();
    std::os::unix::fs::symlink(sim.path(), &path).unwrap();
    let link = Link::open(&format!("serial://{}", path.display()))
        .await
        .unwrap();
    let mut s = host.session("gatt-probe", None).await.unwrap();
    let (_, r) = s
        .flash(
            link,
            source(&image(10, 1)),
            &meta(&[("mode", "reset"), ("reopen_ms", "300")]),
        )
        .await;
    match r {
        Err(PluginError::Failed {
            error: FlashError::Timeout(why),
            ..
        }) => {
            assert!(why.contains("did not come back within 300 ms"), "{why}");
        }
        other => panic!("expected a reopen timeout, got {other:?}"),
    }
    sim.shutdown().await;
}

/// A contract 0.1 plugin (`xmodem-v01`, built from `wit/v0.1.0`) and a 0.2
/// family (`xmodem`, built with the SDK) upgrade their leaves side by side
/// in one daemon, through a real broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_0_1_plugin_and_a_0_2_family_upgrade_leaves_side_by_side() {
    const LIMIT: Duration = Duration::from_secs(120);
    let broker = Mosquitto::start().await;
    let probe = MqttProbe::connect(broker.port(), "#").await;
    let files = FileServer::start().await;
    let plugins = PluginsDir::with(&[artifacts::XMODEM, artifacts::LEGACY_V01]);
    let data = tempfile::tempdir().unwrap();
    let sims = [
        PtySim::spawn(xmodem_device()).unwrap(),
        PtySim::spawn(xmodem_device()).unwrap(),
    ];
    let mut old = LeafSpec::xmodem("old", &sims[0].url());
    old.family = "xmodem-v01".into();
    let new = LeafSpec::xmodem("new", &sims[1].url());
    let config = gateway_config(
        data.path(),
        plugins.path(),
        Some(&broker.url()),
        &[old, new],
    );
    let gw = Daemon::start(&config).await;

    let topic = |kind: &str, dn: &str| format!("/ota/device/{kind}/{LEAF_PK}/{dn}");
    let img = versioned_image(50_000, "2.0.0");
    let url = files.add("fw.bin", img.clone());
    for (i, dn) in ["old", "new"].iter().enumerate() {
        probe
            .wait_until(LIMIT, "inform of 1.0.0", |m| {
                has_inform(m, &topic("inform", dn), "1.0.0")
            })
            .await;
        probe
            .publish(
                &topic("upgrade", dn),
                notice(10 + i as u64, "2.0.0", &url, &img),
            )
            .await;
    }
    probe
        .wait_until(LIMIT, "both leaves run 2.0.0", |m| {
            ["old", "new"]
                .iter()
                .all(|dn| has_inform(m, &topic("inform", dn), "2.0.0"))
        })
        .await;
    for sim in &sims {
        assert_padded(&sim.handle().next_image().await.data, &img, 0x1a);
        assert_eq!(sim.handle().version(), "2.0.0");
    }
    let devices = gw.api_get("/api/devices").await;
    for d in devices.as_array().unwrap() {
        assert_eq!(d["state"], "succeeded", "{d}");
    }
    gw.stop().await;
    for sim in sims {
        sim.shutdown().await;
    }
}
