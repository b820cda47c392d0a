//! Drives the SMP simulator over a real pty (opened with tokio-serial, as the gateway opens
//! it) and TCP with an independent client (`smp_client/`). No sleeps: the device's event
//! queue tells when something happened; timeouts only bound the waits.

mod smp_client;

use std::future::Future;
use std::time::Duration;

use otagw_leaf_sim::smp::{Boot, ResetCause, Swap};
use otagw_leaf_sim::{PtySim, SmpEvent, SmpFaults, SmpHandle, SmpSimConfig, TcpSim};
use smp_client::{Client, Got, Req, V, mcuboot_image, upload_body};
use tokio::time::timeout;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

/// Upper bound for anything a test waits for.
const LIMIT: Duration = Duration::from_secs(20);
/// Image bytes per upload chunk: an SMP packet stays well under the 1024-byte buffer.
const CHUNK: usize = 800;

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
        ..SmpSimConfig::default()
    }
}

fn start(cfg: SmpSimConfig) -> (PtySim<SmpHandle>, Client<SerialStream>) {
    let sim = PtySim::spawn_smp(cfg).expect("spawn the SMP device");
    let port = tokio_serial::new(sim.path().to_string_lossy(), 115_200)
        .open_native_async()
        .expect("open the pty slave with tokio-serial");
    (sim, Client::new(port))
}

/// A new image of version 2.0.0 (or `version`) with a payload of `len` bytes.
fn new_image(version: (u8, u8, u16, u32), len: usize) -> (Vec<u8>, [u8; 32]) {
    let payload: Vec<u8> = (0..len).map(|i| (i * 13 % 255) as u8).collect();
    mcuboot_image(version, &payload)
}

/// Skips events until one matches.
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

async fn next_boot(h: &SmpHandle) -> Boot {
    within("the boot", h.next_boot()).await
}

fn rc(v: &V) -> Option<u64> {
    v.u("rc")
}

/// Uploads `image` from `from` to the end, one answer per chunk, following the offsets the
/// device answers. Returns the last answer.
async fn upload_from<S>(c: &mut Client<S>, image: &[u8], mut off: usize) -> V
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let a = c.call(2, 1, 1, &upload_body(image, off, CHUNK)).await;
        assert_eq!(rc(&a), None, "upload at {off}: {a:?}");
        off = a.u("off").expect("off") as usize;
        if off == image.len() {
            return a;
        }
    }
}

async fn upload<S>(c: &mut Client<S>, image: &[u8]) -> V
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    upload_from(c, image, 0).await
}

fn slot(images: &[V], n: u64) -> &V {
    images
        .iter()
        .find(|i| i.u("slot") == Some(n))
        .unwrap_or_else(|| panic!("no slot {n} in {images:?}"))
}

