//! How SMP packets travel over the link: the serial framing for UARTs and TCP
//! serial servers, raw packets fragmented to the MTU for BLE.
//!
//! What it is: `send` one packet, `receive` the packets completed by the bytes
//! that arrived. What it is not: matching answers to requests or retrying
//! (`client`).

use otagw_plugin_sdk::{LinkFault, LinkKind, Port};

use crate::serial::{self, Deframer};
use crate::smp::HEADER_LEN;

/// The framing of one link.
#[derive(Debug)]
pub enum Transport {
    /// Base64 frames with markers, length and CRC (`serial`).
    Serial(Deframer),
    /// Raw SMP packets: writes cut to `mtu`, answers reassembled from the
    /// header's length (GATT delivers in order, so no other framing exists).
    Raw { mtu: usize, buf: Vec<u8> },
}

impl Transport {
    /// The framing for a link of this kind: raw packets on BLE, the serial
    /// framing on every byte stream (serial, TCP, kinds this family has no
    /// name for).
    pub fn for_link(kind: LinkKind, mtu: u32) -> Transport {
        match kind {
            LinkKind::Ble => Transport::Raw {
                mtu: (mtu as usize).max(20),
                buf: Vec::new(),
            },
            LinkKind::Serial | LinkKind::Tcp | LinkKind::Other(_) => {
                Transport::Serial(Deframer::new())
            }
        }
    }

    /// Bytes of the device's SMP buffer a packet of `len` bytes occupies:
    /// the serial framing adds the length field and the CRC.
    pub fn buffer_cost(&self, len: usize) -> usize {
        match self {
            Transport::Serial(_) => len + serial::RAW_OVERHEAD,
            Transport::Raw { .. } => len,
        }
    }

    /// Write one packet (header + body).
    pub fn send<P: Port + ?Sized>(&mut self, port: &mut P, packet: &[u8]) -> Result<(), LinkFault> {
        match self {
            Transport::Serial(_) => port.write(&serial::encode(packet)),
            Transport::Raw { mtu, .. } => {
                for piece in packet.chunks(*mtu) {
                    port.write(piece)?;
                }
                Ok(())
            }
        }
    }

    /// Feed received bytes; returns the packets they complete.
    pub fn receive(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        match self {
            Transport::Serial(d) => d.push(bytes),
            Transport::Raw { buf, .. } => {
                buf.extend_from_slice(bytes);
                let mut out = Vec::new();
                while buf.len() >= HEADER_LEN {
                    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                    if buf.len() < HEADER_LEN + len {
                        break;
                    }
                    out.push(buf.drain(..HEADER_LEN + len).collect());
                }
                out
            }
        }
    }

    /// Forget a partly received packet (after a timeout or a reset).
    pub fn reset(&mut self) {
        match self {
            Transport::Serial(d) => *d = Deframer::new(),
            Transport::Raw { buf, .. } => buf.clear(),
        }
    }

    /// Packets the serial framing dropped since the last call (bad CRC, base64,
    /// length), for the log.
    pub fn take_dropped(&mut self) -> Vec<serial::Dropped> {
        match self {
            Transport::Serial(d) => std::mem::take(&mut d.dropped),
            Transport::Raw { .. } => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smp::Packet;

    #[test]
    fn raw_transport_reassembles_fragments() {
        let mut t = Transport::for_link(LinkKind::Ble, 20);
        let a = Packet::request(1, 1, 0, 1, vec![0xa1; 50]).encode();
        let b = Packet::request(3, 1, 1, 2, vec![0xa0]).encode();
        let mut stream = a.clone();
        stream.extend(&b);
        let mut got = Vec::new();
        for piece in stream.chunks(20) {
            got.extend(t.receive(piece));
        }
        assert_eq!(got, vec![a, b]);
        assert_eq!(t.buffer_cost(100), 100);
        assert_eq!(Transport::for_link(LinkKind::Tcp, 0).buffer_cost(100), 104);
    }
}
