//! One device session over any `AsyncRead + AsyncWrite` link: application mode (enter command,
//! version command), then the bootloader's receiver for XMODEM / XMODEM-1K / YMODEM with the
//! configured faults, then "boot" and back.
//!
//! This file is the receiver's rules (ACK, NAK, CAN, polls, timeouts); framing checks are in
//! `frame.rs`. It does not open, accept or close links: the caller owns the link and decides
//! what a [`SessionEnd`] means (see `transport.rs`).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use super::frame::{self, ACK, CAN, EOT, NAK, SOH, STX};
use super::{Protocol, Received, SimHandle};

use crate::pace::Pacer;
pub use crate::transport::SessionEnd;
use crate::transport::UnreadProbe;

/// Runs the device on `io` until the link closes, a disconnect fault fires or `cancel` fires.
/// Each session starts in application mode when `enter_command` is set, else in the bootloader.
pub async fn serve<S>(device: &SimHandle, io: S, cancel: &CancellationToken) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    serve_with(device, io, cancel, None).await
}

/// [`serve`], with an optional probe: when the peer has not read the previous start poll yet,
/// the next one is not sent (a pty with no reader would otherwise pile up 'C's, which a real
/// serial line with nobody listening would lose).
pub(crate) async fn serve_with<S>(
    device: &SimHandle,
    io: S,
    cancel: &CancellationToken,
    unread: Option<&UnreadProbe>,
) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn {
        io,
        cancel,
        unread,
        buf: vec![0; 4096].into_boxed_slice(),
        start: 0,
        end: 0,
    };
    loop {
        if let Err(end) = application(&mut conn, device).await {
            return end;
        }
        tracing::debug!("bootloader waiting for a transfer");
        let mut rx = Receiver::new(&mut conn, device);
        let result = rx.run().await;
        let started = rx.started;
        match result {
            Ok(()) => {}
            Err(Fail::End(end)) => {
                if started && !matches!(end, SessionEnd::Shutdown) {
                    device.record_abort(format!("link lost during the transfer: {end:?}"));
                }
                return end;
            }
            Err(Fail::Abort(reason)) => device.record_abort(reason),
            Err(Fail::Cancelled(reason)) => {
                device.record_abort(reason);
                // The sender may still be sending the rest of a block.
                if let Err(end) = conn.purge(device.config().block_timeout).await {
                    return end;
                }
            }
            Err(Fail::Stall(block)) => {
                device.record_abort(format!("stalled after block {block} (fault)"));
                loop {
                    if let Err(end) = conn.byte(None).await {
                        return end;
                    }
                }
            }
            Err(Fail::Disconnect(block)) => {
                device.record_abort(format!("disconnected after block {block} (fault)"));
                return SessionEnd::Disconnected;
            }
        }
    }
}

/// Application mode: answers the version command, returns once the enter command arrives.
async fn application<S>(conn: &mut Conn<'_, S>, device: &SimHandle) -> Result<(), SessionEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = device.config();
    let Some(enter) = cfg.enter_command.as_deref() else {
        return Ok(());
    };
    let keep = enter
        .len()
        .max(cfg.version_command.as_ref().map_or(0, Vec::len));
    let mut window = Vec::with_capacity(keep + 1);
    loop {
        let Some(b) = conn.byte(None).await? else {
            continue;
        };
        window.push(b);
        if window.len() > keep {
            window.remove(0);
        }
        if window.ends_with(enter) {
            tracing::info!("enter command received: entering the bootloader");
            return Ok(());
        }
        if let Some(command) = &cfg.version_command
            && window.ends_with(command)
        {
            window.clear();
            let answer = format!("{}\r\n", device.version());
            conn.send(answer.as_bytes()).await?;
        }
    }
}