#[tokio::test]
async fn echo_params_state_and_dropped_packets() {
    let (sim, mut c) = start(SmpSimConfig {
        version: "1.2.3+4".into(),
        ..config(SmpFaults::default())
    });
    let h = sim.handle().clone();
    assert_eq!(c.echo("hello").await.text("r"), Some("hello"));
    let p = c.params().await;
    assert_eq!((p.u("buf_size"), p.u("buf_count")), (Some(1024), Some(4)));

    let s = c.state().await;
    assert_eq!(s.u("splitStatus"), Some(0));
    let images = s.images();
    assert_eq!(images.len(), 1);
    let s0 = slot(&images, 0);
    assert_eq!(s0.text("version"), Some("1.2.3.4"));
    assert_eq!(s0.bytes("hash"), Some(&h.slot0().hash[..]));
    for (k, want) in [
        ("active", true),
        ("confirmed", true),
        ("bootable", true),
        ("pending", false),
        ("permanent", false),
    ] {
        assert_eq!(s0.bool(k), Some(want), "{k}");
    }
    // The reported hash is the image's SHA-256 TLV, over header + payload.
    let data = h.slot0().data;
    let payload_len = u32::from_le_bytes(data[12..16].try_into().unwrap()) as usize;
    use sha2::Digest as _;
    assert_eq!(
        sha2::Sha256::digest(&data[..32 + payload_len]).as_slice(),
        &h.slot0().hash
    );

    // Unknown command, wrong op: rc 8.
    assert_eq!(rc(&c.call(2, 0, 42, &[]).await), Some(8));
    assert_eq!(rc(&c.call(0, 0, 0, &[]).await), Some(8));
    assert_eq!(rc(&c.call(0, 64, 0, &[]).await), Some(8));

    // A bad CRC, console noise and an oversized packet get no answer: the next request's
    // answer is the next thing on the line.
    let mut bad = smp_client::frames(&[2, 0, 0, 0, 0, 0, 9, 0]);
    bad[4] = if bad[4] == b'A' { b'B' } else { b'A' };
    c.raw(&bad).await;
    c.raw(b"uart:~$ some console text\n").await;
    let big = Req::map(1).t("d", &"x".repeat(1100)).done();
    c.send(2, 0, 0, &big).await;
    assert_eq!(c.echo("after").await.text("r"), Some("after"));
    assert_eq!(h.dropped_packets(), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn upload_test_reset_confirm() {
    let (sim, mut c) = start(config(SmpFaults::default()));
    let h = sim.handle().clone();
    let old_hash = h.slot0().hash;
    let (image, hash) = new_image((2, 0, 0, 0), 5000);
    let last = upload(&mut c, &image).await;
    assert_eq!(last.bool("match"), Some(true));
    assert_eq!(h.upload_bytes(), image.len() as u64, "each byte sent once");
    let s1 = h.slot1().expect("slot 1 holds the image");
    assert_eq!((s1.data.clone(), s1.hash), (image.clone(), hash));
    assert_eq!(s1.version, "2.0.0");

    let images = c.state().await.images();
    let s1 = slot(&images, 1);
    assert_eq!(s1.bytes("hash"), Some(&hash[..]));
    assert_eq!(s1.bool("pending"), Some(false));

    let images = c.test_image(&hash).await.images();
    assert_eq!(slot(&images, 1).bool("pending"), Some(true));
    assert_eq!(slot(&images, 1).bool("permanent"), Some(false));

    assert_eq!(c.reset().await, V::M(vec![]));
    let boot = next_boot(&h).await;
    assert_eq!(
        boot,
        Boot {
            version: "2.0.0".into(),
            hash,
            confirmed: false,
            swap: Swap::Test
        }
    );
    let images = c.state().await.images();
    let s0 = slot(&images, 0);
    assert_eq!(s0.text("version"), Some("2.0.0"));
    assert_eq!(
        (s0.bool("active"), s0.bool("confirmed")),
        (Some(true), Some(false))
    );
    let s1 = slot(&images, 1);
    assert_eq!(s1.bytes("hash"), Some(&old_hash[..]));
    assert_eq!(s1.bool("confirmed"), Some(true), "the revert image");

    // While the test image runs unconfirmed, slot 1 is in use.
    assert_eq!(
        rc(&c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await),
        Some(2)
    );

    let images = c.confirm(None).await.images();
    assert_eq!(slot(&images, 0).bool("confirmed"), Some(true));
    assert!(h.slot0().confirmed);

    c.reset().await;
    let boot = next_boot(&h).await;
    assert_eq!((boot.version.as_str(), boot.swap), ("2.0.0", Swap::None));
    assert!(boot.confirmed);
    assert_eq!(h.resets(), 2);
    assert_eq!(c.echo("still here").await.text("r"), Some("still here"));
    sim.shutdown().await;
}

#[tokio::test]
async fn unconfirmed_image_reverts_on_the_next_reset_and_permanent_sticks() {
    let (sim, mut c) = start(config(SmpFaults::default()));
    let h = sim.handle().clone();
    let (image, hash) = new_image((2, 1, 0, 0), 3000);
    upload(&mut c, &image).await;
    c.test_image(&hash).await;
    c.reset().await;
    assert_eq!(next_boot(&h).await.swap, Swap::Test);
    assert_eq!(h.version(), "2.1.0");
    c.reset().await;
    let boot = next_boot(&h).await;
    assert_eq!((boot.version.as_str(), boot.swap), ("1.0.0", Swap::Revert));
    assert!(boot.confirmed);
    let s1 = h.slot1().expect("the reverted image stays in slot 1");
    assert_eq!((s1.hash, s1.pending, s1.confirmed), (hash, false, false));

    // The same image, marked permanent this time.
    let images = c.confirm(Some(&hash)).await.images();
    assert_eq!(slot(&images, 1).bool("permanent"), Some(true));
    c.reset().await;
    let boot = next_boot(&h).await;
    assert_eq!((boot.swap, boot.confirmed), (Swap::Permanent, true));
    c.reset().await;
    assert_eq!(next_boot(&h).await.swap, Swap::None);
    assert_eq!(h.version(), "2.1.0");

    // Erase empties slot 1 (now the old image).
    assert!(h.slot1().is_some());
    assert_eq!(c.erase().await, V::M(vec![]));
    assert!(h.slot1().is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_offset_is_answered_with_the_expected_one() {
    let (sim, mut c) = start(config(SmpFaults::default()));
    let h = sim.handle().clone();
    let (image, _) = new_image((2, 0, 0, 0), 4000);
    let a = c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(CHUNK as u64));
    for wrong in [2 * CHUNK, CHUNK / 2, 1] {
        let a = c.call(2, 1, 1, &upload_body(&image, wrong, CHUNK)).await;
        assert_eq!((rc(&a), a.u("off")), (None, Some(CHUNK as u64)));
    }
    assert_eq!(
        h.upload_bytes(),
        CHUNK as u64,
        "nothing written at a wrong offset"
    );
    upload_from(&mut c, &image, CHUNK).await;
    assert_eq!(h.upload_bytes(), image.len() as u64);
    // A finished upload leaves no session: a non-zero offset is answered 0.
    let a = c.call(2, 1, 1, &upload_body(&image, CHUNK, CHUNK)).await;
    assert_eq!(a.u("off"), Some(0));
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_with_the_same_sha_and_restart_after_a_reset() {
    let (sim, mut c) = start(config(SmpFaults::default()));
    let h = sim.handle().clone();
    let (image, _) = new_image((3, 0, 0, 0), 6000);
    // Three chunks, then the client "restarts": off 0 with the same sha and len goes on
    // where the device stands, without writing the chunk again.
    let mut off = 0;
    for _ in 0..3 {
        off = c
            .call(2, 1, 1, &upload_body(&image, off, CHUNK))
            .await
            .u("off")
            .unwrap() as usize;
    }
    let a = c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(off as u64));
    assert_eq!(h.upload_progress(), Some((off, image.len())));
    upload_from(&mut c, &image, off).await;
    assert_eq!(h.upload_bytes(), image.len() as u64, "no byte resent");

    // A different image at off 0 starts over (and erases slot 1).
    let (other, _) = new_image((3, 0, 1, 0), 2000);
    let a = c.call(2, 1, 1, &upload_body(&other, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(CHUNK as u64));
    assert!(h.slot1().is_none());

    // A reset drops the session: a non-zero offset is answered 0, then it starts over.
    c.reset().await;
    next_boot(&h).await;
    assert_eq!(h.upload_progress(), None);
    let a = c.call(2, 1, 1, &upload_body(&other, CHUNK, CHUNK)).await;
    assert_eq!(a.u("off"), Some(0));
    let before = h.upload_bytes();
    upload(&mut c, &other).await;
    assert_eq!(h.upload_bytes() - before, other.len() as u64);
    assert_eq!(h.slot1().unwrap().version, "3.0.1");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_device_that_keeps_the_upload_across_resets_resumes() {
    let (sim, mut c) = start(SmpSimConfig {
        keep_upload_across_reset: true,
        ..config(SmpFaults::default())
    });
    let h = sim.handle().clone();
    let (image, _) = new_image((2, 0, 0, 0), 3000);
    let off = c
        .call(2, 1, 1, &upload_body(&image, 0, CHUNK))
        .await
        .u("off")
        .unwrap();
    c.reset().await;
    next_boot(&h).await;
    let a = c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(off));
    upload_from(&mut c, &image, off as usize).await;
    assert_eq!(h.upload_bytes(), image.len() as u64);
    sim.shutdown().await;
}

#[tokio::test]
async fn dropped_and_garbled_answers_and_a_dropped_request_recover() {
    let (sim, mut c) = start(config(SmpFaults {
        drop_request: Some(2),
        drop_answer: Some(3),
        garble_answer: Some(5),
        ..SmpFaults::default()
    }));
    let h = sim.handle().clone();
    let (image, _) = new_image((2, 0, 0, 0), 5000);
    // Request 1: answered. Request 2 (off 800): dropped unprocessed.
    let a = c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(CHUNK as u64));
    c.send(2, 1, 1, &upload_body(&image, CHUNK, CHUNK)).await;
    event_where(&h, "the dropped request", |e| {
        matches!(e, SmpEvent::Fault(_))
    })
    .await;
    assert_eq!(h.upload_bytes(), CHUNK as u64);
    // The retry (request 3) is written and answered (answer 2). Request 4 (off 1600) is
    // written but its answer (answer 3) is dropped.
    let a = c.call(2, 1, 1, &upload_body(&image, CHUNK, CHUNK)).await;
    assert_eq!(a.u("off"), Some(2 * CHUNK as u64));
    c.send(2, 1, 1, &upload_body(&image, 2 * CHUNK, CHUNK))
        .await;
    event_where(&h, "the dropped answer", |e| {
        matches!(e, SmpEvent::Fault(_))
    })
    .await;
    // The retry of a chunk the device already has is answered with the offset it expects.
    let a = c
        .call(2, 1, 1, &upload_body(&image, 2 * CHUNK, CHUNK))
        .await;
    assert_eq!(a.u("off"), Some(3 * CHUNK as u64));
    // Answer 5 is garbled: the client sees a bad CRC; the chunk was written.
    c.send(2, 1, 1, &upload_body(&image, 3 * CHUNK, CHUNK))
        .await;
    assert!(matches!(c.receive(LIMIT).await, Got::Garbled));
    let a = c
        .call(2, 1, 1, &upload_body(&image, 3 * CHUNK, CHUNK))
        .await;
    assert_eq!(a.u("off"), Some(4 * CHUNK as u64));
    upload_from(&mut c, &image, 4 * CHUNK).await;
    assert_eq!(
        h.upload_bytes(),
        image.len() as u64,
        "no byte written twice"
    );
    assert!(h.slot1().is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_mid_upload_drops_the_session() {
    let (sim, mut c) = start(config(SmpFaults {
        reset_mid_upload: Some(3),
        ..SmpFaults::default()
    }));
    let h = sim.handle().clone();
    let (image, hash) = new_image((2, 0, 0, 0), 5000);
    let mut off = 0;
    for _ in 0..2 {
        off = c
            .call(2, 1, 1, &upload_body(&image, off, CHUNK))
            .await
            .u("off")
            .unwrap() as usize;
    }
    c.send(2, 1, 1, &upload_body(&image, off, CHUNK)).await;
    event_where(&h, "the fault reset", |e| {
        matches!(
            e,
            SmpEvent::Reset {
                cause: ResetCause::Fault
            }
        )
    })
    .await;
    let boot = next_boot(&h).await;
    assert_eq!((boot.swap, boot.version.as_str()), (Swap::None, "1.0.0"));
    // The session is gone: the device answers 0 and the upload starts over.
    let a = c.call(2, 1, 1, &upload_body(&image, off, CHUNK)).await;
    assert_eq!(a.u("off"), Some(0));
    upload(&mut c, &image).await;
    assert_eq!(h.upload_bytes(), (3 * CHUNK + image.len()) as u64);
    assert_eq!(h.slot1().unwrap().hash, hash);
    sim.shutdown().await;
}

#[tokio::test]
async fn refused_and_invalid_images() {
    // A device that refuses uploads.
    let (sim, mut c) = start(config(SmpFaults {
        refuse_upload: true,
        ..SmpFaults::default()
    }));
    let (image, hash) = new_image((2, 0, 0, 0), 1000);
    assert_eq!(
        rc(&c.call(2, 1, 1, &upload_body(&image, 0, CHUNK)).await),
        Some(3)
    );
    sim.shutdown().await;

    // A device that refuses the test.
    let (sim, mut c) = start(config(SmpFaults {
        refuse_test: true,
        ..SmpFaults::default()
    }));
    upload(&mut c, &image).await;
    assert_eq!(rc(&c.test_image(&hash).await), Some(6));
    assert!(!sim.handle().slot1().unwrap().pending);
    sim.shutdown().await;

    // Bad magic (first chunk), bad SHA-256 TLV (last chunk), unknown hash, testing slot 0.
    let (sim, mut c) = start(config(SmpFaults::default()));
    let h = sim.handle().clone();
    let mut bad = image.clone();
    bad[0] ^= 0xff;
    assert_eq!(
        rc(&c.call(2, 1, 1, &upload_body(&bad, 0, CHUNK)).await),
        Some(3)
    );
    let mut bad = image.clone();
    bad[100] ^= 0xff; // payload changed, TLV kept (the upload's sha is of the bad bytes)
    let a = c.call(2, 1, 1, &upload_body(&bad, 0, CHUNK)).await;
    assert_eq!(a.u("off"), Some(CHUNK as u64));
    let a = c.call(2, 1, 1, &upload_body(&bad, CHUNK, CHUNK)).await;
    assert_eq!(rc(&a), Some(9));
    event_where(&h, "the rejection", |e| {
        matches!(e, SmpEvent::UploadRejected { .. })
    })
    .await;
    assert!(h.slot1().is_none());
    assert_eq!(rc(&c.test_image(&[0; 32]).await), Some(5));
    assert_eq!(rc(&c.test_image(&h.slot0().hash).await), Some(6));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_new_image_that_does_not_boot_reverts_at_once() {
    let (sim, mut c) = start(config(SmpFaults {
        no_boot: true,
        ..SmpFaults::default()
    }));
    let h = sim.handle().clone();
    let (image, hash) = new_image((2, 0, 0, 0), 2000);
    upload(&mut c, &image).await;
    c.test_image(&hash).await;
    c.reset().await;
    let boot = next_boot(&h).await;
    assert_eq!((boot.swap, boot.version.as_str()), (Swap::NoBoot, "1.0.0"));
    assert!(boot.confirmed);
    let images = c.state().await.images();
    assert_eq!(slot(&images, 0).text("version"), Some("1.0.0"));
    assert_eq!(slot(&images, 1).bool("pending"), Some(false));
    sim.shutdown().await;
}

#[tokio::test]
async fn tcp_device_survives_a_reset_on_one_connection() {
    let sim = TcpSim::bind_smp("127.0.0.1:0", config(SmpFaults::default()))
        .await
        .unwrap();
    assert!(sim.url().starts_with("tcp://127.0.0.1:"));
    let h = sim.handle().clone();
    let stream = tokio::net::TcpStream::connect(sim.local_addr())
        .await
        .unwrap();
    let mut c = Client::new(stream);
    assert_eq!(c.echo("tcp").await.text("r"), Some("tcp"));
    c.reset().await;
    next_boot(&h).await;
    assert_eq!(c.echo("again").await.text("r"), Some("again"));
    within("the tcp shutdown", sim.shutdown()).await;
}
