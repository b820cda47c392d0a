//! `flash` and `identify` against the simulated SMP device of
//! `crate::testing` on a virtual clock: the happy path over serial and BLE,
//! chunk sizing, dropped and garbled answers, resume, device resets,
//! test/confirm, an image that never boots, and refusals.

use super::*;
use crate::identify::identify;
use crate::smp::{group, id, op};
use crate::testing::{ImageSpec, Sim, TestKey};
use otagw_plugin_sdk::testing::MemImage;

const KEY: TestKey = TestKey::P256([0x42; 32]);

fn image(len: usize) -> Vec<u8> {
    ImageSpec::new((1, 1, 0, 0), len).signed(KEY).build()
}

fn settings() -> Settings {
    Settings {
        public_key: Some(KEY.public()),
        ..Settings::default()
    }
}

fn image_hash(bytes: &[u8]) -> Vec<u8> {
    crate::mcuboot::verify(&mut MemImage::new(bytes.to_vec()), None)
        .unwrap()
        .hash
        .to_vec()
}

fn run(sim: &mut Sim, bytes: &[u8], s: &Settings) -> Result<Report, Error> {
    flash(sim, &mut MemImage::new(bytes.to_vec()), s)
}

fn count(sim: &Sim, g: u16, i: u8, o: u8) -> usize {
    sim.requests.iter().filter(|r| **r == (g, i, o)).count()
}

fn assert_new_image_confirmed(sim: &Sim, bytes: &[u8]) {
    let s0 = sim.slot0.as_ref().unwrap();
    assert_eq!(s0.hash, image_hash(bytes));
    assert!(s0.confirmed);
    assert_eq!(s0.version, "1.1.0");
}