/// The link with a read buffer, the shutdown token and the optional unread probe.
struct Conn<'a, S> {
    io: S,
    cancel: &'a CancellationToken,
    unread: Option<&'a UnreadProbe>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<S> Conn<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The next byte, or `None` when `wait` (the gap since the previous byte) passes first.
    async fn byte(&mut self, wait: Option<Duration>) -> Result<Option<u8>, SessionEnd> {
        if self.start == self.end {
            let deadline = wait.map(|w| Instant::now() + w);
            let read = self.io.read(&mut self.buf[..]);
            let read = async {
                match deadline {
                    Some(d) => timeout_at(d, read).await.ok(),
                    None => Some(read.await),
                }
            };
            let n = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Err(SessionEnd::Shutdown),
                r = read => match r {
                    None => return Ok(None),
                    Some(Ok(0)) => return Err(SessionEnd::PeerClosed),
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(SessionEnd::LinkError(e)),
                },
            };
            self.start = 0;
            self.end = n;
        }
        let b = self.buf[self.start];
        self.start += 1;
        Ok(Some(b))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionEnd> {
        let io = &mut self.io;
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Err(SessionEnd::Shutdown),
            r = write => r.map_err(SessionEnd::LinkError),
        }
    }

    /// Sends a start poll unless the peer has not read the previous output yet.
    async fn poll(&mut self, c: u8) -> Result<(), SessionEnd> {
        if let Some(unread) = self.unread
            && unread() > 0
        {
            return Ok(());
        }
        self.send(&[c]).await
    }

    /// Discards input until the line has been quiet for `quiet`.
    async fn purge(&mut self, quiet: Duration) -> Result<(), SessionEnd> {
        self.start = self.end;
        while self.byte(Some(quiet)).await?.is_some() {
            self.start = self.end;
        }
        Ok(())
    }
}

/// Why a transfer did not complete.
enum Fail {
    End(SessionEnd),
    /// Given up without sending CAN (the peer is silent or cancelled itself).
    Abort(String),
    /// Given up after sending CAN: the input is purged before going on.
    Cancelled(String),
    Stall(u32),
    Disconnect(u32),
}

impl From<SessionEnd> for Fail {
    fn from(end: SessionEnd) -> Self {
        Fail::End(end)
    }
}

/// What arrived where the receiver expected a block.
enum Packet {
    Block { num: u8, payload: Vec<u8> },
    Eot,
    Bad(String),
    Timeout,
}

/// The bootloader's receiver for one transfer (one XMODEM image or one YMODEM batch).
struct Receiver<'c, 'a, S> {
    conn: &'c mut Conn<'a, S>,
    device: &'c SimHandle,
    crc: bool,
    accept_1k: bool,
    start_char: u8,
    naks: u32,
    started: bool,
}

