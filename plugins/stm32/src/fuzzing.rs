//! What one input of the `stm32_session` fuzz target does (`fuzz/`), shared
//! with the test that replays the committed corpus (not compiled for wasm;
//! hidden from the docs).
//!
//! The input is what a bootloader sends: 3 bytes choose the settings, the
//! image size and link faults, the rest is a [`Script`] of the bootloader's
//! bytes on a virtual clock. `flash` (or `identify`) runs against it to the
//! end; nothing may panic, and what it reports must hold.

use otagw_plugin_sdk::fuzzing::{FuzzPort, Script};
use otagw_plugin_sdk::testing::MemImage;
use otagw_plugin_sdk::{DeviceInfo, Error, Family, FlashReport, LinkKind};

use crate::Stm32;
use crate::options::Settings;
use crate::protocol::{MAX_BLOCK, write_frame};

/// The image of a `stm32_session` input: `(b >> 2) + 1` times 21 pattern
/// bytes (21..=1344: up to six 256-byte blocks, every other size unaligned).
pub fn session_image(b: u8) -> Vec<u8> {
    let len = (usize::from(b >> 2) + 1) * 21;
    (0..len).map(|i| (i * 7 + i / 253) as u8).collect()
}

/// The settings the first two bytes choose, through the option parser (so
/// only settings an operator can write).
pub fn session_settings(flags: u8, b: u8) -> Settings {
    let mut o: Vec<(&str, &str)> = vec![
        ("reset_sequence", "rts=1,dtr=1,sleep=10,dtr=0,sleep=20"),
        ("run_sequence", "rts=0,dtr=1,sleep=10,dtr=0"),
        ("retries", ["0", "1", "2", "3"][usize::from(b & 3)]),
        (
            "verify_readback",
            if flags & 0x10 != 0 { "false" } else { "true" },
        ),
        ("go", if flags & 0x20 != 0 { "false" } else { "true" }),
        (
            "mass_erase",
            if flags & 0x40 != 0 { "true" } else { "false" },
        ),
        ("version_address", "0x08000400"),
        ("version_length", "16"),
    ];
    if flags & 0x80 != 0 {
        o.extend([("flash_size", "64K"), ("page_size", "1K")]);
    }
    if flags & 0x04 != 0 {
        // A link that cannot set parity: what a simulator on a pty uses.
        o.push(("parity", "none"));
    }
    let o: Vec<(String, String)> = o
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Stm32::settings_from_text(&o).expect("the fuzz settings are valid")
}

/// What [`session`] ran and how it ended.
#[derive(Debug)]
pub enum Outcome {
    Flash(Result<FlashReport, Error>),
    Identify(Result<DeviceInfo, Error>),
    /// Fewer than the 3 header bytes.
    Short,
}

