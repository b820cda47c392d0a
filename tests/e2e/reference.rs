//! A minimal XMODEM-1K sender, the reference the benchmarks measure the gateway
//! against: blocking I/O in the calling thread, wait for 'C', each block until
//! ACK, EOT until ACK; no timeouts, no retries beyond NAKs. What it takes is what
//! the receiver (a simulator, or lrzsz behind socat) takes.

use std::io::{Error, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use otagw_leaf_sim::xmodem::frame::crc16;

const STX: u8 = 0x02;
const EOT: u8 = 0x04;
const ACK: u8 = 0x06;
const NAK: u8 = 0x15;
/// What a short last block is padded with.
pub const PAD: u8 = 0x1a;

/// How long a [`send`] took.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// From opening the port to the ACK of the second EOT.
    pub total: Duration,
    /// From the first block to the last block's ACK.
    pub transfer: Duration,
}

/// Send `img` over the terminal at `tty`.
pub fn send(tty: &Path, img: &[u8]) -> std::io::Result<Sent> {
    let opened = Instant::now();
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tty)?;
    let mut byte = [0u8; 1];
    let mut next = |port: &mut std::fs::File| -> std::io::Result<u8> {
        match port.read(&mut byte)? {
            0 => Err(Error::other("the link closed")),
            _ => Ok(byte[0]),
        }
    };
    while next(&mut port)? != b'C' {}
    let first = Instant::now();
    for (i, data) in img.chunks(1024).enumerate() {
        let seq = (i + 1) as u8;
        let mut frame = vec![STX, seq, !seq];
        frame.extend_from_slice(data);
        frame.resize(3 + 1024, PAD);
        let crc = crc16(&frame[3..]);
        frame.extend_from_slice(&crc.to_be_bytes());
        let mut naks = 0;
        loop {
            port.write_all(&frame)?;
            match next(&mut port)? {
                ACK => break,
                NAK if naks < 10 => naks += 1,
                NAK => return Err(Error::other(format!("block {} refused", i + 1))),
                _ => {} // a stale 'C': its ACK follows
            }
        }
    }
    let transfer = first.elapsed();
    for _ in 0..10 {
        port.write_all(&[EOT])?;
        if next(&mut port)? == ACK {
            return Ok(Sent {
                total: opened.elapsed(),
                transfer,
            });
        }
    }
    Err(Error::other("EOT not acknowledged"))
}

/// `got` is `img` and then nothing but `pad`, short of a 1K block.
pub fn check_padded(got: &[u8], img: &[u8], pad: u8) -> Result<(), String> {
    if got.len() < img.len() || got[..img.len()] != *img {
        return Err(format!(
            "the receiver's {} bytes do not start with the image ({} bytes)",
            got.len(),
            img.len()
        ));
    }
    let tail = &got[img.len()..];
    if tail.len() >= 1024 || tail.iter().any(|b| *b != pad) {
        return Err(format!(
            "{} bytes after the image, not all padding",
            tail.len()
        ));
    }
    Ok(())
}
