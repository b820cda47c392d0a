//! The device's logic without I/O: MCUmgr command handlers (OS and image groups) and the
//! MCUboot slot model, on a [`State`] the transport loop (`mod.rs`) locks per packet.
//!
//! Events in (an SMP packet, a reset, the end of the boot time), answers and events out. The
//! link, timers and the serial framing are not here.

use std::collections::HashMap;

use minicbor::Encoder;
use minicbor::data::Type;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::frame::Header;
use super::mcuboot::{self, ImageInfo, ImageVersion};
use super::{Boot, ResetCause, SlotState, SmpEvent, SmpSimConfig, Swap};

/// MCUmgr result codes (`MGMT_ERR_*`) the device answers.
pub mod rc {
    /// `MGMT_ERR_ENOMEM`: Zephyr's answer to an upload when no slot is free.
    pub const ENOMEM: u64 = 2;
    /// `MGMT_ERR_EINVAL`: a bad or missing argument, or an image the device refuses.
    pub const EINVAL: u64 = 3;
    /// `MGMT_ERR_ENOENT`: no image with that hash.
    pub const ENOENT: u64 = 5;
    /// `MGMT_ERR_EBADSTATE`: the state forbids it (testing the running image, erasing a
    /// slot in use, a test the device refuses).
    pub const EBADSTATE: u64 = 6;
    /// `MGMT_ERR_ENOTSUP`: an unknown group, command or operation.
    pub const ENOTSUP: u64 = 8;
    /// `MGMT_ERR_ECORRUPT`: the uploaded image's hash does not match.
    pub const ECORRUPT: u64 = 9;
}

/// Management groups and commands.
mod id {
    pub const GROUP_OS: u16 = 0;
    pub const GROUP_IMAGE: u16 = 1;
    pub const OS_ECHO: u8 = 0;
    pub const OS_RESET: u8 = 5;
    pub const OS_PARAMS: u8 = 6;
    pub const IMG_STATE: u8 = 0;
    pub const IMG_UPLOAD: u8 = 1;
    pub const IMG_ERASE: u8 = 5;
    pub const OP_READ: u8 = 0;
    pub const OP_WRITE: u8 = 2;
}

/// Whether `packet` is an image upload request (for the wire counters).
pub(crate) fn is_upload(packet: &[u8]) -> bool {
    Header::split(packet).is_some_and(|(h, _)| {
        (h.group, h.id, h.op) == (id::GROUP_IMAGE, id::IMG_UPLOAD, id::OP_WRITE)
    })
}

/// A CBOR value of a request map (what the handlers need; anything else is `Other`).
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Uint(u64),
    Int(i64),
    Bytes(Vec<u8>),
    Text(String),
    Bool(bool),
    Other,
}

/// Decodes a request body: a map with text keys (definite or indefinite). An empty body is an
/// empty map. `None`: not such a map.
fn decode_map(body: &[u8]) -> Option<HashMap<String, Value>> {
    let mut map = HashMap::new();
    if body.is_empty() {
        return Some(map);
    }
    let mut d = minicbor::Decoder::new(body);
    let len = d.map().ok()?;
    let mut n = 0u64;
    loop {
        if len.is_some_and(|l| n >= l) {
            break;
        }
        if len.is_none() && d.datatype().ok()? == Type::Break {
            d.set_position(d.position() + 1);
            break;
        }
        let key = match d.datatype().ok()? {
            Type::String | Type::StringIndef => {
                let mut k = String::new();
                for part in d.str_iter().ok()? {
                    k.push_str(part.ok()?);
                }
                k
            }
            _ => return None,
        };
        let value = match d.datatype().ok()? {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => Value::Uint(d.u64().ok()?),
            Type::I8 | Type::I16 | Type::I32 | Type::I64 => Value::Int(d.i64().ok()?),
            Type::Bool => Value::Bool(d.bool().ok()?),
            Type::Bytes | Type::BytesIndef => {
                let mut v = Vec::new();
                for part in d.bytes_iter().ok()? {
                    v.extend_from_slice(part.ok()?);
                }
                Value::Bytes(v)
            }
            Type::String | Type::StringIndef => {
                let mut v = String::new();
                for part in d.str_iter().ok()? {
                    v.push_str(part.ok()?);
                }
                Value::Text(v)
            }
            _ => {
                d.skip().ok()?;
                Value::Other
            }
        };
        map.insert(key, value);
        n += 1;
    }
    (d.position() == body.len()).then_some(map)
}

