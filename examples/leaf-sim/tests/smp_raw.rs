//! The SMP device with raw framing (the Bluetooth LE form: header + CBOR, no console framing)
//! over TCP, driven by a raw client written here from the SMP specification: requests cut into
//! small writes as ATT writes cut them, answers reassembled by the header's length. The CBOR
//! and MCUboot helpers come from the independent `smp_client/`. The last test runs the
//! `leaf-sim` binary itself (`smp --raw-tcp`, `--json-events`, `--slot0-out`), as the BLE
//! simulator (`examples/ble-sim`) does.

#[allow(dead_code)] // the console client and some helpers are for `smp.rs`
mod smp_client;

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use minicbor::Decoder;
use otagw_leaf_sim::smp::{Boot, ResetCause, Swap};
use otagw_leaf_sim::{SmpEvent, SmpFaults, SmpFraming, SmpHandle, SmpSimConfig, TcpSim};
use smp_client::{Req, V, mcuboot_image, upload_body};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Upper bound for anything a test waits for.
const LIMIT: Duration = Duration::from_secs(20);
/// Bytes per write: what one ATT write carries at the default ATT MTU of 23.
const WRITE: usize = 20;
/// Image bytes per upload request: the packet stays under an ATT MTU of 247, as a central
/// that sends one request per write would size it.
const CHUNK: usize = 160;

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn config(faults: SmpFaults) -> SmpSimConfig {
    SmpSimConfig {
        version: "1.0.0".into(),
        boot_time: Duration::from_millis(50),
        faults,
        framing: SmpFraming::Raw,
        ..SmpSimConfig::default()
    }
}

/// An SMP packet: the 8-byte header (SMP v2) and the body.
fn packet(op: u8, group: u16, id: u8, seq: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08 | op, 0];
    p.extend_from_slice(&(body.len() as u16).to_be_bytes());
    p.extend_from_slice(&group.to_be_bytes());
    p.extend_from_slice(&[seq, id]);
    p.extend_from_slice(body);
    p
}

/// An answer: the raw packet and its decoded parts.
#[derive(Debug)]
struct Answer {
    raw: Vec<u8>,
    op: u8,
    group: u16,
    seq: u8,
    id: u8,
    body: V,
}

/// A raw SMP client over a byte stream.
struct RawClient<S> {
    io: S,
    seq: u8,
    /// Bytes per write.
    write: usize,
}

impl<S: AsyncRead + tokio::io::AsyncWrite + Unpin> RawClient<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            seq: 0,
            write: WRITE,
        }
    }

    /// Writes `bytes` in writes of at most `self.write` bytes.
    async fn raw(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(self.write) {
            self.io.write_all(piece).await.unwrap();
            self.io.flush().await.unwrap();
        }
    }

    async fn send(&mut self, op: u8, group: u16, id: u8, body: &[u8]) -> u8 {
        self.seq = self.seq.wrapping_add(1);
        let p = packet(op, group, id, self.seq, body);
        self.raw(&p).await;
        self.seq
    }

    /// The next answer; `None` at the end of the session.
    async fn receive(&mut self) -> Option<Answer> {
        let mut header = [0u8; 8];
        match self.io.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => panic!("reading an answer: {e}"),
        }
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let mut body = vec![0u8; len];
        self.io.read_exact(&mut body).await.unwrap();
        let mut raw = header.to_vec();
        raw.extend_from_slice(&body);
        Some(Answer {
            raw,
            op: header[0] & 7,
            group: u16::from_be_bytes([header[4], header[5]]),
            seq: header[6],
            id: header[7],
            body: smp_client::decode(&mut Decoder::new(&body)),
        })
    }

    async fn call(&mut self, op: u8, group: u16, id: u8, body: &[u8]) -> V {
        let seq = self.send(op, group, id, body).await;
        let a = within("an answer", self.receive())
            .await
            .expect("the session ended");
        assert_eq!(
            (a.op, a.group, a.seq, a.id),
            (op + 1, group, seq, id),
            "{a:?}"
        );
        assert_eq!(a.raw[0] >> 3 & 3, 1, "the answer keeps SMP v2");
        a.body
    }

    /// Waits for the end of the session (the device reset).
    async fn end(&mut self) {
        let mut rest = Vec::new();
        within("the end of the session", self.io.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(rest.is_empty(), "bytes after the last answer: {rest:?}");
    }
}

