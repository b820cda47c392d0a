//! Support for the fuzz targets in `fuzz/` and for replaying their corpus as
//! ordinary tests (not compiled for wasm; hidden from the docs).
//!
//! What it is: [`Script`], a device's side of a byte link read from a fuzz
//! input on a virtual clock (no real time passes); [`FuzzPort`], the
//! [`Port`] over a script with the link faults an input chooses; and
//! [`replay`], which runs a target's function over every file of
//! `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`, so an input that
//! once crashed stays a test.
//!
//! What it is not: a device simulator. A script answers whatever the host
//! sends with the bytes the fuzzer chose.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use crate::port::{LinkFault, LinkKind, Phase, Port, SerialConfig};

/// Milliseconds of the delay code `code` (0..=127): `4 * code²`, so small
/// codes are fine steps and 127 is about 64 s, beyond every timeout.
pub fn delay_ms(code: u8) -> u64 {
    let c = u64::from(code & 0x7f);
    4 * c * c
}

/// The smallest delay code whose delay is at least `ms` (127 at most).
pub fn delay_code(ms: u64) -> u8 {
    (0u8..=127).find(|&c| delay_ms(c) >= ms).unwrap_or(127)
}

/// One chunk of a script: bytes the device sends.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    /// Released only after the host writes (counted from that write).
    gated: bool,
    delay: u64,
    bytes: VecDeque<u8>,
}

/// The device side of a link, as a fuzz input describes it.
///
/// The input is a sequence of chunks `[header][len][len bytes]` (a short last
/// chunk takes what is left). `header & 0x7f` is a delay code
/// ([`delay_ms`]); with `header & 0x80` the chunk *answers*: its delay counts
/// from the first write the host makes after the previous chunk was
/// delivered, and it is not sent before that write. Otherwise its delay counts
/// from the delivery of the previous chunk (from time 0 for the first).
/// After the last chunk the device is silent for ever.
///
/// Reads and sleeps advance the virtual clock; a read that times out advances
/// it by its whole timeout, so every wait of the host ends.
#[derive(Debug, Clone)]
pub struct Script {
    chunks: VecDeque<Chunk>,
    /// Virtual time, in milliseconds.
    pub now: u64,
    /// When the head chunk's delay started counting (None: a gated chunk
    /// still waiting for a write).
    anchor: Option<u64>,
    /// Bytes the host wrote, in order.
    pub written: Vec<u8>,
    /// Bytes `drain` discarded.
    pub drained: u64,
}

impl Script {
    /// The script an input describes.
    pub fn parse(input: &[u8]) -> Script {
        let mut chunks = VecDeque::new();
        let mut rest = input;
        while let [header, tail @ ..] = rest {
            let (len, tail) = match tail {
                [len, tail @ ..] => (usize::from(*len), tail),
                [] => (0, tail),
            };
            let n = len.min(tail.len());
            chunks.push_back(Chunk {
                gated: header & 0x80 != 0,
                delay: delay_ms(*header),
                bytes: tail[..n].iter().copied().collect(),
            });
            rest = &tail[n..];
        }
        let mut s = Script {
            chunks,
            now: 0,
            anchor: None,
            written: Vec::new(),
            drained: 0,
        };
        s.anchor = s.start_of_head(0);
        s
    }

