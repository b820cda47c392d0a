//! What one input of the `xmodem_session` fuzz target does (`fuzz/`), shared
//! with the test that replays the committed corpus (not compiled for wasm;
//! hidden from the docs).
//!
//! The input is what a receiver sends: 3 bytes choose the settings, the image
//! size and link faults, the rest is a [`Script`] of the receiver's bytes on
//! a virtual clock. The sender (or `identify`) runs against it to the end;
//! nothing may panic, and what it reports must hold.

use otagw_plugin_sdk::fuzzing::{FuzzPort, Script};
use otagw_plugin_sdk::testing::MemImage;
use otagw_plugin_sdk::{Error, Family, FlashReport};

use crate::Xmodem;
use crate::options::{Protocol, Settings};
use crate::sender::ymodem_header;

/// The settings bits of the first byte choose (through the option parser, so
/// only settings an operator can write).
fn settings(flags: u8) -> Settings {
    let mut o: Vec<(&str, &str)> = vec![
        ("protocol", if flags & 1 != 0 { "ymodem" } else { "xmodem" }),
        ("block_size", if flags & 2 != 0 { "128" } else { "1024" }),
        ("small_tail", if flags & 4 != 0 { "false" } else { "true" }),
        (
            "retries",
            ["0", "1", "3", "10"][usize::from(flags >> 4 & 3)],
        ),
        ("version_command", "ver\\r"),
        ("version_timeout_ms", "2000"),
    ];
    if flags & 8 != 0 {
        o.extend([("enter_command", "update\\r"), ("enter_wait_ms", "100")]);
    }
    let o: Vec<(String, String)> = o
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Xmodem::settings_from_text(&o).expect("the fuzz settings are valid")
}

/// The image size the second byte chooses: 1..=9472 bytes.
pub fn image_len(b: u8) -> usize {
    (usize::from(b) + 1) * 37
}

/// What [`session`] ran and how it ended.
#[derive(Debug)]
pub enum Outcome {
    Flash(Result<FlashReport, Error>),
    Identify(Result<String, Error>),
    /// Fewer than the 3 header bytes.
    Short,
}

/// One input of the `xmodem_session` target:
/// `[settings][image size][faults][script...]`.
///
/// - settings: bit 0 YMODEM, bit 1 128-byte blocks, bit 2 no small tail,
///   bit 3 an enter command, bits 4-5 retries (0, 1, 3, 10), bit 7
///   `identify` instead of `flash`;
/// - image size: [`image_len`];
/// - faults: bits 0-3 writes fail after that many (0: never), bit 4 `drain`
///   unsupported, bit 5 reads fail once the script is over.
pub fn session(data: &[u8]) -> Outcome {
    let [flags, size, faults, script @ ..] = data else {
        return Outcome::Short;
    };
    let s = settings(*flags);
    let mut port = FuzzPort::new(Script::parse(script), *faults);
    if flags & 0x80 != 0 {
        let r = crate::version::identify(&mut port, &s);
        if let Ok(v) = &r {
            assert!(!v.is_empty() && v.trim() == v, "identify returned {v:?}");
            assert!(!v.contains(['\r', '\n']), "identify returned {v:?}");
        }
        return Outcome::Identify(r);
    }
    let len = image_len(*size);
    let image: Vec<u8> = (0..len).map(|i| (i * 13 + i / 255) as u8).collect();
    let r = crate::sender::flash(&mut port, &mut MemImage::new(image), &s);
    if let Ok(report) = &r {
        assert_eq!(report.bytes_sent, len as u64);
        let blocks = report
            .summary
            .split_once(&format!("{len} bytes in "))
            .and_then(|(_, rest)| rest.split(' ').next()?.parse::<u64>().ok())
            .expect("the summary counts the blocks");
        assert!(
            blocks >= (len as u64).div_ceil(1024),
            "{blocks} blocks for {len} bytes"
        );
        let w = &port.script.written;
        if let Some(cmd) = &s.enter_command {
            assert!(w.starts_with(cmd), "the enter command goes first");
        }
        if s.protocol == Protocol::Ymodem {
            let header = ymodem_header(&s.filename, len as u64);
            assert!(
                w.windows(header.len()).any(|x| x == header),
                "YMODEM sent no block 0 with the name and size"
            );
        }
    }
    Outcome::Flash(r)
}