/// Reads one console-framed packet (frames of base64 of length + packet + CRC) and returns
/// the SMP packet inside.
async fn console_packet(io: &mut TcpStream) -> Vec<u8> {
    use base64::Engine as _;
    let mut io = BufReader::new(io);
    let mut decoded = Vec::new();
    loop {
        let mut line = Vec::new();
        io.read_until(b'\n', &mut line).await.unwrap();
        assert!(line.len() > 3, "console line {line:?}");
        let text = &line[2..line.len() - 1];
        decoded.extend(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap(),
        );
        let total = usize::from(u16::from_be_bytes([decoded[0], decoded[1]]));
        if decoded.len() >= 2 + total {
            let packet = decoded[2..total].to_vec();
            assert_eq!(
                smp_client::crc16(&packet).to_be_bytes(),
                decoded[total..2 + total]
            );
            return packet;
        }
    }
}

async fn connect(sim: &TcpSim<SmpHandle>) -> RawClient<TcpStream> {
    let stream = TcpStream::connect(sim.local_addr()).await.unwrap();
    stream.set_nodelay(true).unwrap();
    RawClient::new(stream)
}

/// Uploads `image` from `off` to the end; returns the last answer.
async fn upload_from<S>(c: &mut RawClient<S>, image: &[u8], mut off: usize) -> V
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let a = c.call(2, 1, 1, &upload_body(image, off, CHUNK)).await;
        assert_eq!(a.u("rc"), None, "upload at {off}: {a:?}");
        off = a.u("off").expect("off") as usize;
        if off == image.len() {
            return a;
        }
    }
}

fn slot(images: &[V], n: u64) -> &V {
    images
        .iter()
        .find(|i| i.u("slot") == Some(n))
        .unwrap_or_else(|| panic!("no slot {n} in {images:?}"))
}

async fn event_where(h: &SmpHandle, what: &str, pred: impl Fn(&SmpEvent) -> bool) -> SmpEvent {
    within(what, async {
        loop {
            let e = h.next_event().await;
            if pred(&e) {
                return e;
            }
        }
    })
    .await
}

