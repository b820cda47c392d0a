//! Line-rate pacing of the SMP and XMODEM devices, without I/O: when an answer (an SMP response,
//! an XMODEM ACK) may be written so that each exchange takes as long as it would on a real UART
//! at `bps` bits per second, 8N1 (10 bits a byte: start, 8 data, stop).
//!
//! A pseudo-terminal delivers a request at once. On a real wire its last byte arrives
//! `bytes × 10 / bps` after its first, and the answer's last byte arrives that much after the
//! answer starts. The device writes each answer whole at the moment its last byte would have
//! arrived on such a wire: the wire time of the request bytes heard plus that of the answer
//! (as the STM32 simulator does, there at 11 bits a byte). The two directions are separate (a
//! UART is full duplex), each busy for the bytes it carries.
//!
//! Timer overshoot: tokio's timers have millisecond granularity, so a device that simply slept
//! for each exchange would add up to about a millisecond per answer that no real wire has
//! (about 10 % per exchange at 921600 baud). The pacer remembers how late the last answer went
//! out and takes that off the arrival time of what the host sends next, so over a transfer
//! only the wire and the host's own turnaround add up. An answer never goes out before its
//! wire time.

use std::time::Duration;

use tokio::time::Instant;

/// Bits on the wire per byte at 8N1.
pub(crate) const BITS_PER_BYTE: u64 = 10;

/// The wire of one paced session.
#[derive(Debug)]
pub(crate) struct Pacer {
    bps: u64,
    /// When the host-to-device direction has carried everything heard so far.
    rx_free: Instant,
    /// When the device-to-host direction has carried the last answer.
    tx_free: Instant,
    /// How late the last answer was written after its due time (timer granularity, the
    /// device task's own scheduling): not the wire's, so not counted.
    lag: Duration,
}

impl Pacer {
    /// A quiet line at `bps` bits per second (more than 0).
    pub(crate) fn new(bps: u32, now: Instant) -> Self {
        Self {
            bps: u64::from(bps.max(1)),
            rx_free: now,
            tx_free: now,
            lag: Duration::ZERO,
        }
    }

    /// How long `bytes` take on the wire.
    pub(crate) fn wire(&self, bytes: usize) -> Duration {
        let nanos =
            bytes as u128 * u128::from(BITS_PER_BYTE) * 1_000_000_000 / u128::from(self.bps);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// `n` bytes were read at `now`: they went onto the wire at the returned instant (when the
    /// host sent them, late answers discounted, or when the wire was free), one after the other.
    pub(crate) fn arrived(&mut self, n: usize, now: Instant) -> Instant {
        let sent = now.checked_sub(self.lag).unwrap_or(now);
        let start = self.rx_free.max(sent);
        self.rx_free = start + self.wire(n);
        start
    }

    /// When to write an answer of `len` bytes to a request whose last byte was the `upto`-th
    /// byte of a read whose first byte went onto the wire at `start` (see [`Pacer::arrived`]).
    pub(crate) fn due(&mut self, start: Instant, upto: usize, len: usize) -> Instant {
        let heard = start + self.wire(upto);
        let due = heard.max(self.tx_free) + self.wire(len);
        self.tx_free = due;
        due
    }

    /// The answer due at `due` started to be written at `at`.
    pub(crate) fn written(&mut self, due: Instant, at: Instant) {
        self.lag = at.saturating_duration_since(due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_time_is_ten_bits_a_byte() {
        let p = Pacer::new(115_200, Instant::now());
        assert_eq!(p.wire(11_520), Duration::from_secs(1));
        let p = Pacer::new(921_600, Instant::now());
        assert_eq!(p.wire(1), Duration::from_nanos(10_850));
    }

    #[test]
    fn an_answer_waits_for_request_and_answer_and_late_writes_are_discounted() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10_000, t0); // 1 ms a byte
        let ms = Duration::from_millis;
        // 10 request bytes arrive at t0, the answer has 5.
        let start = p.arrived(10, t0);
        assert_eq!(start, t0);
        let due = p.due(start, 10, 5);
        assert_eq!(due, t0 + ms(15));
        // Written 0.7 ms late; the host answers 2 ms after it saw the answer.
        p.written(due, due + Duration::from_micros(700));
        let now = due + Duration::from_micros(2700);
        let start = p.arrived(4, now);
        assert_eq!(
            start,
            t0 + ms(17),
            "the device's lateness is not the wire's"
        );
        assert_eq!(p.due(start, 4, 1), t0 + ms(22));
    }

    #[test]
    fn bytes_queue_behind_each_other() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10_000, t0);
        let ms = Duration::from_millis;
        let first = p.arrived(10, t0);
        let second = p.arrived(10, t0 + ms(1));
        assert_eq!(second, first + ms(10), "the wire was still busy");
        assert_eq!(p.due(second, 10, 0), t0 + ms(20));
    }
}
