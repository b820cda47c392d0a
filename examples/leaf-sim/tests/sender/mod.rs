//! A small, independent XMODEM / XMODEM-1K / YMODEM *sender* used to drive the simulator in
//! tests. Written from the protocol description, it shares no code with the simulator.
//! It is not the gateway's sender plugin and not meant for anything but these tests.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

const SOH: u8 = 0x01;
const STX: u8 = 0x02;
const EOT: u8 = 0x04;
const ACK: u8 = 0x06;
const NAK: u8 = 0x15;
const CAN: u8 = 0x18;
const PAD: u8 = 0x1a;

/// What went wrong on the sender's side.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The receiver sent CAN CAN.
    Cancelled,
    /// No usable answer within the retries.
    Timeout(&'static str),
    /// The link reached end of file or failed.
    Link(String),
}

/// Sender settings.
#[derive(Clone, Copy, Debug)]
pub struct SendOpts {
    /// Use 1K blocks when the receiver asked for CRC.
    pub use_1k: bool,
    /// How long to wait for each answer.
    pub answer_timeout: Duration,
    /// How often to resend one block or EOT.
    pub retries: u32,
}

impl Default for SendOpts {
    fn default() -> Self {
        Self {
            use_1k: true,
            answer_timeout: Duration::from_secs(3),
            retries: 10,
        }
    }
}

/// What the sender did.
#[derive(Debug, Default)]
pub struct Sent {
    /// The bytes as framed, pad included (what an XMODEM receiver keeps).
    pub padded: Vec<u8>,
    /// Blocks sent, resends included.
    pub transmissions: u32,
    /// NAKs received for data blocks.
    pub naks: u32,
    /// Whether any 1K block was acknowledged.
    pub used_1k: bool,
}

fn crc16(data: &[u8]) -> u16 {
    // Bitwise CRC-16/XMODEM, independent of the `crc` crate the simulator uses.
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn frame(num: u8, payload: &[u8], crc: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 5);
    f.push(if payload.len() == 1024 { STX } else { SOH });
    f.push(num);
    f.push(255 - num);
    f.extend_from_slice(payload);
    if crc {
        f.extend_from_slice(&crc16(payload).to_be_bytes());
    } else {
        f.push(payload.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    }
    f
}

pub struct Sender<S> {
    io: S,
    opts: SendOpts,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sender<S> {
    pub fn new(io: S, opts: SendOpts) -> Self {
        Self { io, opts }
    }

    async fn byte(&mut self, wait: Duration) -> Result<Option<u8>, SendError> {
        match timeout(wait, self.io.read_u8()).await {
            Err(_) => Ok(None),
            Ok(Ok(b)) => Ok(Some(b)),
            Ok(Err(e)) => Err(SendError::Link(e.to_string())),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|e| SendError::Link(e.to_string()))?;
        self.io
            .flush()
            .await
            .map_err(|e| SendError::Link(e.to_string()))
    }

    /// Reads until `line` ends with `\n` (answer of a version command).
    pub async fn read_line(&mut self) -> Result<String, SendError> {
        let mut line = Vec::new();
        while !line.ends_with(b"\n") {
            match self.byte(self.opts.answer_timeout).await? {
                Some(b) => line.push(b),
                None => return Err(SendError::Timeout("line")),
            }
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Waits for the receiver's start character: `Ok(true)` for 'C' (CRC), `Ok(false)` for NAK.
    pub async fn wait_start(&mut self) -> Result<bool, SendError> {
        for _ in 0..self.opts.retries {
            match self.byte(self.opts.answer_timeout).await? {
                Some(b'C') => return Ok(true),
                Some(NAK) => return Ok(false),
                Some(CAN) => return Err(SendError::Cancelled),
                _ => {}
            }
        }
        Err(SendError::Timeout("start character"))
    }

    /// Sends one frame until ACKed. `Ok(false)` when a 1K frame was NAKed and `fallback` says
    /// to give up on it at once.
    async fn send_frame(
        &mut self,
        f: &[u8],
        sent: &mut Sent,
        fallback: bool,
    ) -> Result<bool, SendError> {
        for _ in 0..self.opts.retries {
            self.write(f).await?;
            sent.transmissions += 1;
            loop {
                match self.byte(self.opts.answer_timeout).await? {
                    Some(ACK) => return Ok(true),
                    Some(NAK) => {
                        sent.naks += 1;
                        if fallback {
                            return Ok(false);
                        }
                        break;
                    }
                    Some(CAN) => {
                        if self.byte(self.opts.answer_timeout).await? == Some(CAN) {
                            return Err(SendError::Cancelled);
                        }
                    }
                    Some(_) => {} // a stale poll
                    None => break,
                }
            }
        }
        Err(SendError::Timeout("ACK of a block"))
    }

    /// Sends `data` as blocks 1.. after the start character was seen; then EOT until ACKed.
    pub async fn send_data(&mut self, data: &[u8], crc: bool) -> Result<Sent, SendError> {
        let mut sent = Sent::default();
        let mut use_1k = self.opts.use_1k && crc;
        let (mut offset, mut num) = (0usize, 1u8);
        while offset < data.len() {
            let rest = data.len() - offset;
            let size = if use_1k && rest > 128 { 1024 } else { 128 };
            let mut payload = data[offset..(offset + size).min(data.len())].to_vec();
            payload.resize(size, PAD);
            let f = frame(num, &payload, crc);
            if !self.send_frame(&f, &mut sent, size == 1024).await? {
                use_1k = false;
                continue;
            }
            sent.used_1k |= size == 1024;
            sent.padded.extend_from_slice(&payload);
            offset += size;
            num = num.wrapping_add(1);
        }
        for _ in 0..self.opts.retries {
            self.write(&[EOT]).await?;
            match self.byte(self.opts.answer_timeout).await? {
                Some(ACK) => return Ok(sent),
                Some(CAN) => return Err(SendError::Cancelled),
                _ => {}
            }
        }
        Err(SendError::Timeout("ACK of EOT"))
    }

    /// A whole XMODEM transfer.
    pub async fn xmodem(&mut self, data: &[u8]) -> Result<Sent, SendError> {
        let crc = self.wait_start().await?;
        self.send_data(data, crc).await
    }

    /// A whole YMODEM batch of one file, with the closing empty block 0.
    pub async fn ymodem(&mut self, name: &str, data: &[u8]) -> Result<Sent, SendError> {
        let crc = self.wait_start().await?;
        let mut header = format!("{name}\0{} 0\0", data.len()).into_bytes();
        header.resize(128, 0);
        let mut scratch = Sent::default();
        self.send_frame(&frame(0, &header, crc), &mut scratch, false)
            .await?;
        let crc = self.wait_start().await?;
        let sent = self.send_data(data, crc).await?;
        self.wait_start().await?;
        self.send_frame(&frame(0, &[0; 128], crc), &mut scratch, false)
            .await?;
        Ok(sent)
    }
}