#[tokio::test]
async fn packets_split_across_writes_are_reassembled_and_answered_byte_for_byte() {
    let sim = TcpSim::bind_smp("127.0.0.1:0", config(SmpFaults::default()))
        .await
        .unwrap();
    let h = sim.handle().clone();
    let mut c = connect(&sim).await;
    // Writes of 1 to 20 bytes.
    for write in [1, 3, 7, WRITE] {
        c.write = write;
        let text = format!("split in {write}");
        let a = c.call(2, 0, 0, &Req::map(1).t("d", &text).done()).await;
        assert_eq!(a.text("r"), Some(text.as_str()));
    }
    // Two packets in one write: two answers, in order.
    c.write = 4096;
    let mut two = packet(2, 0, 0, 101, &Req::map(1).t("d", "one").done());
    two.extend(packet(2, 0, 0, 102, &Req::map(1).t("d", "two").done()));
    c.raw(&two).await;
    for (seq, text) in [(101, "one"), (102, "two")] {
        let a = within("an answer", c.receive()).await.unwrap();
        assert_eq!((a.seq, a.body.text("r")), (seq, Some(text)));
    }
    // A packet over the 1024-byte buffer is dropped whole (its body skipped by its length):
    // the next request's answer is the next thing on the link.
    c.write = WRITE;
    c.send(2, 0, 0, &Req::map(1).t("d", &"x".repeat(1100)).done())
        .await;
    assert_eq!(
        c.call(2, 0, 0, &Req::map(1).t("d", "after").done())
            .await
            .text("r"),
        Some("after")
    );
    assert_eq!(h.dropped_packets(), 1);

    // The answers are, byte for byte, the SMP packets the console transport carries inside
    // its framing (same request, same device settings).
    let console = TcpSim::bind_smp(
        "127.0.0.1:0",
        SmpSimConfig {
            framing: SmpFraming::Console,
            ..config(SmpFaults::default())
        },
    )
    .await
    .unwrap();
    let mut serial = TcpStream::connect(console.local_addr()).await.unwrap();
    let echo = Req::map(1).t("d", "same").done();
    for (seq, (op, group, id, body)) in [
        (0u8, 1u16, 0u8, &[][..]),
        (0, 0, 6, &[]),
        (2, 0, 42, &[]),
        (2, 0, 0, &echo[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let p = packet(op, group, id, seq as u8, body);
        c.raw(&p).await;
        let raw = within("the raw answer", c.receive()).await.unwrap();
        serial.write_all(&smp_client::frames(&p)).await.unwrap();
        let framed = within("the console answer", console_packet(&mut serial)).await;
        assert_eq!(raw.raw, framed, "({group}, {id})");
    }
    console.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn flash_over_raw_sessions_a_reset_ends_each() {
    let sim = TcpSim::bind_smp("127.0.0.1:0", config(SmpFaults::default()))
        .await
        .unwrap();
    let h = sim.handle().clone();
    let payload: Vec<u8> = (0..6000).map(|i| (i * 13 % 255) as u8).collect();
    let (image, hash) = mcuboot_image((2, 0, 0, 0), &payload);

    // A link that drops mid-upload (no reset): the next session resumes where the device
    // stands when the first chunk comes again with the same sha and len.
    let mut c = connect(&sim).await;
    let mut off = 0;
    for _ in 0..5 {
        off = c
            .call(2, 1, 1, &upload_body(&image, off, CHUNK))
            .await
            .u("off")
            .unwrap() as usize;
    }
    drop(c);
    let mut c = connect(&sim).await;
    let a = c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(off as u64));
    let last = upload_from(&mut c, &image, off).await;
    assert_eq!(last.bool("match"), Some(true));
    assert_eq!(h.upload_bytes(), image.len() as u64, "each byte sent once");

    let body = Req::map(2).b("hash", &hash).bool("confirm", false).done();
    let images = c.call(2, 1, 0, &body).await.images();
    assert_eq!(slot(&images, 1).bool("pending"), Some(true));

    // Reset: the answer, then the end of the session; the session returns once booted.
    assert_eq!(c.call(2, 0, 5, &Req::map(0).done()).await, V::M(vec![]));
    c.end().await;
    let boot = within("the boot", h.next_boot()).await;
    assert_eq!(
        boot,
        Boot {
            version: "2.0.0".into(),
            hash,
            confirmed: false,
            swap: Swap::Test
        }
    );

    // A new session talks to the new image; confirm it, reset again.
    let mut c = connect(&sim).await;
    let images = c.call(0, 1, 0, &[]).await.images();
    let s0 = slot(&images, 0);
    assert_eq!(s0.text("version"), Some("2.0.0"));
    assert_eq!(s0.bool("confirmed"), Some(false));
    let images = c
        .call(2, 1, 0, &Req::map(1).bool("confirm", true).done())
        .await
        .images();
    assert_eq!(slot(&images, 0).bool("confirmed"), Some(true));
    c.call(2, 0, 5, &Req::map(0).done()).await;
    c.end().await;
    let boot = within("the second boot", h.next_boot()).await;
    assert_eq!((boot.swap, boot.confirmed), (Swap::None, true));
    assert_eq!(h.slot0().data, image);
    assert_eq!(h.resets(), 2);
    within("the shutdown", sim.shutdown()).await;
}

#[tokio::test]
async fn reset_fault_ends_the_session_without_an_answer_and_garbled_answers_change_seq() {
    let sim = TcpSim::bind_smp(
        "127.0.0.1:0",
        config(SmpFaults {
            reset_mid_upload: Some(2),
            garble_answer: Some(1),
            ..SmpFaults::default()
        }),
    )
    .await
    .unwrap();
    let h = sim.handle().clone();
    let mut c = connect(&sim).await;
    // Answer 1 is garbled: its sequence number is not the request's.
    let seq = c.send(2, 0, 0, &Req::map(1).t("d", "hi").done()).await;
    let a = within("the garbled answer", c.receive()).await.unwrap();
    assert_eq!((a.seq, a.body.text("r")), (seq ^ 0x80, Some("hi")));

    let (image, _) = mcuboot_image((2, 0, 0, 0), &[7u8; 1000]);
    let a = c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(CHUNK as u64));
    // Chunk 2 is written, then the device resets instead of answering.
    c.send(2, 1, 1, &upload_body(&image, CHUNK, CHUNK)).await;
    c.end().await;
    event_where(&h, "the fault reset", |e| {
        matches!(
            e,
            SmpEvent::Reset {
                cause: ResetCause::Fault
            }
        )
    })
    .await;
    within("the boot", h.next_boot()).await;
    // The upload session died with the reset.
    let mut c = connect(&sim).await;
    let a = c
        .call(2, 1, 1, &upload_body(&image, 2 * CHUNK, CHUNK))
        .await;
    assert_eq!(a.u("off"), Some(0));
    within("the shutdown", sim.shutdown()).await;
}

/// Reads stdout lines of the binary until one parses as a JSON event `pred` accepts.
async fn json_event<R: AsyncRead + Unpin>(
    lines: &mut tokio::io::Lines<BufReader<R>>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    within("a JSON event", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("stdout ended");
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            if pred(&v) {
                return v;
            }
        }
    })
    .await
}