/// One input of the `stm32_session` target:
/// `[settings][image][faults][script...]`.
///
/// - settings: bit 0 `identify` instead of `flash`, bit 1 a TCP link, bit 2
///   `configure` unsupported (and `parity = none`), bit 3 no DTR/RTS, bit 4
///   no read-back, bit 5 no GO, bit 6 mass erase, bit 7 `flash_size = 64K`
///   and `page_size = 1K`;
/// - image: bits 0-1 retries (0..=3), the rest the size ([`session_image`]);
/// - faults: bits 0-3 writes fail after that many (0: never), bit 4 `drain`
///   unsupported, bit 5 reads fail once the script is over.
pub fn session(data: &[u8]) -> Outcome {
    let [flags, b, faults, script @ ..] = data else {
        return Outcome::Short;
    };
    let s = session_settings(*flags, *b);
    let mut port = FuzzPort::new(Script::parse(script), *faults);
    if flags & 2 != 0 {
        port.kind = LinkKind::Tcp;
    }
    port.configure_unsupported = flags & 4 != 0;
    port.lines_unsupported = flags & 8 != 0;
    if flags & 1 != 0 {
        let r = crate::flash::identify(&mut port, &s);
        if let Ok(d) = &r {
            assert!(
                !d.version.is_empty() && d.version.len() <= 16 * 3,
                "{:?}",
                d.version
            );
        }
        return Outcome::Identify(r);
    }
    let image = session_image(*b);
    let len = image.len() as u64;
    let r = crate::flash::flash(&mut port, &mut MemImage::new(image.clone()), &s);
    if let Ok(report) = &r {
        assert_eq!(report.bytes_sent, len);
        // Every block of the image (padded with 0xFF) went out in a WRITE
        // MEMORY data frame.
        let w = &port.script.written;
        for block in image.chunks(MAX_BLOCK) {
            let mut block = block.to_vec();
            block.resize(block.len().div_ceil(4) * 4, 0xFF);
            let f = write_frame(&block);
            assert!(
                w.windows(f.len()).any(|x| x == f),
                "a block was never written"
            );
        }
    }
    Outcome::Flash(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::LineParity;
    use crate::testing::Sim;
    use otagw_plugin_sdk::fuzzing::{delay_code, replay, write_seeds};
    use otagw_plugin_sdk::{LinkFault, Port, SerialConfig};

    /// The simulated bootloader of `testing`, recording what it sends as a
    /// script: each chunk it delivers answers the last write when one came
    /// after the previous chunk.
    struct Recorder {
        sim: Sim,
        chunks: Vec<(bool, u8, Vec<u8>)>,
        last_write: u64,
        last_chunk: u64,
        wrote: bool,
    }

    impl Port for Recorder {
        fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
            self.wrote = true;
            self.last_write = self.sim.now;
            self.sim.write(data)
        }
        fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
            let got = self.sim.read(max, timeout_ms)?;
            if !got.is_empty() {
                let from = if self.wrote {
                    self.last_write
                } else {
                    self.last_chunk
                };
                let code = delay_code(self.sim.now - from);
                self.chunks.push((self.wrote, code, got.clone()));
                self.wrote = false;
                self.last_chunk = self.sim.now;
            }
            Ok(got)
        }
        fn now_ms(&mut self) -> u64 {
            self.sim.now
        }
        fn sleep(&mut self, ms: u32) {
            self.sim.sleep(ms);
        }
        fn drain(&mut self) -> Result<u32, LinkFault> {
            self.sim.drain()
        }
        fn configure(&mut self, config: SerialConfig) -> Result<(), LinkFault> {
            self.sim.configure(config)
        }
        fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkFault> {
            self.sim.set_lines(dtr, rts)
        }
        fn kind(&mut self) -> LinkKind {
            self.sim.kind()
        }
    }

    /// `[flags, b, 0]` run against `sim`; returns the input that replays it.
    fn record(flags: u8, b: u8, mut sim: Sim) -> Vec<u8> {
        let s = session_settings(flags, b);
        if flags & 2 != 0 {
            sim.kind = LinkKind::Tcp;
        }
        sim.faults.no_parity = flags & 4 != 0;
        sim.faults.no_lines = flags & 8 != 0;
        let mut rec = Recorder {
            sim,
            chunks: Vec::new(),
            last_write: 0,
            last_chunk: 0,
            wrote: false,
        };
        if flags & 1 != 0 {
            crate::flash::identify(&mut rec, &s).expect("identify against the simulator");
        } else {
            let mut image = MemImage::new(session_image(b));
            crate::flash::flash(&mut rec, &mut image, &s).expect("flash against the simulator");
        }
        let chunks: Vec<(bool, u8, &[u8])> = rec
            .chunks
            .iter()
            .map(|(g, c, bytes)| (*g, *c, bytes.as_slice()))
            .collect();
        [vec![flags, b, 0], Script::encode(&chunks)].concat()
    }

    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut versioned = Sim::new();
        versioned.flash[0x400..0x406].copy_from_slice(b"v3.1.4");
        vec![
            // 1050 bytes: 5 blocks, read back, GO, one retry allowed.
            ("flash-extended-erase", record(0x00, 0xc5, Sim::new())),
            (
                "flash-standard-erase-64k",
                record(0x80, 0x31, Sim::standard_erase()),
            ),
            ("flash-mass-erase-no-go", record(0x60, 0x12, Sim::new())),
            ("flash-tcp-no-readback", record(0x12, 0xfe, Sim::new())),
            ("identify", record(0x01, 0x00, versioned)),
        ]
    }

    #[test]
    fn seeds_replay_cleanly() {
        let seeds = seeds();
        for (name, input) in &seeds {
            match session(input) {
                Outcome::Flash(Ok(r)) => assert_eq!(r.retries, 0, "{name}: {r:?}"),
                Outcome::Identify(Ok(d)) => {
                    assert_eq!(d.version, "v3.1.4", "{name}");
                    assert_eq!(d.hardware_id.as_deref(), Some("0x414"), "{name}");
                }
                other => panic!("seed {name}: {other:?}"),
            }
        }
        write_seeds("stm32_session", &seeds);
    }

    #[test]
    fn silence_and_refusals() {
        assert!(matches!(session(&[0, 0]), Outcome::Short));
        match session(&[0, 0, 0]) {
            Outcome::Flash(Err(Error::Timeout(m))) => assert!(m.contains("0x7F"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Even parity on a link that cannot: an options error before any byte.
        let mut s = session_settings(0, 0);
        s.parity = LineParity::Even;
        let mut port = FuzzPort::new(Script::parse(&[]), 0);
        port.configure_unsupported = true;
        let r = crate::flash::flash(&mut port, &mut MemImage::new(vec![1; 8]), &s);
        assert!(matches!(r, Err(Error::Options(_))), "{r:?}");
        assert!(port.script.written.is_empty());
    }

    #[test]
    fn corpus_replays() {
        replay("stm32_session", |data| {
            session(data);
        });
    }
}
