//! Test support for families (feature `testing`): [`MemImage`], an image in
//! memory; [`ScriptPort`], a scripted link on a fake clock; [`Wire`], the
//! timed byte queue both it and the families' device simulators answer
//! reads from; and the checks of a family's options ([`check_family`],
//! [`settings`], [`assert_refused`]).
//!
//! What it is: deterministic and instant. Time is a number the doubles
//! advance: a read that finds nothing advances the clock by its whole
//! timeout, a sleep by its length. Nothing here sleeps or spawns.
//!
//! What it is not: a device. A [`ScriptPort`] sends what the test scripted,
//! whatever the protocol; a family that needs a device's logic (an XMODEM
//! receiver, an SMP server) keeps its own simulator, built on [`Wire`].

use std::collections::VecDeque;

use crate::family::Family;
use crate::port::{Level, LinkFault, LinkFeature, LinkKind, Phase, Port, SerialConfig, Source};
use crate::schema::{self, Problem};

/// The settings of `F` from options written as operators write them,
/// through its schema and [`Family::settings`].
pub fn settings<F: Family>(options: &[(&str, &str)]) -> Result<F::Settings, Vec<Problem>> {
    let raw: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    F::settings_from_text(&raw)
}

/// What every family must pass: its schema is one the gateway accepts, its
/// defaults make settings, and no option set to any of
/// [`crate::HOSTILE_OPTION_VALUES`] panics the schema or [`Family::settings`]
/// (either may refuse it).
#[cfg(not(target_arch = "wasm32"))]
pub fn check_family<F: Family>() {
    let specs = F::info().options;
    if let Err(problems) = schema::validate_schema(&specs) {
        panic!("{}: the schema is refused: {problems:?}", F::info().name);
    }
    F::default_settings();
    let keys: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    crate::assert_no_option_value_panics(&keys, |raw| F::settings_from_text(raw).is_ok());
}

/// Each `(key, value, needle)`: `F` refuses the option `key` set to `value`
/// with a problem whose message contains `needle`.
pub fn assert_refused<F: Family>(cases: &[(&str, &str, &str)]) {
    for (k, v, needle) in cases {
        match settings::<F>(&[(k, v)]) {
            Ok(_) => panic!("{k} = {v:?} was accepted"),
            Err(problems) => assert!(
                problems.iter().any(|p| p.message.contains(needle)),
                "{k} = {v:?}: no problem says {needle:?}: {problems:?}"
            ),
        }
    }
}

/// A firmware image in memory; counts the reads and notes the largest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemImage {
    pub bytes: Vec<u8>,
    /// The largest `len` a read asked for.
    pub largest_read: u32,
    /// How many reads there were.
    pub reads: u32,
}

impl MemImage {
    pub fn new(bytes: Vec<u8>) -> MemImage {
        MemImage {
            bytes,
            ..MemImage::default()
        }
    }

    /// `len` bytes of a pattern that repeats with no block size, so a block
    /// put in the wrong place shows.
    pub fn pattern(len: usize) -> MemImage {
        MemImage::new((0..len).map(|i| (i * 7 + i / 251) as u8).collect())
    }
}

impl Source for MemImage {
    fn size(&mut self) -> u64 {
        self.bytes.len() as u64
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.reads += 1;
        self.largest_read = self.largest_read.max(len);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let end = start.saturating_add(len as usize).min(self.bytes.len());
        self.bytes[start..end].to_vec()
    }
}

/// Bytes on their way to the plugin, each chunk with the time (ms on the
/// fake clock) it arrives, in time order.
#[derive(Debug, Clone, Default)]
pub struct Wire {
    chunks: VecDeque<(u64, Vec<u8>)>,
}

impl Wire {
    /// `bytes` arrive at `at` (after the chunks already due by then).
    pub fn send(&mut self, at: u64, bytes: impl Into<Vec<u8>>) {
        let i = self.chunks.partition_point(|(t, _)| *t <= at);
        self.chunks.insert(i, (at, bytes.into()));
    }