fn uint(map: &HashMap<String, Value>, key: &str) -> Result<Option<u64>, u64> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Uint(v)) => Ok(Some(*v)),
        Some(_) => Err(rc::EINVAL),
    }
}

fn bytes<'m>(map: &'m HashMap<String, Value>, key: &str) -> Result<Option<&'m [u8]>, u64> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Bytes(v)) => Ok(Some(v)),
        Some(_) => Err(rc::EINVAL),
    }
}

fn boolean(map: &HashMap<String, Value>, key: &str) -> Result<Option<bool>, u64> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Bool(v)) => Ok(Some(*v)),
        Some(_) => Err(rc::EINVAL),
    }
}

/// A CBOR answer body being built (writing into a `Vec` cannot fail).
struct Body(Encoder<Vec<u8>>);

impl Body {
    fn map(len: u64) -> Self {
        let mut e = Encoder::new(Vec::new());
        e.map(len).expect("vec write");
        Self(e)
    }
    fn key(&mut self, k: &str) -> &mut Encoder<Vec<u8>> {
        self.0.str(k).expect("vec write")
    }
    fn uint(&mut self, k: &str, v: u64) {
        self.key(k).u64(v).expect("vec write");
    }
    fn text(&mut self, k: &str, v: &str) {
        self.key(k).str(v).expect("vec write");
    }
    fn bool(&mut self, k: &str, v: bool) {
        self.key(k).bool(v).expect("vec write");
    }
    fn bytes(&mut self, k: &str, v: &[u8]) {
        self.key(k).bytes(v).expect("vec write");
    }
    fn done(self) -> Vec<u8> {
        self.0.into_writer()
    }
}

fn error_body(code: u64) -> Vec<u8> {
    let mut b = Body::map(1);
    b.uint("rc", code);
    b.done()
}

/// A valid image in a slot.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    pub(crate) data: Vec<u8>,
    pub(crate) info: ImageInfo,
}

/// An upload in progress (the image being written to slot 1).
#[derive(Debug)]
pub(crate) struct Upload {
    /// The `sha` of the first chunk: SHA-256 of the whole upload, identifies the session.
    sha: Option<Vec<u8>>,
    /// The announced length.
    len: usize,
    /// What has been written so far.
    data: Vec<u8>,
}

/// Which one-shot faults have fired.
#[derive(Debug, Default)]
pub(crate) struct Fired {
    pub(crate) drop_request: bool,
    pub(crate) drop_answer: bool,
    pub(crate) garble_answer: bool,
    pub(crate) reset_mid_upload: bool,
}

/// Counters tests read.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) requests: u64,
    pub(crate) answers: u64,
    pub(crate) dropped_packets: u64,
    pub(crate) upload_chunks: u64,
    pub(crate) upload_bytes: u64,
    pub(crate) resets: u32,
    /// Bytes read from the link (frames, console text, garbage).
    pub(crate) link_in: u64,
    /// Bytes written to the link.
    pub(crate) link_out: u64,
    /// Of those, the frames of image upload requests (and what preceded them since the
    /// previous packet) and of their answers.
    pub(crate) upload_in: u64,
    pub(crate) upload_out: u64,
}

/// What to do after a packet.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The SMP answer to send, if any.
    pub(crate) answer: Option<Vec<u8>>,
    /// Reset after sending the answer.
    pub(crate) reset: Option<ResetCause>,
}

