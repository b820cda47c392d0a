//! `verify`, `flash` and `identify` against the simulated bootloader
//! (`crate::testing`) on a virtual clock.

use otagw_plugin_sdk::Parity;
use otagw_plugin_sdk::testing::MemImage;

use super::*;
use crate::Stm32;
use crate::protocol::{cmd, erase_frame, write_frame};
use crate::testing::Sim;

fn settings(options: &[(&str, &str)]) -> Settings {
    otagw_plugin_sdk::testing::settings::<Stm32>(options).unwrap()
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn flashes_with_extended_erase_padding_readback_and_go() {
    let mut sim = Sim::new();
    let mut image = MemImage::pattern(5001);
    let s = settings(&[]);
    let r = flash(&mut sim, &mut image, &s).unwrap();
    assert_eq!(r.bytes_sent, 5001);
    assert_eq!(r.retries, 0);
    assert!(r.summary.contains("PID 0x414"), "{}", r.summary);
    // 8E1 at 115200.
    assert_eq!(sim.configured, vec![(115_200, Parity::Even)]);
    // 5001 bytes from page 0 of 2 KiB pages: pages 0, 1, 2, extended erase.
    assert_eq!(sim.erased, vec![vec![0, 1, 2]]);
    assert!(contains(&sim.written, &[cmd::EXTENDED_ERASE, 0xBB]));
    assert!(contains(&sim.written, &erase_frame(&[0, 1, 2], true)));
    // 19 blocks of 256 and a last one of 137 bytes padded to 140.
    assert_eq!(sim.writes.len(), 20);
    assert!(sim.writes[..19].iter().all(|&(_, n)| n == 256));
    assert_eq!(sim.writes[19], (0x0800_0000 + 19 * 256, 140));
    let mut last = image.bytes[4864..].to_vec();
    last.extend([0xFF; 3]);
    assert!(contains(&sim.written, &write_frame(&last)));
    assert_eq!(write_frame(&last)[0], 0x8B);
    // The flash holds the image, the padding and nothing else.
    assert_eq!(sim.flash_at(0x0800_0000, 5001), &image.bytes[..]);
    assert!(sim.flash[5001..6144].iter().all(|&b| b == 0xFF));
    // Read back in 256-byte blocks, the image streamed in at most 256 bytes.
    assert_eq!(sim.reads.len(), 20);
    assert_eq!(sim.reads[19], (0x0800_0000 + 19 * 256, 137));
    assert!(image.largest_read <= 256);
    assert_eq!(sim.go, vec![0x0800_0000]);
    // Progress in every phase, ending complete.
    for phase in [Phase::Erase, Phase::Transfer, Phase::Verify, Phase::Finish] {
        let last = sim.progress.iter().rev().find(|p| p.2 == phase).unwrap();
        assert_eq!(last.0, last.1, "{phase:?}");
    }
    assert_eq!(
        sim.progress.iter().rev().find(|p| p.2 == Phase::Transfer),
        Some(&(5001, 5001, Phase::Transfer))
    );
}

#[test]
fn standard_erase_from_an_unaligned_address() {
    let mut sim = Sim::standard_erase();
    let mut image = MemImage::pattern(3000);
    let s = settings(&[("address", "0x08004100"), ("go", "false")]);
    let r = flash(&mut sim, &mut image, &s).unwrap();
    // 0x4100..0x4CB8 with 2 KiB pages: pages 8 and 9, one byte each.
    assert_eq!(sim.erased, vec![vec![8, 9]]);
    assert!(contains(
        &sim.written,
        &[cmd::ERASE, 0xBC, 1, 8, 9, 1 ^ 8 ^ 9]
    ));
    assert_eq!(sim.flash_at(0x0800_4100, 3000), &image.bytes[..]);
    assert!(sim.go.is_empty());
    assert!(r.summary.contains("standard"), "{}", r.summary);
    assert!(
        sim.logs
            .iter()
            .any(|(l, m)| *l == Level::Warn && m.contains("not at a page start"))
    );
}

#[test]
fn mass_erase_extended_and_standard() {
    for (mut sim, frame) in [
        (
            Sim::new(),
            vec![cmd::EXTENDED_ERASE, 0xBB, 0xFF, 0xFF, 0x00],
        ),
        (Sim::standard_erase(), vec![cmd::ERASE, 0xBC, 0xFF, 0x00]),
    ] {
        sim.flash[100_000] = 0x12;
        let mut image = MemImage::pattern(1024);
        flash(&mut sim, &mut image, &settings(&[("mass_erase", "true")])).unwrap();
        assert_eq!(sim.mass_erases, 1);
        assert!(sim.erased.is_empty());
        assert!(contains(&sim.written, &frame));
        assert_eq!(sim.flash[100_000], 0xFF);
    }
}

#[test]
fn page_layout_from_the_part_table_and_sectors() {
    // PID 0x410: 1 KiB pages from the table.
    let mut sim = Sim::new();
    sim.pid = 0x410;
    sim.page_size = 1024;
    sim.flash.truncate(128 * 1024);
    let mut image = MemImage::pattern(2500);
    flash(&mut sim, &mut image, &settings(&[])).unwrap();
    assert_eq!(sim.erased, vec![vec![0, 1, 2]]);

    // An explicit page_size wins; batches of 32 pages per command.
    let mut sim = Sim::new();
    sim.page_size = 1024;
    let mut image = MemImage::pattern(40 * 1024);
    flash(&mut sim, &mut image, &settings(&[("page_size", "1K")])).unwrap();
    assert_eq!(sim.erased.len(), 2);
    assert_eq!(sim.erased[0], (0..32).collect::<Vec<u16>>());
    assert_eq!(sim.erased[1], (32..40).collect::<Vec<u16>>());
}

#[test]
fn a_nacked_write_block_is_retried() {
    let mut sim = Sim::new();
    sim.faults.nack_write.insert(0x0800_0100, 2);
    let mut image = MemImage::pattern(1024);
    let r = flash(&mut sim, &mut image, &settings(&[])).unwrap();
    assert_eq!(r.retries, 2);
    assert_eq!(sim.flash_at(0x0800_0000, 1024), &image.bytes[..]);
}

#[test]
fn a_write_nacked_every_time_is_a_device_error() {
    let mut sim = Sim::new();
    sim.faults.nack_write.insert(0x0800_4100, 100);
    let mut image = MemImage::pattern(0x5000);
    let err = flash(&mut sim, &mut image, &settings(&[])).unwrap_err();
    assert_eq!(
        err,
        Error::Device("write memory at 0x08004100: NACK after 4 attempts".into())
    );
}

#[test]
fn a_lost_ack_is_resynced_and_not_written_twice() {
    let mut sim = Sim::new();
    sim.faults.lose_write_ack.insert(0x0800_0200, 1);
    let mut image = MemImage::pattern(1024);
    let r = flash(&mut sim, &mut image, &settings(&[])).unwrap();
    assert_eq!(r.retries, 1);
    // The block landed the first time: the retry read it back instead of
    // writing it again (NOR flash would refuse).
    assert_eq!(sim.writes.iter().filter(|w| w.0 == 0x0800_0200).count(), 1);
    assert_eq!(sim.flash_at(0x0800_0000, 1024), &image.bytes[..]);
}

#[test]
fn readback_mismatch_names_the_address() {
    let mut sim = Sim::new();
    sim.faults.corrupt = Some(0x0800_0105);
    let mut image = MemImage::pattern(1024);
    let err = flash(&mut sim, &mut image, &settings(&[])).unwrap_err();
    let want = image.bytes[0x105];
    assert_eq!(
        err,
        Error::Device(format!(
            "read-back mismatch at 0x08000105: the flash holds 0x00, the image 0x{want:02X}"
        ))
    );
    assert!(sim.go.is_empty());
}

#[test]
fn silence_is_a_bounded_timeout() {
    let mut sim = Sim::new();
    sim.faults.mute = true;
    let mut image = MemImage::pattern(1024);
    let err = flash(&mut sim, &mut image, &settings(&[])).unwrap_err();
    assert_eq!(
        err,
        Error::Timeout(
            "no answer to the 0x7F sync within 1000 ms, 4 attempts (is the device in its \
             bootloader? check reset_sequence / BOOT0)"
                .into()
        )
    );
    assert_eq!(sim.written, vec![0x7F; 4]);
    assert!(sim.now <= 4000, "{}", sim.now);
}

#[test]
fn a_device_that_goes_silent_mid_transfer() {
    let mut sim = Sim::new();
    sim.faults.mute_from_write = Some(0x0800_0300);
    let mut image = MemImage::pattern(2048);
    let err = flash(&mut sim, &mut image, &settings(&[])).unwrap_err();
    assert!(
        matches!(&err, Error::Timeout(m) if m.starts_with("write memory at 0x08000300: no answer within 1000 ms after 4 attempts")),
        "{err:?}"
    );
    // Bounded: 4 waits and 3 resyncs of two 0x7F each.
    assert!(sim.now <= 10_100, "{}", sim.now);
}

#[test]
fn a_nack_to_the_sync_means_already_synced() {
    let mut sim = Sim::new();
    sim.faults.sync_nack = true;
    let mut image = MemImage::pattern(256);
    flash(&mut sim, &mut image, &settings(&[])).unwrap();
    assert_eq!(sim.written[0], 0x7F);
    assert_eq!(&sim.written[1..3], &[cmd::GET, 0xFF]);
    assert!(sim.logs.iter().any(|(_, m)| m.contains("already synced")));
}

#[test]
fn reset_and_run_sequences_drive_the_lines() {
    let mut sim = Sim::new();
    let mut image = MemImage::pattern(256);
    let s = settings(&[
        ("reset_sequence", "rts=1,dtr=1,sleep=100,dtr=0,sleep=50"),
        ("run_sequence", "rts=0,dtr=1,sleep=20,dtr=0"),
    ]);
    flash(&mut sim, &mut image, &s).unwrap();
    assert_eq!(sim.lines[..2], [(0, true, true), (100, false, true)]);
    let end = &sim.lines[2..];
    assert_eq!(end.len(), 2);
    assert_eq!((end[0].1, end[0].2), (true, false));
    assert_eq!(end[1].0 - end[0].0, 20);
    assert_eq!((end[1].1, end[1].2), (false, false));
    // The 0x7F went out after the sequence.
    assert_eq!(sim.written[0], 0x7F);
}

#[test]
fn no_modem_lines_is_a_warning_and_named_on_timeout() {
    let mut sim = Sim::new();
    sim.faults.no_lines = true;
    let mut image = MemImage::pattern(256);
    let s = settings(&[("reset_sequence", "dtr=1,sleep=10,dtr=0")]);
    flash(&mut sim, &mut image, &s).unwrap();
    assert!(
        sim.logs
            .iter()
            .any(|(l, m)| *l == Level::Warn && m.contains("no DTR/RTS"))
    );

    let mut sim = Sim::new();
    sim.faults.no_lines = true;
    sim.faults.mute = true;
    let err = flash(&mut sim, &mut image, &s).unwrap_err();
    assert!(
        matches!(&err, Error::Timeout(m) if m.ends_with("reset_sequence could not be applied: the link has no DTR/RTS")),
        "{err:?}"
    );
}

#[test]
fn parity_unsupported() {
    let mut sim = Sim::new();
    sim.faults.no_parity = true;
    let mut image = MemImage::pattern(256);
    let err = flash(&mut sim, &mut image, &settings(&[])).unwrap_err();
    assert!(
        matches!(&err, Error::Options(m) if m.starts_with("option `parity` = even: the link cannot do even parity")),
        "{err:?}"
    );
    assert!(sim.written.is_empty());

    let mut sim = Sim::new();
    sim.faults.no_parity = true;
    flash(&mut sim, &mut image, &settings(&[("parity", "none")])).unwrap();
    assert_eq!(sim.configured, vec![(115_200, Parity::None)]);
}

#[test]
fn tcp_links_are_not_configured() {
    let mut sim = Sim::new();
    sim.kind = LinkKind::Tcp;
    let mut image = MemImage::pattern(256);
    flash(&mut sim, &mut image, &settings(&[])).unwrap();
    assert!(sim.configured.is_empty());
}

#[test]
fn too_large_for_the_part() {
    // PID 0x410 from the table: 128 KiB.
    let mut sim = Sim::new();
    sim.pid = 0x410;
    let mut image = MemImage::pattern(128 * 1024 + 4);
    let err = flash(&mut sim, &mut image, &settings(&[])).unwrap_err();
    assert_eq!(
        err,
        Error::Verify(
            "image of 131076 bytes does not fit the 128 KiB flash of PID 0x410 from 0x08000000"
                .into()
        )
    );
    assert!(sim.erased.is_empty() && sim.writes.is_empty());

    // flash_size wins over the table; the start address counts.
    let mut sim = Sim::new();
    let mut image = MemImage::pattern(60 * 1024);
    let s = settings(&[("flash_size", "64K"), ("address", "0x08002000")]);
    let err = flash(&mut sim, &mut image, &s).unwrap_err();
    assert_eq!(
        err,
        Error::Verify(
            "image of 61440 bytes does not fit the 64 KiB flash (flash_size) from 0x08002000"
                .into()
        )
    );

    // An unknown PID: no check, a log line.
    let mut sim = Sim::new();
    sim.pid = 0x999;
    let mut image = MemImage::pattern(256);
    flash(&mut sim, &mut image, &settings(&[])).unwrap();
    assert!(sim.logs.iter().any(|(_, m)| m.contains("no fit check")));
}

#[test]
fn verify_checks_size_and_header() {
    let mut image = MemImage::pattern(256 * 1024);
    let v = verify(&mut image, &settings(&[("flash_size", "256K")])).unwrap();
    assert_eq!(v.payload_size, 256 * 1024);
    let err = verify(&mut image, &settings(&[("flash_size", "128K")])).unwrap_err();
    assert!(matches!(err, Error::Verify(m) if m.contains("does not fit the 128 KiB flash")));
    assert!(verify(&mut MemImage::new(vec![]), &settings(&[])).is_err());

    let mut image = MemImage::new(vec![0x00, 0x50, 0x00, 0x20, 1, 2, 3]);
    verify(&mut image, &settings(&[("header_magic", "00500020")])).unwrap();
    let err = verify(&mut image, &settings(&[("header_magic", "00500030")])).unwrap_err();
    assert_eq!(
        err,
        Error::Verify(
            "header: the image starts with 00 50 00 20, header_magic expects 00 50 00 30".into()
        )
    );
}

#[test]
fn missing_commands_are_named() {
    let mut sim = Sim::new();
    sim.commands.retain(|&c| c != cmd::READ_MEMORY);
    let mut image = MemImage::pattern(256);
    let err = flash(&mut sim, &mut image, &settings(&[])).unwrap_err();
    assert!(
        matches!(&err, Error::Device(m) if m.contains("READ MEMORY")),
        "{err:?}"
    );
    // Without read-back it works.
    flash(
        &mut sim,
        &mut image,
        &settings(&[("verify_readback", "false")]),
    )
    .unwrap();
}

#[test]
fn identify_reads_the_version_and_leaves() {
    let mut sim = Sim::new();
    sim.flash[0x200..0x20A].copy_from_slice(b" 2.4.1-rc\0");
    let s = settings(&[("version_address", "0x08000200"), ("version_length", "16")]);
    let d = identify(&mut sim, &s).unwrap();
    assert_eq!(d.version, "2.4.1-rc");
    assert_eq!(
        d.model.as_deref(),
        Some("STM32F10x high-density (PID 0x414)")
    );
    assert_eq!(d.hardware_id.as_deref(), Some("0x414"));
    assert_eq!(
        d.attributes,
        vec![("bootloader_version".to_string(), "3.1".to_string())]
    );
    assert_eq!(sim.reads, vec![(0x0800_0200, 16)]);
    assert_eq!(sim.go, vec![0x0800_0000]);

    // Erased flash: no version.
    let mut sim = Sim::new();
    let err = identify(&mut sim, &s).unwrap_err();
    assert!(matches!(&err, Error::Device(m) if m.contains("no version string at 0x08000200")));

    // Without version_address: unsupported, nothing sent.
    let mut sim = Sim::new();
    let err = identify(&mut sim, &settings(&[])).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)));
    assert!(sim.written.is_empty());
}