    /// A read of at most `max` bytes waiting at most `timeout_ms` from
    /// `*now`: the clock moves to the first chunk's arrival and the read
    /// returns (part of) that chunk, or the clock moves by the whole timeout
    /// and the read returns nothing.
    pub fn read(&mut self, now: &mut u64, max: u32, timeout_ms: u32) -> Vec<u8> {
        match self.chunks.front_mut() {
            Some((at, bytes)) if *at <= *now + u64::from(timeout_ms) => {
                *now = (*now).max(*at);
                let n = bytes.len().min(max as usize);
                let got: Vec<u8> = bytes.drain(..n).collect();
                if bytes.is_empty() {
                    self.chunks.pop_front();
                }
                got
            }
            _ => {
                *now += u64::from(timeout_ms);
                Vec::new()
            }
        }
    }

    /// Throw away what has arrived by `now`; returns how many bytes.
    pub fn drain(&mut self, now: u64) -> u32 {
        let mut n = 0u32;
        while self.chunks.front().is_some_and(|(at, _)| *at <= now) {
            let (_, bytes) = self.chunks.pop_front().unwrap_or_default();
            n = n.saturating_add(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
        }
        n
    }

    /// Throw away everything, arrived or not.
    pub fn clear(&mut self) {
        self.chunks.clear();
    }

    /// Whether nothing is on its way.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// One scripted answer: the bytes that follow the next write (equal to
/// `expect`, when given) after `delay_ms`.
#[derive(Debug, Clone)]
struct Reply {
    expect: Option<Vec<u8>>,
    delay_ms: u64,
    bytes: Vec<u8>,
}

/// When the device goes away and when it can be reached again.
#[derive(Debug, Clone, Copy)]
struct Outage {
    from: u64,
    back: u64,
}

/// A scripted link on a fake clock, for protocol tests that need a few
/// exchanges rather than a simulated device.
///
/// The script: bytes that arrive at fixed times ([`ScriptPort::arrive`]),
/// answers to writes in order ([`ScriptPort::reply`],
/// [`ScriptPort::reply_to`]), and a device that goes away and comes back
/// ([`ScriptPort::drop_at`]). Everything the plugin does is recorded in the
/// public fields.
#[derive(Debug, Clone)]
pub struct ScriptPort {
    /// The fake clock, in ms.
    pub now: u64,
    /// Bytes still to arrive.
    pub wire: Wire,
    replies: VecDeque<Reply>,
    outage: Option<Outage>,
    kind: LinkKind,
    mtu: u32,
    missing: Vec<LinkFeature>,
    /// Every byte written, in order.
    pub written: Vec<u8>,
    /// Each write, with the time it was made.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// Bytes `drain` threw away.
    pub drained: u32,
    /// Each sleep's length.
    pub sleeps: Vec<u32>,
    /// Each `configure`.
    pub configured: Vec<SerialConfig>,
    /// Each `set_lines`, with its time: (ms, dtr, rts).
    pub lines: Vec<(u64, bool, bool)>,
    /// When each successful `reopen` returned.
    pub reopens: Vec<u64>,
    /// Each progress report.
    pub progress: Vec<(u64, u64, Phase)>,
    /// Each log line.
    pub logs: Vec<(Level, String)>,
}

impl Default for ScriptPort {
    fn default() -> Self {
        ScriptPort::new()
    }
}

impl ScriptPort {
    /// A serial link at time 0 on which nothing arrives.
    pub fn new() -> ScriptPort {
        ScriptPort {
            now: 0,
            wire: Wire::default(),
            replies: VecDeque::new(),
            outage: None,
            kind: LinkKind::Serial,
            mtu: 4096,
            missing: Vec::new(),
            written: Vec::new(),
            writes: Vec::new(),
            drained: 0,
            sleeps: Vec::new(),
            configured: Vec::new(),
            lines: Vec::new(),
            reopens: Vec::new(),
            progress: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// A link whose input is `(time, bytes)`: each arrives at its time.
    pub fn arrivals(script: Vec<(u64, Vec<u8>)>) -> ScriptPort {
        script
            .into_iter()
            .fold(ScriptPort::new(), |port, (at, bytes)| {
                port.arrive(at, bytes)
            })
    }

    /// `bytes` arrive at `at` ms.
    pub fn arrive(mut self, at: u64, bytes: impl Into<Vec<u8>>) -> ScriptPort {
        self.wire.send(at, bytes);
        self
    }

    /// The next write not answered yet, whatever it is, is answered with
    /// `bytes` `delay_ms` later.
    pub fn reply(mut self, delay_ms: u64, bytes: impl Into<Vec<u8>>) -> ScriptPort {
        self.replies.push_back(Reply {
            expect: None,
            delay_ms,
            bytes: bytes.into(),
        });
        self
    }

    /// The next write equal to `expect` (once the replies before this one
    /// are used) is answered with `bytes` `delay_ms` later; other writes are
    /// only recorded.
    pub fn reply_to(
        mut self,
        expect: impl Into<Vec<u8>>,
        delay_ms: u64,
        bytes: impl Into<Vec<u8>>,
    ) -> ScriptPort {
        self.replies.push_back(Reply {
            expect: Some(expect.into()),
            delay_ms,
            bytes: bytes.into(),
        });
        self
    }

    /// The device goes away at `at` ms (what has not been read is lost;
    /// writes and reads answer `closed`) and can be reached again `down_ms`
    /// later, through [`Port::reopen`].
    pub fn drop_at(mut self, at: u64, down_ms: u64) -> ScriptPort {
        self.outage = Some(Outage {
            from: at,
            back: at + down_ms,
        });
        self
    }

    /// A link of this kind (serial by default).
    pub fn with_kind(mut self, kind: LinkKind) -> ScriptPort {
        self.kind = kind;
        self
    }

    /// A link whose writes carry at most `mtu` bytes (4096 by default).
    pub fn with_mtu(mut self, mtu: u32) -> ScriptPort {
        self.mtu = mtu;
        self
    }

    /// A link that cannot do `feature`: its calls answer `unsupported`.
    pub fn without(mut self, feature: LinkFeature) -> ScriptPort {
        self.missing.push(feature);
        self
    }

    /// Whether every scripted reply has been sent.
    pub fn replies_used(&self) -> bool {
        self.replies.is_empty()
    }

    fn check(&self, feature: LinkFeature, what: &str) -> Result<(), LinkFault> {
        if self.missing.contains(&feature) {
            return Err(LinkFault::Unsupported(format!("script: no {what}")));
        }
        Ok(())
    }

    /// `Closed` once the device has gone away (by `now`).
    fn closed(&self) -> Result<(), LinkFault> {
        match self.outage {
            Some(o) if o.from <= self.now => {
                Err(LinkFault::Closed("script: the device went away".into()))
            }
            _ => Ok(()),
        }
    }
}

impl Port for ScriptPort {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.closed()?;
        self.written.extend_from_slice(data);
        self.writes.push((self.now, data.to_vec()));
        let answers = self
            .replies
            .front()
            .is_some_and(|r| r.expect.as_deref().is_none_or(|e| e == data));
        if answers && let Some(r) = self.replies.pop_front() {
            self.wire.send(self.now + r.delay_ms, r.bytes);
        }
        Ok(())
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        self.closed()?;
        // The device goes away during the wait: what arrives before still
        // comes; then the read fails.
        let until_gone = self.outage.map(|o| o.from - self.now);
        let wait = until_gone.map_or(timeout_ms, |ms| ms.min(u64::from(timeout_ms)) as u32);
        let got = self.wire.read(&mut self.now, max, wait);
        if got.is_empty() && wait < timeout_ms {
            self.closed()?;
        }
        Ok(got)
    }

    fn now_ms(&mut self) -> u64 {
        self.now
    }

    fn sleep(&mut self, ms: u32) {
        self.sleeps.push(ms);
        self.now += u64::from(ms);
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        self.closed()?;
        let n = self.wire.drain(self.now);
        self.drained += n;
        Ok(n)
    }

    fn configure(&mut self, config: SerialConfig) -> Result<(), LinkFault> {
        self.check(LinkFeature::Configure, "serial settings")?;
        self.configured.push(config);
        Ok(())
    }

    fn set_lines(&mut self, dtr: bool, rts: bool) -> Result<(), LinkFault> {
        self.check(LinkFeature::ModemLines, "DTR/RTS")?;
        self.lines.push((self.now, dtr, rts));
        Ok(())
    }

    fn mtu(&mut self) -> u32 {
        self.mtu
    }

    fn kind(&mut self) -> LinkKind {
        self.kind.clone()
    }

    fn supports(&mut self, feature: LinkFeature) -> bool {
        feature != LinkFeature::Gatt && !self.missing.contains(&feature)
    }

    /// Unread input is lost. A device that went away is reachable again at
    /// the end of its outage: the call waits for it when that is within
    /// `timeout_ms`, else fails with `timeout` after `timeout_ms`.
    fn reopen(&mut self, timeout_ms: u32) -> Result<(), LinkFault> {
        self.check(LinkFeature::Reopen, "reopen")?;
        let back = match self.outage {
            Some(o) if o.from <= self.now => o.back,
            _ => self.now,
        };
        if back > self.now + u64::from(timeout_ms) {
            self.now += u64::from(timeout_ms);
            return Err(LinkFault::Timeout(format!(
                "script: the device is not back within {timeout_ms} ms"
            )));
        }
        self.now = self.now.max(back);
        self.outage = None;
        self.wire.drain(self.now);
        self.reopens.push(self.now);
        Ok(())
    }

    fn progress(&mut self, done: u64, total: u64, phase: Phase) {
        self.progress.push((done, total, phase));
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::tests::Minimal;
    use crate::port::Parity;

    #[test]
    fn options_through_the_schema() {
        check_family::<Minimal>();
        assert_eq!(settings::<Minimal>(&[("n", "0x7")]), Ok(7));
        assert_refused::<Minimal>(&[("n", "10", "from 0 to 9"), ("m", "1", "unknown option")]);
    }

    #[test]
    fn arrivals_come_on_time_and_timeouts_move_the_clock() {
        let mut p = ScriptPort::arrivals(vec![(5, b"ab".to_vec()), (9, b"c".to_vec())]);
        assert_eq!(p.read(16, 4).unwrap(), b"");
        assert_eq!(p.now, 4);
        assert_eq!(p.read(1, 10).unwrap(), b"a");
        assert_eq!(p.now, 5);
        assert_eq!(p.read(16, 0).unwrap(), b"b");
        p.sleep(10);
        assert_eq!(p.drain().unwrap(), 1);
        assert_eq!(p.drained, 1);
        assert_eq!(p.sleeps, vec![10]);
    }

    #[test]
    fn replies_answer_writes_in_order() {
        let mut p = ScriptPort::new()
            .reply_to(b"ping".to_vec(), 3, b"pong".to_vec())
            .reply(1, b"!".to_vec());
        p.write(b"noise").unwrap();
        assert_eq!(p.read(16, 100).unwrap(), b"");
        p.write(b"ping").unwrap();
        assert_eq!(p.read(16, 100).unwrap(), b"pong");
        assert_eq!(p.now, 103);
        p.write(b"x").unwrap();
        assert_eq!(p.read(16, 100).unwrap(), b"!");
        assert!(p.replies_used());
        assert_eq!(p.written, b"noisepingx");
        assert_eq!(p.writes[1], (100, b"ping".to_vec()));
    }

    #[test]
    fn a_device_that_goes_away_comes_back_through_reopen() {
        let mut p = ScriptPort::new()
            .arrive(10, b"bye".to_vec())
            .arrive(40, b"lost".to_vec())
            .arrive(600, b"hello".to_vec())
            .drop_at(50, 500);
        assert_eq!(p.read(16, 1000).unwrap(), b"bye");
        assert_eq!(p.read(16, 1000).unwrap(), b"lost");
        assert!(matches!(p.read(16, 1000), Err(LinkFault::Closed(_))));
        assert_eq!(p.now, 50);
        assert!(matches!(p.write(b"?"), Err(LinkFault::Closed(_))));
        assert!(matches!(p.reopen(100), Err(LinkFault::Timeout(_))));
        assert_eq!(p.now, 150);
        p.reopen(1000).unwrap();
        assert_eq!(p.reopens, vec![550]);
        assert_eq!(p.read(16, 1000).unwrap(), b"hello");
        assert!(p.supports(LinkFeature::Reopen));
    }

    #[test]
    fn missing_features_are_unsupported() {
        let mut p = ScriptPort::new()
            .without(LinkFeature::ModemLines)
            .with_kind(LinkKind::Tcp);
        assert!(matches!(
            p.set_lines(true, true),
            Err(LinkFault::Unsupported(_))
        ));
        assert!(!p.supports(LinkFeature::ModemLines));
        p.configure(SerialConfig::eight_bits(9600, Parity::None))
            .unwrap();
        assert_eq!(p.configured.len(), 1);
        assert_eq!(p.kind(), LinkKind::Tcp);
    }

    #[test]
    fn mem_image_reads_within_bounds() {
        let mut img = MemImage::pattern(10);
        assert_eq!(img.read(8, 5).len(), 2);
        assert!(img.read(u64::MAX, 5).is_empty());
        assert_eq!((img.reads, img.largest_read), (2, 5));
    }
}