/// The whole device: MCUboot's two slots and flags, the upload session, counters.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) slot0: Image,
    /// The running image is confirmed (MCUboot's `image_ok`); false after a test swap.
    pub(crate) slot0_confirmed: bool,
    pub(crate) slot1: Option<Image>,
    /// Slot 1 is marked for the next boot: `Some(false)` test, `Some(true)` permanent.
    pub(crate) slot1_pending: Option<bool>,
    pub(crate) upload: Option<Upload>,
    /// Set while the device boots: it hears nothing until then.
    pub(crate) silent_until: Option<Instant>,
    /// The boot to announce when the boot time is over.
    pub(crate) booting: Option<Boot>,
    pub(crate) counters: Counters,
    pub(crate) fired: Fired,
    pub(crate) events: mpsc::UnboundedSender<SmpEvent>,
    pub(crate) boots: mpsc::UnboundedSender<Boot>,
}

impl State {
    pub(crate) fn new(
        slot0: Image,
        events: mpsc::UnboundedSender<SmpEvent>,
        boots: mpsc::UnboundedSender<Boot>,
    ) -> Self {
        Self {
            slot0,
            slot0_confirmed: true,
            slot1: None,
            slot1_pending: None,
            upload: None,
            silent_until: None,
            booting: None,
            counters: Counters::default(),
            fired: Fired::default(),
            events,
            boots,
        }
    }

    pub(crate) fn event(&self, e: SmpEvent) {
        tracing::debug!(event = ?e, "smp device");
        // The receiver lives in the handle's shared state: this cannot fail while it exists.
        let _ = self.events.send(e);
    }

    /// Slot 1 holds an image MCUboot will act on at the next reset (pending, or the image a
    /// test swap reverts to): uploads and erases must not touch it.
    fn slot1_in_use(&self) -> bool {
        self.slot1.is_some() && (self.slot1_pending.is_some() || !self.slot0_confirmed)
    }

    pub(crate) fn slot0_state(&self) -> SlotState {
        SlotState::new(0, &self.slot0, self.slot0_confirmed, false, false, true)
    }

    pub(crate) fn slot1_state(&self) -> Option<SlotState> {
        self.slot1.as_ref().map(|image| {
            SlotState::new(
                1,
                image,
                // The image a test swap reverts to is reported confirmed, as Zephyr does.
                !self.slot0_confirmed,
                self.slot1_pending.is_some(),
                self.slot1_pending == Some(true),
                false,
            )
        })
    }

    /// The session in progress: `(bytes received, announced length)`.
    pub(crate) fn upload_progress(&self) -> Option<(usize, usize)> {
        self.upload.as_ref().map(|u| (u.data.len(), u.len))
    }

    /// Handles one SMP packet (CRC and framing already checked).
    pub(crate) fn packet(&mut self, cfg: &SmpSimConfig, packet: &[u8]) -> Outcome {
        let Some((header, body)) = Header::split(packet) else {
            self.counters.dropped_packets += 1;
            self.event(SmpEvent::Dropped {
                reason: "SMP header length disagrees with the packet".into(),
            });
            return Outcome::default();
        };
        self.counters.requests += 1;
        if cfg.faults.drop_request == Some(self.counters.requests as u32)
            && !std::mem::replace(&mut self.fired.drop_request, true)
        {
            self.event(SmpEvent::Fault(format!(
                "request {} dropped unprocessed",
                self.counters.requests
            )));
            return Outcome::default();
        }
        self.event(SmpEvent::Request {
            op: header.op,
            group: header.group,
            id: header.id,
            seq: header.seq,
        });
        let mut reset = None;
        let result = match decode_map(body) {
            None => Err(rc::EINVAL),
            Some(req) => match (header.group, header.id, header.op) {
                (id::GROUP_OS, id::OS_ECHO, id::OP_WRITE) => Self::echo(&req),
                (id::GROUP_OS, id::OS_RESET, id::OP_WRITE) => {
                    reset = Some(ResetCause::Command);
                    Ok(Body::map(0).done())
                }
                (id::GROUP_OS, id::OS_PARAMS, id::OP_READ) => {
                    let mut b = Body::map(2);
                    b.uint("buf_size", cfg.buf_size as u64);
                    b.uint("buf_count", u64::from(cfg.buf_count));
                    Ok(b.done())
                }
                (id::GROUP_IMAGE, id::IMG_STATE, id::OP_READ) => Ok(self.state_body()),
                (id::GROUP_IMAGE, id::IMG_STATE, id::OP_WRITE) => self.state_write(cfg, &req),
                (id::GROUP_IMAGE, id::IMG_UPLOAD, id::OP_WRITE) => {
                    match self.upload(cfg, &req) {
                        Ok(Some(body)) => Ok(body),
                        Ok(None) => {
                            // The reset fault: the chunk is written, the answer never sent.
                            return Outcome {
                                answer: None,
                                reset: Some(ResetCause::Fault),
                            };
                        }
                        Err(code) => Err(code),
                    }
                }
                (id::GROUP_IMAGE, id::IMG_ERASE, id::OP_WRITE) => self.erase(&req),
                _ => Err(rc::ENOTSUP),
            },
        };
        let body = result.unwrap_or_else(error_body);
        Outcome {
            answer: Some(header.answer(&body)),
            reset,
        }
    }