    /// The encoding of `chunks` as `(answers a write, delay code, bytes)`:
    /// the inverse of [`Script::parse`], to write seed inputs.
    pub fn encode(chunks: &[(bool, u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (gated, code, bytes) in chunks {
            // Longer than a chunk holds: the rest follows at once.
            for (i, piece) in bytes.chunks(255).enumerate() {
                out.push(match i {
                    0 => (code & 0x7f) | if *gated { 0x80 } else { 0 },
                    _ => 0,
                });
                out.push(piece.len() as u8);
                out.extend_from_slice(piece);
            }
        }
        out
    }

    fn start_of_head(&self, finished_at: u64) -> Option<u64> {
        match self.chunks.front() {
            Some(c) if c.gated => None,
            _ => Some(finished_at),
        }
    }

    /// When the head chunk is due, if it is.
    fn due(&self) -> Option<u64> {
        let head = self.chunks.front()?;
        Some(self.anchor? + head.delay)
    }

    /// The head chunk was delivered (or dropped) at `now`.
    fn pop(&mut self) {
        self.chunks.pop_front();
        self.anchor = self.start_of_head(self.now);
    }

    /// The host writes `data`.
    pub fn write(&mut self, data: &[u8]) {
        self.written.extend_from_slice(data);
        if self.anchor.is_none() && !self.chunks.is_empty() {
            self.anchor = Some(self.now);
        }
    }

    /// Up to `max` bytes, waiting at most `timeout_ms` of virtual time for
    /// the first: empty when the time runs out.
    pub fn read(&mut self, max: u32, timeout_ms: u32) -> Vec<u8> {
        loop {
            let Some(due) = self.due() else {
                self.now += u64::from(timeout_ms);
                return Vec::new();
            };
            if due > self.now + u64::from(timeout_ms) {
                self.now += u64::from(timeout_ms);
                return Vec::new();
            }
            self.now = self.now.max(due);
            let head = self.chunks.front_mut().expect("a due chunk exists");
            if head.bytes.is_empty() {
                self.pop();
                continue;
            }
            let n = head.bytes.len().min(max as usize);
            let out: Vec<u8> = head.bytes.drain(..n).collect();
            if head.bytes.is_empty() {
                self.pop();
            } else {
                // The rest of a chunk already arrived.
                head.delay = 0;
                self.anchor = Some(self.now);
            }
            return out;
        }
    }

    /// Discard what has arrived by now; returns how many bytes.
    pub fn drain(&mut self) -> u32 {
        let mut n = 0u64;
        while let Some(due) = self.due() {
            if due > self.now {
                break;
            }
            let head = self.chunks.front().expect("a due chunk exists");
            n += head.bytes.len() as u64;
            self.pop();
        }
        self.drained += n;
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Let `ms` of virtual time pass.
    pub fn sleep(&mut self, ms: u32) {
        self.now += u64::from(ms);
    }

    /// Whether every chunk has been delivered or drained.
    pub fn finished(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// The device's side of a link from a [`Script`], with link faults: what the
/// byte-stream fuzz targets (`xmodem_session`, `stm32_session`) run the
/// families' protocol code against. Progress must never pass its total.
#[derive(Debug, Clone)]
pub struct FuzzPort {
    pub script: Script,
    pub kind: LinkKind,
    /// Writes fail (`closed`) after this many (0: never).
    pub close_after: usize,
    /// `drain` answers `unsupported`.
    pub drain_unsupported: bool,
    /// Once the script is over, reads fail instead of timing out.
    pub gone_at_end: bool,
    /// `configure` answers `unsupported` (a pseudo-terminal).
    pub configure_unsupported: bool,
    /// `set_lines` answers `unsupported`.
    pub lines_unsupported: bool,
    writes: usize,
}

impl FuzzPort {
    /// A serial link over `script` with the faults of one input byte: bits
    /// 0-3 writes fail after that many (0: never), bit 4 `drain`
    /// unsupported, bit 5 reads fail once the script is over.
    pub fn new(script: Script, faults: u8) -> FuzzPort {
        FuzzPort {
            script,
            kind: LinkKind::Serial,
            close_after: usize::from(faults & 0x0f),
            drain_unsupported: faults & 0x10 != 0,
            gone_at_end: faults & 0x20 != 0,
            configure_unsupported: false,
            lines_unsupported: false,
            writes: 0,
        }
    }
}

impl Port for FuzzPort {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.writes += 1;
        if self.close_after != 0 && self.writes > self.close_after {
            return Err(LinkFault::Closed("fuzz: the device went away".into()));
        }
        self.script.write(data);
        Ok(())
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        if self.gone_at_end && self.script.finished() {
            return Err(LinkFault::Io("fuzz: read failed".into()));
        }
        Ok(self.script.read(max, timeout_ms))
    }

    fn now_ms(&mut self) -> u64 {
        self.script.now
    }

    fn sleep(&mut self, ms: u32) {
        self.script.sleep(ms);
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        if self.drain_unsupported {
            return Err(LinkFault::Unsupported("fuzz: no drain".into()));
        }
        Ok(self.script.drain())
    }

    fn configure(&mut self, _: SerialConfig) -> Result<(), LinkFault> {
        if self.configure_unsupported {
            return Err(LinkFault::Unsupported("fuzz: no line settings".into()));
        }
        Ok(())
    }

    fn set_lines(&mut self, _: bool, _: bool) -> Result<(), LinkFault> {
        if self.lines_unsupported {
            return Err(LinkFault::Unsupported("fuzz: no DTR/RTS".into()));
        }
        Ok(())
    }

    fn kind(&mut self) -> LinkKind {
        self.kind.clone()
    }

    fn progress(&mut self, done: u64, total: u64, phase: Phase) {
        assert!(done <= total, "{phase:?} progress {done} of {total}");
    }
}

/// The repository's `fuzz/` folder.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Every input kept for `target`: the files of `fuzz/corpus/<target>/`
/// (what the fuzzer found, minimised), `fuzz/regressions/<target>/` (inputs
/// that once crashed; `cmin` never drops them) and, when present,
/// `fuzz/artifacts/<target>/` (crashes not fixed yet), sorted by path.
pub fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["corpus", "regressions", "artifacts"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Run `one` over every input of `target` (see [`inputs`]); panics naming
/// each input that panicked, and when the corpus is missing or empty.
pub fn replay(target: &str, one: impl Fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        !inputs.is_empty(),
        "no corpus for fuzz target `{target}` in {}",
        fuzz_dir().join("corpus").join(target).display()
    );
    let failed: Vec<String> = inputs
        .iter()
        .filter(|(_, data)| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| one(data))).is_err()
        })
        .map(|(path, _)| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "fuzz target `{target}`: {} of {} inputs panicked: {}",
        failed.len(),
        inputs.len(),
        failed.join(", ")
    );
}

/// With `OTAGW_FUZZ_WRITE_SEEDS` set, write `seeds` (name, input) into
/// `fuzz/corpus/<target>/` as `seed-<name>`: the tests that check the seeds
/// call this, so `OTAGW_FUZZ_WRITE_SEEDS=1 cargo test fuzzing` refreshes
/// them. Without the variable it does nothing.
pub fn write_seeds(target: &str, seeds: &[(&str, Vec<u8>)]) {
    if std::env::var_os("OTAGW_FUZZ_WRITE_SEEDS").is_none() {
        return;
    }
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    for (name, input) in seeds {
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, input).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_codes_round_up() {
        assert_eq!(delay_ms(0), 0);
        assert_eq!(delay_ms(1), 4);
        assert_eq!(delay_ms(0x80 | 2), 16);
        assert_eq!(delay_ms(127), 64_516);
        assert_eq!(delay_code(0), 0);
        assert_eq!(delay_code(5), 2);
        assert_eq!(delay_code(16), 2);
        assert_eq!(delay_code(1_000_000), 127);
    }

    #[test]
    fn chunks_come_on_time_and_answers_wait_for_a_write() {
        let input = Script::encode(&[(false, 5, b"hi"), (true, 1, b"ack"), (false, 0, b"!")]);
        let mut s = Script::parse(&input);
        // "hi" is due at 100 ms.
        assert_eq!(s.read(16, 50), b"");
        assert_eq!(s.now, 50);
        assert_eq!(s.read(1, 100), b"h");
        assert_eq!(s.now, 100);
        assert_eq!(s.read(16, 0), b"i");
        // "ack" waits for a write, however long the host listens.
        assert_eq!(s.read(16, 60_000), b"");
        assert_eq!(s.now, 60_100);
        s.write(b"cmd");
        assert_eq!(s.read(16, 3), b"");
        assert_eq!(s.read(16, 3), b"ack");
        assert_eq!(s.now, 60_104);
        // "!" follows at once; then silence for ever.
        assert_eq!(s.read(16, 0), b"!");
        assert!(s.finished());
        assert_eq!(s.read(16, 7), b"");
        assert_eq!(s.now, 60_111);
        assert_eq!(s.written, b"cmd");
    }

    #[test]
    fn drain_drops_only_what_arrived() {
        let input = Script::encode(&[(false, 0, b"banner"), (false, 10, b"late")]);
        let mut s = Script::parse(&input);
        assert_eq!(s.drain(), 6);
        s.sleep(399);
        assert_eq!(s.drain(), 0);
        s.sleep(1);
        assert_eq!(s.drain(), 4);
        assert!(s.finished());
    }

    #[test]
    fn short_and_odd_inputs_parse() {
        for input in [&[][..], &[0x85], &[0x01, 200, 1, 2], &[0, 0, 0, 0]] {
            let mut s = Script::parse(input);
            s.write(b"x");
            while !s.finished() {
                s.read(1, 1000);
            }
        }
        let long = Script::encode(&[(true, 0, &[7u8; 300])]);
        assert_eq!(long.len(), 300 + 4);
        let mut s = Script::parse(&long);
        s.write(b"?");
        assert_eq!(s.read(1000, 0).len(), 255);
        assert_eq!(s.read(1000, 0).len(), 45);
    }
}