impl<'c, 'a, S> Receiver<'c, 'a, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn new(conn: &'c mut Conn<'a, S>, device: &'c SimHandle) -> Self {
        let mode = device.config().mode;
        Self {
            conn,
            device,
            crc: mode.uses_crc(),
            accept_1k: mode.accepts_1k(),
            start_char: mode.start_char(),
            naks: 0,
            started: false,
        }
    }

    async fn run(&mut self) -> Result<(), Fail> {
        match self.device.config().protocol {
            Protocol::Xmodem => {
                let (data, blocks) = self.data(true).await?;
                self.device.boot(Received {
                    data,
                    name: None,
                    declared_size: None,
                    blocks,
                    naks: self.naks,
                });
                Ok(())
            }
            Protocol::Ymodem => {
                let mut first = true;
                loop {
                    let Some(header) = self.header(first).await? else {
                        return Ok(());
                    };
                    if header.name.is_empty() {
                        tracing::debug!("YMODEM batch ended");
                        return Ok(());
                    }
                    tracing::info!(name = %header.name, size = ?header.size, "YMODEM file");
                    self.naks = 0;
                    let (mut data, blocks) = self.data(false).await?;
                    if let Some(size) = header.size {
                        data.truncate(usize::try_from(size).unwrap_or(usize::MAX));
                    }
                    self.device.boot(Received {
                        data,
                        name: Some(header.name),
                        declared_size: header.size,
                        blocks,
                        naks: self.naks,
                    });
                    first = false;
                }
            }
        }
    }

    /// Reads one packet. `expect` is `(data block index, block number)` of the next new data
    /// block (faults apply to it); `None` while waiting for YMODEM block 0.
    async fn packet(&mut self, wait: Duration, expect: Option<(u32, u8)>) -> Result<Packet, Fail> {
        let cfg = self.device.config();
        let len = loop {
            let Some(b) = self.conn.byte(Some(wait)).await? else {
                return Ok(Packet::Timeout);
            };
            match b {
                SOH => break 128,
                STX => break 1024,
                EOT => return Ok(Packet::Eot),
                CAN if self.conn.byte(Some(cfg.block_timeout)).await? == Some(CAN) => {
                    return Err(Fail::Abort("cancelled by the sender (CAN CAN)".into()));
                }
                _ => {} // line noise between blocks, or a lone CAN
            }
        };
        if !self.started {
            self.device.transfer_started();
        }
        self.started = true;
        let need = 2 + len + if self.crc { 2 } else { 1 };
        let mut lose = match (expect, cfg.faults.drop_bytes) {
            (Some((index, _)), Some((k, n)))
                if self.device.fire(Some(k), index, |f| &mut f.drop_bytes) =>
            {
                tracing::info!(block = index, bytes = n, "fault: losing bytes");
                n
            }
            _ => 0,
        };
        let mut body = Vec::with_capacity(need);
        while body.len() < need {
            let Some(b) = self.conn.byte(Some(cfg.block_timeout)).await? else {
                return Ok(Packet::Bad(format!(
                    "timeout inside a block after {} of {need} bytes",
                    body.len()
                )));
            };
            if lose > 0 {
                lose -= 1;
            } else {
                body.push(b);
            }
        }
        if len == 1024 && !self.accept_1k {
            return Ok(Packet::Bad("1K block refused in this mode".into()));
        }
        if let Some((index, num)) = expect
            && body[0] == num
            && self
                .device
                .fire(cfg.faults.corrupt, index, |f| &mut f.corrupt)
        {
            tracing::info!(block = index, "fault: corrupting payload");
            body[2 + len / 2] ^= 0x10;
        }
        match frame::check_block(&body, len, self.crc) {
            Ok(num) => {
                body.truncate(2 + len);
                body.drain(..2);
                Ok(Packet::Block { num, payload: body })
            }
            Err(frame::BlockError::BadComplement) => Ok(Packet::Bad("bad block complement".into())),
            Err(frame::BlockError::BadCheck) if self.crc => Ok(Packet::Bad("CRC mismatch".into())),
            Err(frame::BlockError::BadCheck) => Ok(Packet::Bad("checksum mismatch".into())),
        }
    }

    /// Counts an error and NAKs, or cancels after `max_errors` consecutive errors.
    async fn error(&mut self, reason: String, errors: &mut u32) -> Result<(), Fail> {
        *errors += 1;
        if *errors >= self.device.config().max_errors {
            self.conn.send(&[CAN, CAN, CAN]).await?;
            return Err(Fail::Cancelled(format!("too many errors, last: {reason}")));
        }
        tracing::debug!(%reason, "NAK");
        self.naks += 1;
        self.conn.send(&[NAK]).await?;
        Ok(())
    }

    async fn cancel(&mut self, reason: String) -> Result<(), Fail> {
        self.conn.send(&[CAN, CAN]).await?;
        Err(Fail::Cancelled(reason))
    }

    /// Waits for YMODEM block 0 and ACKs it. The first header of a batch is polled for as long
    /// as the start timeout allows; a following one `max_errors` times (`None` after that).
    async fn header(&mut self, first: bool) -> Result<Option<frame::YmodemHeader>, Fail> {
        let cfg = self.device.config();
        let begun = Instant::now();
        let (mut polls, mut errors) = (0, 0);
        let mut send_poll = true;
        loop {
            if send_poll {
                self.conn.poll(self.start_char).await?;
            }
            send_poll = true;
            match self.packet(cfg.poll_interval, None).await? {
                Packet::Timeout => {
                    polls += 1;
                    if !first && polls >= cfg.max_errors {
                        tracing::debug!("no further YMODEM header: batch over");
                        return Ok(None);
                    }
                    if first && cfg.start_timeout.is_some_and(|t| begun.elapsed() >= t) {
                        return Err(Fail::Abort("no transfer started".into()));
                    }
                }
                Packet::Bad(reason) => {
                    self.error(format!("block 0: {reason}"), &mut errors)
                        .await?;
                    send_poll = false;
                }
                Packet::Eot => {
                    if !first {
                        // The sender missed the ACK of its EOT.
                        self.conn.send(&[ACK]).await?;
                    }
                }
                Packet::Block { num: 0, payload } => {
                    self.conn.send(&[ACK]).await?;
                    return Ok(Some(frame::parse_ymodem_header(&payload)));
                }
                Packet::Block { num, .. } => {
                    self.cancel(format!("expected YMODEM block 0, got block {num}"))
                        .await?;
                }
            }
        }
    }

    /// Receives data blocks until the second EOT. `first`: this is the start of a transfer
    /// (XMODEM), polled for as long as the start timeout allows; else (after YMODEM block 0)
    /// polled `max_errors` times.
    async fn data(&mut self, first: bool) -> Result<(Vec<u8>, u32), Fail> {
        let cfg = self.device.config();
        let faults = &cfg.faults;
        let ymodem = cfg.protocol == Protocol::Ymodem;
        let begun = Instant::now();
        let mut data = Vec::new();
        let (mut blocks, mut errors, mut polls) = (0u32, 0, 0);
        let mut polling = true;
        let mut send_poll = true;
        let mut eot_naked = false;
        let mut pacer = cfg
            .line_rate
            .filter(|b| *b > 0)
            .map(|b| Pacer::new(b, Instant::now()));
        loop {
            let index = blocks + 1;
            let expect = (index & 0xff) as u8;
            if polling && send_poll {
                self.conn.poll(self.start_char).await?;
            }
            send_poll = true;
            let wait = if polling {
                cfg.poll_interval
            } else {
                cfg.block_timeout
            };
            match self.packet(wait, Some((index, expect))).await? {
                Packet::Timeout if polling => {
                    polls += 1;
                    if !first && polls >= cfg.max_errors {
                        self.conn.send(&[CAN, CAN, CAN]).await?;
                        return Err(Fail::Cancelled("no data block after YMODEM block 0".into()));
                    }
                    if first && cfg.start_timeout.is_some_and(|t| begun.elapsed() >= t) {
                        return Err(Fail::Abort("no transfer started".into()));
                    }
                }
                Packet::Timeout => {
                    self.error(format!("timeout waiting for block {index}"), &mut errors)
                        .await?;
                }
                Packet::Bad(reason) => {
                    polling = false;
                    self.error(format!("block {index}: {reason}"), &mut errors)
                        .await?;
                }
                Packet::Eot if !eot_naked => {
                    eot_naked = true;
                    send_poll = false;
                    self.conn.send(&[NAK]).await?;
                }
                Packet::Eot => {
                    self.conn.send(&[ACK]).await?;
                    tracing::info!(
                        blocks,
                        bytes = data.len(),
                        naks = self.naks,
                        "transfer complete"
                    );
                    return Ok((data, blocks));
                }
                Packet::Block { num, payload } if num == expect => {
                    polling = false;
                    if self.device.fire(faults.nak, index, |f| &mut f.nak) {
                        tracing::info!(block = index, "fault: NAK of a good block");
                        self.naks += 1;
                        self.conn.send(&[NAK]).await?;
                        continue;
                    }
                    errors = 0;
                    blocks = index;
                    if let Some(p) = pacer.as_mut() {
                        // The frame (header 3, payload, CRC 2) on the wire, then the ACK;
                        // a late wake-up is not the wire's (see `crate::pace`).
                        let frame = payload.len() + 5;
                        let start = p.arrived(frame, Instant::now());
                        let due = p.due(start, frame, 1);
                        tokio::time::sleep_until(due).await;
                        p.written(due, Instant::now());
                    }
                    data.extend_from_slice(&payload);
                    if index == 1 && self.device.config().refuse_image {
                        self.cancel("refused the image (refuse_image)".into())
                            .await?;
                    }
                    if self
                        .device
                        .fire(faults.cancel_after, index, |f| &mut f.cancel)
                    {
                        self.cancel(format!("cancelled after block {index} (fault)"))
                            .await?;
                    }
                    self.device.hold_at(index).await;
                    self.conn.send(&[ACK]).await?;
                    if self
                        .device
                        .fire(faults.stall_after, index, |f| &mut f.stall)
                    {
                        return Err(Fail::Stall(index));
                    }
                    if self
                        .device
                        .fire(faults.disconnect_after, index, |f| &mut f.disconnect)
                    {
                        return Err(Fail::Disconnect(index));
                    }
                }
                Packet::Block { num, .. }
                    if num == expect.wrapping_sub(1) && (blocks > 0 || ymodem) =>
                {
                    // A repeat of the previous block (the sender missed our ACK).
                    self.conn.send(&[ACK]).await?;
                }
                Packet::Block { num, .. } => {
                    self.cancel(format!("block {num} out of sequence, expected {expect}"))
                        .await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmodem::{Faults, XmodemSimConfig};
    use tokio::io::DuplexStream;

    fn block(num: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![if payload.len() == 1024 { STX } else { SOH }, num, !num];
        b.extend_from_slice(payload);
        b.extend_from_slice(&frame::crc16(payload).to_be_bytes());
        b
    }

    fn start(cfg: XmodemSimConfig) -> (SimHandle, DuplexStream, CancellationToken) {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("debug")
            .try_init();
        let device = SimHandle::new(cfg);
        let (ours, theirs) = tokio::io::duplex(8192);
        let cancel = CancellationToken::new();
        let (d, c) = (device.clone(), cancel.clone());
        tokio::spawn(async move { serve(&d, theirs, &c).await });
        (device, ours, cancel)
    }

    async fn expect(io: &mut DuplexStream, want: &[u8]) {
        let mut got = vec![0; want.len()];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test(start_paused = true)]
    async fn application_mode_answers_version_and_enters_the_bootloader() {
        let (_dev, mut io, cancel) = start(XmodemSimConfig {
            enter_command: Some(b"update\r".to_vec()),
            version_command: Some(b"version\r".to_vec()),
            version: "3.4.5".into(),
            ..XmodemSimConfig::default()
        });
        io.write_all(b"junk version\r").await.unwrap();
        expect(&mut io, b"3.4.5\r\n").await;
        io.write_all(b"update\r").await.unwrap();
        expect(&mut io, b"C").await;
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_sequence_block_cancels() {
        let (dev, mut io, cancel) = start(XmodemSimConfig::default());
        expect(&mut io, b"C").await;
        io.write_all(&block(2, &[1; 128])).await.unwrap();
        expect(&mut io, &[CAN, CAN]).await;
        assert!(dev.next_abort().await.contains("out of sequence"));
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn short_block_times_out_then_errors_cancel() {
        let (dev, mut io, cancel) = start(XmodemSimConfig {
            max_errors: 2,
            ..XmodemSimConfig::default()
        });
        expect(&mut io, b"C").await;
        let b = block(1, &[1; 128]);
        io.write_all(&b[..50]).await.unwrap();
        expect(&mut io, &[NAK]).await;
        io.write_all(&b[..50]).await.unwrap();
        expect(&mut io, &[CAN, CAN, CAN]).await;
        assert!(dev.next_abort().await.contains("too many errors"));
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn xmodem_single_block_with_duplicate_and_nak_fault() {
        let (dev, mut io, cancel) = start(XmodemSimConfig {
            faults: Faults {
                nak: Some(1),
                ..Faults::default()
            },
            ..XmodemSimConfig::default()
        });
        expect(&mut io, b"C").await;
        let b = block(
            1,
            b"FWVER:9.9\0"
                .iter()
                .copied()
                .chain([0x1a; 118])
                .collect::<Vec<_>>()
                .as_slice(),
        );
        io.write_all(&b).await.unwrap();
        expect(&mut io, &[NAK]).await;
        io.write_all(&b).await.unwrap();
        expect(&mut io, &[ACK]).await;
        io.write_all(&b).await.unwrap();
        expect(&mut io, &[ACK]).await;
        io.write_all(&[EOT]).await.unwrap();
        expect(&mut io, &[NAK]).await;
        io.write_all(&[EOT]).await.unwrap();
        expect(&mut io, &[ACK]).await;
        let image = dev.next_image().await;
        assert_eq!((image.data.len(), image.blocks, image.naks), (128, 1, 1));
        assert_eq!(dev.version(), "9.9");
        cancel.cancel();
    }

    /// Virtual time (tokio's paused clock): each block is ACKed no sooner than the block and
    /// the ACK take on the wire, and the timers' millisecond granularity does not add up over
    /// many blocks (at 921600 baud a 1K block is ~11.2 ms of wire; sleeping per block rounded
    /// up to the next millisecond cost ~10 %).
    #[tokio::test(start_paused = true)]
    async fn paced_blocks_take_their_wire_time_and_no_more() {
        const BLOCKS: u8 = 40;
        let bps = 921_600u64;
        let (dev, mut io, cancel) = start(XmodemSimConfig {
            line_rate: Some(bps as u32),
            ..XmodemSimConfig::default()
        });
        expect(&mut io, b"C").await;
        let t0 = Instant::now();
        for n in 1..=BLOCKS {
            io.write_all(&block(n, &[n; 1024])).await.unwrap();
            expect(&mut io, &[ACK]).await;
        }
        let elapsed = t0.elapsed();
        let wire = Duration::from_nanos(u64::from(BLOCKS) * (1029 + 1) * 10 * 1_000_000_000 / bps);
        assert!(
            elapsed >= wire && elapsed <= wire + Duration::from_millis(1),
            "{BLOCKS} blocks took {elapsed:?}, the wire {wire:?}"
        );
        io.write_all(&[EOT]).await.unwrap();
        expect(&mut io, &[NAK]).await;
        io.write_all(&[EOT]).await.unwrap();
        expect(&mut io, &[ACK]).await;
        assert_eq!(
            dev.next_image().await.data.len(),
            1024 * usize::from(BLOCKS)
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn start_timeout_gives_up_and_returns_to_application_mode() {
        let (dev, mut io, cancel) = start(XmodemSimConfig {
            enter_command: Some(b"u".to_vec()),
            version_command: Some(b"v".to_vec()),
            start_timeout: Some(Duration::from_secs(2)),
            ..XmodemSimConfig::default()
        });
        io.write_all(b"u").await.unwrap();
        assert_eq!(dev.next_abort().await, "no transfer started");
        io.write_all(b"v").await.unwrap();
        let mut seen = Vec::new();
        while !seen.ends_with(b"1.0.0\r\n") {
            seen.push(io.read_u8().await.unwrap());
        }
        let polls = &seen[..seen.len() - 7];
        assert!(
            polls.len() >= 3 && polls.iter().all(|b| *b == b'C'),
            "{seen:?}"
        );
        cancel.cancel();
    }
}