    fn echo(req: &HashMap<String, Value>) -> Result<Vec<u8>, u64> {
        let Some(Value::Text(text)) = req.get("d") else {
            return Err(rc::EINVAL);
        };
        let mut b = Body::map(1);
        b.text("r", text);
        Ok(b.done())
    }

    fn state_body(&self) -> Vec<u8> {
        let slots: Vec<SlotState> = std::iter::once(self.slot0_state())
            .chain(self.slot1_state())
            .collect();
        let mut b = Body::map(2);
        b.key("images")
            .array(slots.len() as u64)
            .expect("vec write");
        for s in &slots {
            b.0.map(8).expect("vec write");
            b.uint("slot", u64::from(s.slot));
            b.text("version", &s.version);
            b.bytes("hash", &s.hash);
            b.bool("bootable", s.bootable);
            b.bool("pending", s.pending);
            b.bool("confirmed", s.confirmed);
            b.bool("active", s.active);
            b.bool("permanent", s.permanent);
        }
        b.uint("splitStatus", 0);
        b.done()
    }

    fn state_write(
        &mut self,
        cfg: &SmpSimConfig,
        req: &HashMap<String, Value>,
    ) -> Result<Vec<u8>, u64> {
        let hash = bytes(req, "hash")?;
        let confirm = boolean(req, "confirm")?.unwrap_or(false);
        let is_slot0 = hash.is_none_or(|h| h == self.slot0.info.hash);
        let is_slot1 = match (hash, &self.slot1) {
            (Some(h), Some(image)) => h == image.info.hash,
            _ => false,
        };
        if confirm && is_slot0 {
            if !self.slot0_confirmed {
                self.slot0_confirmed = true;
                // The old image in slot 1 is no longer needed for a revert.
                self.event(SmpEvent::Confirmed {
                    hash: self.slot0.info.hash,
                });
            }
        } else if hash.is_none() {
            return Err(rc::EINVAL); // a test needs a hash
        } else if is_slot0 {
            return Err(rc::EBADSTATE); // testing the running image
        } else if !is_slot1 {
            return Err(rc::ENOENT);
        } else if !self.slot0_confirmed {
            // Slot 1 holds the image a revert needs.
            return Err(rc::EBADSTATE);
        } else if cfg.faults.refuse_test {
            self.event(SmpEvent::Fault("test/confirm of slot 1 refused".into()));
            return Err(rc::EBADSTATE);
        } else {
            self.slot1_pending = Some(confirm);
            let hash = self.slot1.as_ref().map(|i| i.info.hash).unwrap_or_default();
            self.event(if confirm {
                SmpEvent::PermanentMarked { hash }
            } else {
                SmpEvent::TestMarked { hash }
            });
        }
        Ok(self.state_body())
    }

    fn erase(&mut self, req: &HashMap<String, Value>) -> Result<Vec<u8>, u64> {
        match uint(req, "slot")?.unwrap_or(1) {
            1 => {}
            _ => return Err(rc::EINVAL),
        }
        if self.slot1_in_use() {
            return Err(rc::EBADSTATE);
        }
        self.slot1 = None;
        self.slot1_pending = None;
        self.upload = None;
        self.event(SmpEvent::Erased);
        Ok(Body::map(0).done())
    }

