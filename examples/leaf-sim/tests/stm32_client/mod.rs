//! A small AN3155 host for the simulator's tests, written from the application note
//! independently of the simulator's code (it uses none of `otagw_leaf_sim::stm32`).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

pub const ACK: u8 = 0x79;
pub const NACK: u8 = 0x1F;

/// How long the client waits for one byte.
const BYTE_WAIT: Duration = Duration::from_secs(5);

/// The stage that was NACKed (or timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Command,
    Address,
    Length,
    Data,
    Erase,
}

pub fn xor(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

fn with_xor(mut v: Vec<u8>) -> Vec<u8> {
    v.push(xor(&v));
    v
}

pub struct Client<S> {
    io: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(io: S) -> Self {
        Self { io }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
        self.io.flush().await.expect("flush");
    }

    /// One byte, or None when none comes within `wait`.
    pub async fn byte_within(&mut self, wait: Duration) -> Option<u8> {
        let mut b = [0u8];
        match timeout(wait, self.io.read_exact(&mut b)).await {
            Ok(Ok(_)) => Some(b[0]),
            Ok(Err(e)) => panic!("read: {e}"),
            Err(_) => None,
        }
    }

    pub async fn byte(&mut self) -> u8 {
        self.byte_within(BYTE_WAIT).await.expect("an answer byte")
    }

    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        timeout(BYTE_WAIT * 4, self.io.read_exact(&mut v))
            .await
            .expect("answer bytes in time")
            .expect("read");
        v
    }

    /// Sends `bytes` and reads the one-byte answer: Ok on ACK, Err(stage) on NACK.
    async fn step(&mut self, bytes: &[u8], stage: Refused) -> Result<(), Refused> {
        self.send(bytes).await;
        match self.byte().await {
            ACK => Ok(()),
            NACK => Err(stage),
            other => panic!("{stage:?}: unexpected answer 0x{other:02x}"),
        }
    }

    pub async fn sync(&mut self) -> u8 {
        self.send(&[0x7F]).await;
        self.byte().await
    }

    pub async fn command(&mut self, code: u8) -> Result<(), Refused> {
        self.step(&[code, !code], Refused::Command).await
    }

    /// GET: (version, commands).
    pub async fn get(&mut self) -> (u8, Vec<u8>) {
        self.command(0x00).await.expect("GET ACKed");
        let n = self.byte().await as usize;
        let all = self.bytes(n + 1).await;
        assert_eq!(self.byte().await, ACK, "GET ends with ACK");
        (all[0], all[1..].to_vec())
    }

    /// GET VERSION: (version, option bytes).
    pub async fn get_version(&mut self) -> (u8, [u8; 2]) {
        self.command(0x01).await.expect("GET VERSION ACKed");
        let v = self.bytes(3).await;
        assert_eq!(self.byte().await, ACK);
        (v[0], [v[1], v[2]])
    }

    pub async fn get_id(&mut self) -> u16 {
        self.command(0x02).await.expect("GET ID ACKed");
        let n = self.byte().await as usize;
        assert_eq!(n, 1, "two PID bytes");
        let pid = self.bytes(n + 1).await;
        assert_eq!(self.byte().await, ACK);
        u16::from_be_bytes([pid[0], pid[1]])
    }

    async fn address(&mut self, addr: u32) -> Result<(), Refused> {
        self.step(&with_xor(addr.to_be_bytes().to_vec()), Refused::Address)
            .await
    }

    pub async fn read(&mut self, addr: u32, len: usize) -> Result<Vec<u8>, Refused> {
        assert!((1..=256).contains(&len));
        self.command(0x11).await?;
        self.address(addr).await?;
        let n = (len - 1) as u8;
        self.step(&[n, !n], Refused::Length).await?;
        Ok(self.bytes(len).await)
    }

    pub async fn write(&mut self, addr: u32, data: &[u8]) -> Result<(), Refused> {
        assert!((1..=256).contains(&data.len()));
        self.command(0x31).await?;
        self.address(addr).await?;
        let mut body = vec![(data.len() - 1) as u8];
        body.extend_from_slice(data);
        self.step(&with_xor(body), Refused::Data).await
    }

    /// ERASE (0x43) of one-byte page numbers; an empty list is the global erase.
    pub async fn erase(&mut self, pages: &[u8]) -> Result<(), Refused> {
        self.command(0x43).await?;
        let body = if pages.is_empty() {
            vec![0xFF, 0x00]
        } else {
            let mut b = vec![(pages.len() - 1) as u8];
            b.extend_from_slice(pages);
            with_xor(b)
        };
        self.step(&body, Refused::Erase).await
    }

    /// EXTENDED ERASE (0x44) of two-byte page numbers.
    pub async fn extended_erase(&mut self, pages: &[u16]) -> Result<(), Refused> {
        self.command(0x44).await?;
        let mut b = ((pages.len() - 1) as u16).to_be_bytes().to_vec();
        for p in pages {
            b.extend_from_slice(&p.to_be_bytes());
        }
        self.step(&with_xor(b), Refused::Erase).await
    }

    /// EXTENDED ERASE with a special code (0xFFFF mass, 0xFFFE bank 1, 0xFFFD bank 2).
    pub async fn extended_erase_special(&mut self, code: u16) -> Result<(), Refused> {
        self.command(0x44).await?;
        self.step(&with_xor(code.to_be_bytes().to_vec()), Refused::Erase)
            .await
    }

    pub async fn go(&mut self, addr: u32) -> Result<(), Refused> {
        self.command(0x21).await?;
        self.address(addr).await
    }
}