#[test]
fn uploads_tests_resets_and_confirms() {
    let bytes = image(40_000);
    let mut sim = Sim::new();
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_new_image_confirmed(&sim, &bytes);
    assert_eq!(r.bytes_sent, bytes.len() as u64);
    assert_eq!(r.retries, 0);
    assert_eq!(r.resumed_from, None);
    assert_eq!(sim.data_written, bytes.len() as u64);
    assert_eq!(sim.data_received, bytes.len() as u64);
    assert_eq!(sim.oversize, 0);
    assert_eq!(sim.resets, 1);
    assert!(r.summary.contains("confirmed"), "{}", r.summary);
    // The old image stays in slot 1.
    assert_eq!(sim.slot1.as_ref().unwrap().version, "1.0.0");

    // Order of the commands.
    let seq: Vec<(u16, u8, u8)> = sim
        .requests
        .iter()
        .copied()
        .filter(|r| {
            *r != (group::IMAGE, id::UPLOAD, op::WRITE) && *r != (group::OS, id::ECHO, op::WRITE)
        })
        .collect();
    assert_eq!(
        seq,
        vec![
            (group::IMAGE, id::STATE, op::READ),
            (group::OS, id::PARAMS, op::READ),
            (group::IMAGE, id::STATE, op::WRITE), // test
            (group::OS, id::RESET, op::WRITE),
            (group::IMAGE, id::STATE, op::READ),
            (group::IMAGE, id::STATE, op::WRITE), // confirm
            (group::IMAGE, id::STATE, op::READ),
        ]
    );
    assert!(count(&sim, group::OS, id::ECHO, op::WRITE) >= 1);

    // Progress: transfer rises to the total, then finish reaches 4 of 4.
    let transfer: Vec<u64> = sim
        .progress
        .iter()
        .filter(|p| p.2 == Phase::Transfer)
        .map(|p| p.0)
        .collect();
    assert!(transfer.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(*transfer.last().unwrap(), bytes.len() as u64);
    assert_eq!(sim.progress.last(), Some(&(4, 4, Phase::Finish)));
}

#[test]
fn chunks_fill_the_reported_buffer_without_overflowing_it() {
    let bytes = image(20_000);
    for buf in [256u32, 512, 1024, 2048, 4096] {
        let mut sim = Sim::new();
        sim.buf_size = Some(buf);
        sim.real_buf = buf as usize;
        run(&mut sim, &bytes, &settings()).unwrap();
        assert_eq!(sim.oversize, 0, "buf {buf}");
        let uploads = count(&sim, group::IMAGE, id::UPLOAD, op::WRITE);
        // Overhead per request is below 40 bytes: the requests are nearly full.
        let min = bytes.len().div_ceil(buf as usize - 4 - 8);
        let max = bytes.len().div_ceil(buf as usize - 4 - 8 - 40) + 1;
        assert!(
            (min..=max).contains(&uploads),
            "buf {buf}: {uploads} uploads"
        );
    }
}

#[test]
fn falls_back_to_512_bytes_when_params_are_unsupported() {
    let bytes = image(10_000);
    let mut sim = Sim::new();
    sim.buf_size = None; // answers rc 8
    sim.real_buf = 512;
    run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(sim.oversize, 0);
    assert_new_image_confirmed(&sim, &bytes);
    // A device that ignores the command altogether costs one timeout.
    let mut sim = Sim::new();
    sim.faults.ignore = Some((group::OS, id::PARAMS));
    sim.real_buf = 512;
    run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(sim.oversize, 0);
    assert_eq!(count(&sim, group::OS, id::PARAMS, op::READ), 1);
}

#[test]
fn max_chunk_and_buf_size_options() {
    let bytes = image(10_000);
    let mut sim = Sim::new();
    let s = Settings {
        max_chunk: Some(100),
        buf_size: Some(300),
        ..settings()
    };
    run(&mut sim, &bytes, &s).unwrap();
    assert_eq!(count(&sim, group::OS, id::PARAMS, op::READ), 0);
    assert_eq!(
        count(&sim, group::IMAGE, id::UPLOAD, op::WRITE),
        bytes.len().div_ceil(100)
    );
}

#[test]
fn a_dropped_answer_is_retried_without_double_counting() {
    let bytes = image(20_000);
    let mut sim = Sim::new();
    // Lose the answer to the upload at offset 0 and to a later one.
    sim.faults.drop_upload_at.insert(0);
    let second = {
        let mut probe = Sim::new();
        run(&mut probe, &bytes, &settings()).unwrap();
        // Any offset the client uses: the second chunk's.
        probe
            .progress
            .iter()
            .filter(|p| p.2 == Phase::Transfer)
            .nth(2)
            .unwrap()
            .0
    };
    sim.faults.drop_upload_at.insert(second);
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_new_image_confirmed(&sim, &bytes);
    assert_eq!(r.retries, 2);
    assert_eq!(r.bytes_sent, bytes.len() as u64);
    assert_eq!(sim.data_written, bytes.len() as u64);
    assert!(sim.logs.iter().any(|(_, m)| m.contains("sending again")));
}

#[test]
fn a_garbled_answer_is_retried() {
    let bytes = image(5_000);
    let mut sim = Sim::new();
    // Request 0 is the state read (1 its re-send), 2 params, 3 the first
    // upload (4 its re-send).
    sim.faults.garble_answers.extend([0, 3]);
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_new_image_confirmed(&sim, &bytes);
    assert_eq!(r.retries, 2);
    assert_eq!(sim.data_written, bytes.len() as u64);
}

#[test]
fn console_noise_between_frames_is_ignored() {
    let bytes = image(8_000);
    let mut sim = Sim::new();
    sim.faults.console_noise = true;
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(r.retries, 0);
    assert_new_image_confirmed(&sim, &bytes);
}

#[test]
fn resumes_an_interrupted_upload_from_the_reported_offset() {
    let bytes = image(30_000);
    let mut sim = Sim::new();
    // The link breaks at offset ~12000: the first flash fails.
    sim.faults.silent_from_off = Some(12_000);
    let s = Settings {
        retries: 1,
        ..settings()
    };
    let err = run(&mut sim, &bytes, &s).unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    let had = sim.session.as_ref().unwrap().data.len() as u64;
    assert!((12_000..13_000).contains(&had), "{had}");
    // The gateway starts again: the device still holds its session.
    sim.faults.silent_from_off = None;
    let received_before = sim.data_received;
    let r = run(&mut sim, &bytes, &s).unwrap();
    assert_eq!(r.resumed_from, Some(had));
    assert_eq!(r.bytes_sent, bytes.len() as u64 - had);
    assert!(
        r.summary.contains(&format!("resumed at offset {had}")),
        "{}",
        r.summary
    );
    // On the wire: the first request (not written by the device) plus the rest.
    let first_chunk = sim.data_received - received_before - (bytes.len() as u64 - had);
    assert!(first_chunk < 1024, "{first_chunk}");
    assert_eq!(sim.data_written, bytes.len() as u64);
    assert_new_image_confirmed(&sim, &bytes);
}

#[test]
fn a_device_reset_mid_upload_starts_over_from_the_offset_it_reports() {
    let bytes = image(20_000);
    let mut sim = Sim::new();
    sim.faults.reset_at_upload_off = Some(8_000);
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_new_image_confirmed(&sim, &bytes);
    // The device lost its session (Zephyr keeps it in RAM) and answered 0.
    assert!(
        sim.logs
            .iter()
            .any(|(_, m)| m.contains("the device expects offset 0"))
    );
    assert!(r.retries >= 1);
    assert_eq!(sim.resets, 2);
    // Bytes the device took twice (before and after its reset) count once
    // (found by fuzz/ `smp_session`: the report claimed more than the image).
    assert_eq!(r.bytes_sent, bytes.len() as u64);
}

#[test]
fn accepted_bytes_count_each_image_byte_once() {
    let mut up = Upload::default();
    up.accept(0, 128);
    up.accept(10, 138); // after a rewind to 10
    up.accept(1000, 1128); // after a jump forward
    up.accept(138, 138);
    assert_eq!(up.accepted, vec![(0, 138), (1000, 1128)]);
    up.accept(200, 1000); // fills the gap, touching both sides
    assert_eq!(up.accepted, vec![(0, 138), (200, 1128)]);
    up.accept(100, 300);
    assert_eq!(up.accepted, vec![(0, 1128)]);
    assert_eq!(up.acked(), 1128);
}

#[test]
fn a_new_image_that_does_not_boot_is_reported() {
    let bytes = image(5_000);
    let mut sim = Sim::new();
    sim.faults.never_boots = true;
    let err = run(&mut sim, &bytes, &settings()).unwrap_err();
    let Error::Device(m) = err else {
        panic!("{err:?}")
    };
    assert!(
        m.starts_with("the new image did not boot: slot 0 runs 1.0.0 (aaaa"),
        "{m}"
    );
    assert!(m.contains("MCUboot reverts an unconfirmed image"), "{m}");
    assert_eq!(count(&sim, group::IMAGE, id::STATE, op::WRITE), 1);
}

#[test]
fn an_image_already_running_confirmed_is_left_alone() {
    let bytes = image(5_000);
    let mut sim = Sim::new();
    run(&mut sim, &bytes, &settings()).unwrap();
    let before = sim.requests.len();
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(r.bytes_sent, 0);
    assert!(r.summary.contains("nothing to do"), "{}", r.summary);
    assert_eq!(sim.requests.len() - before, 1);
}

#[test]
fn an_unconfirmed_running_image_is_only_confirmed() {
    let bytes = image(5_000);
    let mut sim = Sim::new();
    let h = image_hash(&bytes);
    sim.slot1 = sim.slot0.take();
    sim.slot0 = Some(crate::testing::SimImage {
        version: "1.1.0".into(),
        hash: h,
        confirmed: false,
        pending: false,
    });
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(r.bytes_sent, 0);
    assert_eq!(count(&sim, group::IMAGE, id::UPLOAD, op::WRITE), 0);
    assert_eq!(count(&sim, group::OS, id::RESET, op::WRITE), 0);
    assert_new_image_confirmed(&sim, &bytes);
}

#[test]
fn an_image_already_in_slot_1_is_not_uploaded_again() {
    let bytes = image(5_000);
    let mut sim = Sim::new();
    sim.slot1 = Some(crate::testing::SimImage {
        version: "1.1.0".into(),
        hash: image_hash(&bytes),
        confirmed: false,
        pending: false,
    });
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(r.bytes_sent, 0);
    assert_eq!(count(&sim, group::IMAGE, id::UPLOAD, op::WRITE), 0);
    assert_new_image_confirmed(&sim, &bytes);
}

#[test]
fn require_newer_refuses_older_and_equal_versions_before_uploading() {
    let s = Settings {
        require_newer: true,
        ..settings()
    };
    for running in ["1.1.0", "1.2.0", "2.0.0.0"] {
        let bytes = image(5_000);
        let mut sim = Sim::new();
        sim.slot0.as_mut().unwrap().version = running.into();
        let err = run(&mut sim, &bytes, &s).unwrap_err();
        let Error::Verify(m) = err else {
            panic!("{err:?}")
        };
        assert!(m.contains("is not newer than the running"), "{m}");
        assert_eq!(sim.requests.len(), 1, "only the state read");
    }
    let bytes = image(5_000);
    let mut sim = Sim::new();
    sim.slot0.as_mut().unwrap().version = "1.0.9.9".into();
    run(&mut sim, &bytes, &s).unwrap();
}

#[test]
fn verify_fails_before_a_byte_reaches_the_device() {
    let mut bytes = image(5_000);
    bytes[0x300] ^= 1;
    let mut sim = Sim::new();
    let err = run(&mut sim, &bytes, &settings()).unwrap_err();
    assert!(
        matches!(&err, Error::Verify(m) if m.starts_with("hash mismatch")),
        "{err:?}"
    );
    assert_eq!(sim.writes, 0);
    let wrong = Settings {
        public_key: Some(TestKey::Ed25519([1; 32]).public()),
        ..Settings::default()
    };
    let err = run(&mut sim, &image(100), &wrong).unwrap_err();
    assert!(
        matches!(&err, Error::Verify(m) if m.starts_with("key hash mismatch")),
        "{err:?}"
    );
    assert_eq!(sim.writes, 0);
}

#[test]
fn a_refused_upload_names_the_command_and_rc() {
    let bytes = image(5_000);
    let mut sim = Sim::new();
    sim.faults.refuse_upload_rc = Some(9);
    let err = run(&mut sim, &bytes, &settings()).unwrap_err();
    assert_eq!(
        err,
        Error::Device(
            "image upload at offset 0: the device answered rc 9 (ECORRUPT: corrupt data)".into()
        )
    );
}

#[test]
fn a_silent_device_times_out_after_the_retries() {
    let bytes = image(1_000);
    let mut sim = Sim::new();
    sim.faults.ignore = Some((group::IMAGE, id::STATE));
    let s = Settings {
        retries: 2,
        timeout_ms: 100,
        ..settings()
    };
    let err = run(&mut sim, &bytes, &s).unwrap_err();
    assert_eq!(
        err,
        Error::Timeout(
            "image state read: no answer from the device after 3 attempt(s) of 100 ms".into()
        )
    );
    assert_eq!(sim.writes, 3);
    assert_eq!(sim.now, 300);
}

#[test]
fn a_device_that_does_not_come_back_after_reset_times_out() {
    let bytes = image(1_000);
    let mut sim = Sim::new();
    sim.reboot_ms = 60_000;
    let err = run(&mut sim, &bytes, &settings()).unwrap_err();
    let Error::Timeout(m) = err else {
        panic!("{err:?}")
    };
    assert!(m.contains("reset_wait_ms = 10000"), "{m}");
    assert_eq!(sim.resets, 1, "the reset is never sent twice");
}

#[test]
fn a_lost_reset_answer_is_not_resent() {
    let bytes = image(1_000);
    let mut sim = Sim::new();
    // 0 state, 1 params, 2 upload, 3 test, 4 reset.
    sim.faults.drop_answers.insert(4);
    run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(count(&sim, group::OS, id::RESET, op::WRITE), 1);
    assert_new_image_confirmed(&sim, &bytes);
}

#[test]
fn works_over_ble_with_raw_packets_cut_to_the_mtu() {
    let bytes = image(10_000);
    let mut sim = Sim::new().ble(64);
    sim.buf_size = Some(2048);
    sim.real_buf = 2048;
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(r.bytes_sent, bytes.len() as u64);
    assert_eq!(sim.oversize, 0);
    assert_new_image_confirmed(&sim, &bytes);
}

#[test]
fn a_link_that_goes_down_with_the_reset_is_reopened() {
    // A BLE peripheral disconnects when it reboots into the new image.
    let bytes = image(3_000);
    let mut sim = Sim::new().ble(128);
    sim.faults.link_drops_on_reset = true;
    run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!((sim.resets, sim.reopens), (1, 1));
    assert_new_image_confirmed(&sim, &bytes);

    // Not back within reset_wait_ms: a timeout that says what failed.
    let mut sim = Sim::new().ble(128);
    sim.faults.link_drops_on_reset = true;
    sim.reboot_ms = 60_000;
    let err = run(&mut sim, &bytes, &settings()).unwrap_err();
    assert!(
        matches!(&err, Error::Timeout(m) if m.contains("reopening the link")),
        "{err:?}"
    );
}

#[test]
fn a_link_that_closes_instead_of_answering_the_reset_is_reopened() {
    // A BLE peripheral that hangs up as it reboots, its answer to the reset
    // never sent: the link closes while the answer is awaited. That is the
    // reset happening, not a failed flash; the reset is still sent once.
    let bytes = image(500);
    let mut sim = Sim::new().ble(128);
    sim.faults.link_drops_on_reset = true;
    sim.faults.reset_at_once = true;
    // 0 state, 1 params, 2 upload, 3 test, 4 reset.
    sim.faults.drop_answers.insert(4);
    run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!((sim.resets, sim.reopens), (1, 1));
    assert_eq!(count(&sim, group::OS, id::RESET, op::WRITE), 1);
    assert_new_image_confirmed(&sim, &bytes);
}

#[test]
fn a_link_lost_mid_upload_is_reopened_and_the_upload_resumes_where_the_device_is() {
    let bytes = image(20_000);
    let mut sim = Sim::new().ble(128);
    sim.faults.leaves_at_upload_off = Some((8_000, 2_000));
    let r = run(&mut sim, &bytes, &settings()).unwrap();
    assert_eq!(sim.reopens, 1);
    let resumed = r.resumed_from.expect("resumed");
    assert!((8_000..20_000).contains(&resumed), "{resumed}");
    // Nothing before the device's offset went again: one first chunk after
    // reconnecting, the rest from where the device was.
    assert!(
        sim.data_received < bytes.len() as u64 + 2_000,
        "{} bytes sent for {}",
        sim.data_received,
        bytes.len()
    );
    assert_new_image_confirmed(&sim, &bytes);

    // Away longer than reset_wait_ms: a transfer error naming both.
    let mut sim = Sim::new().ble(128);
    sim.faults.leaves_at_upload_off = Some((8_000, 60_000));
    let err = run(&mut sim, &bytes, &settings()).unwrap_err();
    assert!(
        matches!(&err, Error::Transfer(m) if m.contains("link closed") && m.contains("did not come back")),
        "{err:?}"
    );
    assert_eq!(sim.resets, 0);

    // A link that cannot be reopened (serial): the closed link fails the job.
    let mut sim = Sim::new();
    sim.faults.no_reopen = true;
    sim.faults.leaves_at_upload_off = Some((8_000, 10));
    let err = run(&mut sim, &bytes, &settings()).unwrap_err();
    assert!(err.is_link_closed(), "{err:?}");
}

#[test]
fn identify_reads_version_model_and_slots() {
    let mut sim = Sim::new();
    let d = identify(&mut sim, &Settings::default()).unwrap();
    assert_eq!(d.version, "1.0.0");
    assert_eq!(d.model.as_deref(), Some("sim_board"));
    assert_eq!(d.hardware_id.as_deref(), Some("sim_board"));
    assert_eq!(
        d.attributes,
        vec![
            ("image_hash".to_string(), "aa".repeat(32)),
            ("confirmed".to_string(), "true".to_string()),
        ]
    );
    // No model: rc 8, or an empty format; another format is no hardware id.
    sim.model = None;
    assert_eq!(
        identify(&mut sim, &Settings::default()).unwrap().model,
        None
    );
    let s = Settings {
        model_format: String::new(),
        ..Settings::default()
    };
    let before = sim.requests.len();
    assert_eq!(identify(&mut sim, &s).unwrap().model, None);
    assert_eq!(sim.requests.len() - before, 1);
    sim.model = Some("Zephyr 4.1".into());
    let os = Settings {
        model_format: "sv".into(),
        ..Settings::default()
    };
    let d = identify(&mut sim, &os).unwrap();
    assert_eq!(
        (d.model.as_deref(), d.hardware_id),
        (Some("Zephyr 4.1"), None)
    );
    // After a flash it reports the new version, and the old one in slot 1.
    let bytes = image(2_000);
    run(&mut sim, &bytes, &settings()).unwrap();
    let d = identify(&mut sim, &s).unwrap();
    assert_eq!(d.version, "1.1.0");
    assert_eq!(d.attributes[0].1, hex(&image_hash(&bytes)));
    assert_eq!(
        d.attributes[2],
        ("secondary_version".to_string(), "1.0.0".to_string())
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn identify_without_an_image_is_a_device_error() {
    let mut sim = Sim::new();
    sim.slot0 = None;
    let err = identify(&mut sim, &Settings::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Device(m) if m.contains("no image 0 in slot 0")),
        "{err:?}"
    );
}