/// Seed inputs: clean sessions of each kind, as a receiver that follows the
/// protocol would answer them (`(name, input)`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    const ACK: &[u8] = &[crate::sender::ACK];
    const NAK: &[u8] = &[crate::sender::NAK];
    let size = 60u8; // image_len(60) = 2257 bytes: two 1K blocks and a 128-byte tail
    let blocks_1k = 4; // 1024 + 1024 + 128 + 128 (small tail)
    let mut out = Vec::new();

    // XMODEM-1K, CRC: 'C', an ACK per block, NAK then ACK to the EOT.
    let mut chunks: Vec<(bool, u8, &[u8])> = vec![(false, 1, b"C")];
    chunks.extend(std::iter::repeat_n((true, 1, ACK), blocks_1k));
    chunks.extend([(true, 1, NAK), (true, 1, ACK)]);
    out.push((
        "xmodem-1k",
        [vec![0x30, size, 0], Script::encode(&chunks)].concat(),
    ));

    // Original XMODEM: NAK asks for checksum mode and 128-byte blocks.
    let blocks_128 = image_len(size).div_ceil(128);
    let mut chunks: Vec<(bool, u8, &[u8])> = vec![(false, 1, NAK)];
    chunks.extend(std::iter::repeat_n((true, 1, ACK), blocks_128 + 1));
    out.push((
        "xmodem-checksum",
        [vec![0x30, size, 0], Script::encode(&chunks)].concat(),
    ));

    // YMODEM after an enter command, with a boot banner: block 0, 'C', data, EOT, end of batch.
    let mut chunks: Vec<(bool, u8, &[u8])> = vec![
        (true, 3, b"Bootloader v1.2\r\nC"),
        (true, 1, ACK),
        (false, 2, b"C"),
    ];
    chunks.extend(std::iter::repeat_n((true, 1, ACK), blocks_1k));
    chunks.extend([(true, 1, ACK), (false, 1, b"C"), (true, 1, ACK)]);
    out.push((
        "ymodem",
        [vec![0x39, size, 0], Script::encode(&chunks)].concat(),
    ));

    // identify: the echo, then the version line.
    let chunks: Vec<(bool, u8, &[u8])> = vec![(true, 1, b"ver\r\n"), (false, 2, b"2.4.1\r\n> ")];
    out.push((
        "identify",
        [vec![0x80, 0, 0], Script::encode(&chunks)].concat(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_clean_sessions() {
        let seeds = seeds();
        for (name, input) in &seeds {
            match session(input) {
                Outcome::Flash(Ok(r)) => assert_eq!(r.retries, 0, "{name}: {r:?}"),
                Outcome::Identify(Ok(v)) => assert_eq!(v, "2.4.1", "{name}"),
                other => panic!("seed {name}: {other:?}"),
            }
        }
        otagw_plugin_sdk::fuzzing::write_seeds("xmodem_session", &seeds);
    }

    #[test]
    fn silence_ends_in_a_timeout_and_short_inputs_do_nothing() {
        assert!(matches!(session(&[0, 0]), Outcome::Short));
        match session(&[0, 0, 0]) {
            Outcome::Flash(Err(Error::Timeout(m))) => assert!(m.contains("handshake"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_link_that_closes_is_a_transfer_error() {
        let (_, mut input) = seeds().remove(0);
        input[2] = 2; // the third write fails
        assert!(matches!(
            session(&input),
            Outcome::Flash(Err(Error::Transfer(_)))
        ));
    }

    #[test]
    fn corpus_replays() {
        otagw_plugin_sdk::fuzzing::replay("xmodem_session", |data| {
            session(data);
        });
    }
}