#[tokio::test]
async fn the_binary_serves_raw_smp_prints_json_events_and_writes_slot0() {
    let dir = tempfile::tempdir().unwrap();
    let slot0 = dir.path().join("slot0.bin");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_leaf-sim"))
        .args(["smp", "--raw-tcp", "127.0.0.1:0", "--json-events"])
        .args(["--version", "1.2.3", "--boot-ms", "50", "--slot0-out"])
        .arg(&slot0)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("the address line", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let addr = first
        .strip_prefix("raw-tcp: ")
        .unwrap_or_else(|| panic!("first line {first:?}"));
    let initial = std::fs::read(&slot0).unwrap();
    assert_eq!(
        &initial[..4],
        &0x96f3_b83du32.to_le_bytes(),
        "an MCUboot image"
    );

    let stream = TcpStream::connect(addr).await.unwrap();
    let mut c = RawClient::new(stream);
    let images = c.call(0, 1, 0, &[]).await.images();
    assert_eq!(slot(&images, 0).text("version"), Some("1.2.3"));
    let (image, hash) = mcuboot_image((1, 3, 0, 0), &[0x5a; 3000]);
    upload_from(&mut c, &image, 0).await;
    let v = json_event(&mut lines, |v| v["event"] == "upload_complete").await;
    assert_eq!(v["version"], "1.3.0");
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(v["hash"], hex.as_str());
    let body = Req::map(2).b("hash", &hash).bool("confirm", true).done();
    c.call(2, 1, 0, &body).await;
    json_event(&mut lines, |v| v["event"] == "permanent_marked").await;
    c.call(2, 0, 5, &Req::map(0).done()).await;
    c.end().await;
    let v = json_event(&mut lines, |v| v["event"] == "reset").await;
    assert_eq!(v["cause"], "command");
    let v = json_event(&mut lines, |v| v["event"] == "booted").await;
    assert_eq!(
        (&v["version"], &v["swap"], &v["confirmed"]),
        (
            &serde_json::json!("1.3.0"),
            &serde_json::json!("permanent"),
            &serde_json::json!(true)
        )
    );
    // The booted line comes after slot 0 was written.
    assert_eq!(std::fs::read(&slot0).unwrap(), image);
    let mut c = RawClient::new(TcpStream::connect(addr).await.unwrap());
    let images = c.call(0, 1, 0, &[]).await.images();
    assert_eq!(slot(&images, 0).text("version"), Some("1.3.0"));
    child.kill().await.unwrap();
}