    fn offset_body(off: usize, matched: Option<bool>) -> Vec<u8> {
        let mut b = Body::map(1 + u64::from(matched.is_some()));
        b.uint("off", off as u64);
        if let Some(m) = matched {
            b.bool("match", m);
        }
        b.done()
    }

    /// One upload chunk. `Ok(None)`: the reset-mid-upload fault fired.
    fn upload(
        &mut self,
        cfg: &SmpSimConfig,
        req: &HashMap<String, Value>,
    ) -> Result<Option<Vec<u8>>, u64> {
        if cfg.faults.refuse_upload {
            self.event(SmpEvent::Fault("upload refused".into()));
            return Err(rc::EINVAL);
        }
        if uint(req, "image")?.unwrap_or(0) != 0 {
            return Err(rc::EINVAL);
        }
        let off = usize::try_from(uint(req, "off")?.ok_or(rc::EINVAL)?).map_err(|_| rc::EINVAL)?;
        let data = bytes(req, "data")?.ok_or(rc::EINVAL)?;
        if off == 0 {
            let len = uint(req, "len")?.ok_or(rc::EINVAL)?;
            let len = usize::try_from(len).map_err(|_| rc::EINVAL)?;
            let sha = bytes(req, "sha")?.map(<[u8]>::to_vec);
            if let (Some(up), Some(sha)) = (&self.upload, &sha)
                && up.sha.as_ref() == Some(sha)
                && up.len == len
            {
                // The same upload again: go on where it stands (this chunk is not written).
                let at = up.data.len();
                self.event(SmpEvent::UploadResumed { off: at });
                return Ok(Some(Self::offset_body(at, None)));
            }
            if self.slot1_in_use() {
                return Err(rc::ENOMEM);
            }
            if len == 0 || len > cfg.slot_size || data.len() > len {
                return Err(rc::EINVAL);
            }
            if data.len() >= 4 && data[..4] != mcuboot::IMAGE_MAGIC.to_le_bytes() {
                self.reject("bad image magic in the first chunk");
                return Err(rc::EINVAL);
            }
            if boolean(req, "upgrade")? == Some(true) && data.len() >= 28 {
                let new = ImageVersion {
                    major: data[20],
                    minor: data[21],
                    revision: u16::from_le_bytes([data[22], data[23]]),
                    build: u32::from_le_bytes([data[24], data[25], data[26], data[27]]),
                };
                if new <= self.slot0.info.version {
                    self.reject("upgrade requested, version not newer");
                    return Err(rc::EBADSTATE);
                }
            }
            // A new upload erases slot 1.
            self.slot1 = None;
            self.slot1_pending = None;
            self.event(SmpEvent::UploadStarted {
                len,
                sha: sha.clone(),
            });
            self.upload = Some(Upload {
                sha,
                len,
                data: Vec::with_capacity(len),
            });
        }
        let Some(up) = self.upload.as_mut() else {
            // No session (e.g. after a reset): start from 0.
            self.event(SmpEvent::OffsetMismatch {
                got: off,
                expected: 0,
            });
            return Ok(Some(Self::offset_body(0, None)));
        };
        if off != up.data.len() {
            let expected = up.data.len();
            self.event(SmpEvent::OffsetMismatch { got: off, expected });
            return Ok(Some(Self::offset_body(expected, None)));
        }
        if off + data.len() > up.len {
            return Err(rc::EINVAL);
        }
        up.data.extend_from_slice(data);
        let (at, len) = (up.data.len(), up.len);
        self.counters.upload_chunks += 1;
        self.counters.upload_bytes += data.len() as u64;
        if cfg.faults.reset_mid_upload == Some(self.counters.upload_chunks as u32)
            && !std::mem::replace(&mut self.fired.reset_mid_upload, true)
        {
            self.event(SmpEvent::Fault(format!(
                "reset after upload chunk {} (offset {at})",
                self.counters.upload_chunks
            )));
            return Ok(None);
        }
        if at < len {
            return Ok(Some(Self::offset_body(at, None)));
        }
        let up = self.upload.take().expect("checked above");
        let matched = up
            .sha
            .as_ref()
            .map(|sha| Sha256::digest(&up.data).as_slice() == sha.as_slice());
        if matched == Some(false) {
            self.reject("upload sha does not match the data");
            return Err(rc::ECORRUPT);
        }
        match mcuboot::parse(&up.data) {
            Ok(info) => {
                self.event(SmpEvent::UploadComplete {
                    version: info.version.to_string(),
                    hash: info.hash,
                });
                self.slot1 = Some(Image {
                    data: up.data,
                    info,
                });
                Ok(Some(Self::offset_body(at, matched)))
            }
            Err(e) => {
                self.reject(&format!("image invalid: {e}"));
                Err(match e {
                    mcuboot::ImageError::HashMismatch => rc::ECORRUPT,
                    _ => rc::EINVAL,
                })
            }
        }
    }

    fn reject(&mut self, reason: &str) {
        self.upload = None;
        self.event(SmpEvent::UploadRejected {
            reason: reason.to_owned(),
        });
    }

    /// The device resets now: MCUboot swaps or reverts, the device is silent for the boot
    /// time, then [`State::booted`] announces what runs.
    pub(crate) fn reset(&mut self, cfg: &SmpSimConfig, cause: ResetCause, now: Instant) {
        self.counters.resets += 1;
        self.event(SmpEvent::Reset { cause });
        if !cfg.keep_upload_across_reset {
            self.upload = None;
        }
        let swap = if !self.slot0_confirmed {
            // An unconfirmed test image: MCUboot reverts to the old one (which uploads and
            // erases leave alone while the test image runs).
            self.slot0_confirmed = true;
            match self.slot1.take() {
                Some(old) => {
                    self.slot1 = Some(std::mem::replace(&mut self.slot0, old));
                    Swap::Revert
                }
                None => Swap::None,
            }
        } else if let (Some(permanent), Some(_)) = (self.slot1_pending, &self.slot1) {
            self.slot1_pending = None;
            if cfg.faults.no_boot {
                // The new image is swapped in, does not boot, and MCUboot swaps back.
                self.event(SmpEvent::Fault("the new image does not boot".into()));
                Swap::NoBoot
            } else {
                let new = self.slot1.take().expect("checked above");
                self.slot1 = Some(std::mem::replace(&mut self.slot0, new));
                self.slot0_confirmed = permanent;
                if permanent {
                    Swap::Permanent
                } else {
                    Swap::Test
                }
            }
        } else {
            Swap::None
        };
        self.silent_until = Some(now + cfg.boot_time);
        self.booting = Some(Boot {
            version: self.slot0.info.version.to_string(),
            hash: self.slot0.info.hash,
            confirmed: self.slot0_confirmed,
            swap,
        });
    }

    /// The boot time is over: the device listens again.
    pub(crate) fn booted(&mut self) {
        self.silent_until = None;
        if let Some(boot) = self.booting.take() {
            self.event(SmpEvent::Booted(boot.clone()));
            let _ = self.boots.send(boot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_maps_decode_definite_and_indefinite() {
        let mut e = Encoder::new(Vec::new());
        e.begin_map().unwrap();
        e.str("off").unwrap().u64(7).unwrap();
        e.str("data").unwrap().bytes(&[1, 2]).unwrap();
        e.str("x").unwrap().array(1).unwrap().u8(1).unwrap();
        e.str("neg").unwrap().i64(-1).unwrap();
        e.end().unwrap();
        let m = decode_map(&e.into_writer()).unwrap();
        assert_eq!(m["off"], Value::Uint(7));
        assert_eq!(m["data"], Value::Bytes(vec![1, 2]));
        assert_eq!(m["x"], Value::Other);
        assert_eq!(m["neg"], Value::Int(-1));
        assert_eq!(decode_map(&[]), Some(HashMap::new()));
        assert_eq!(decode_map(&[0x01]), None);
        assert_eq!(decode_map(&[0xa1, 0x01, 0x01]), None, "non-text key");
        assert_eq!(decode_map(&[0xa0, 0x00]), None, "trailing bytes");
    }
}
