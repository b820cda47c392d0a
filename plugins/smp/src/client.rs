//! The SMP client: one request, its answer (matched by operation, group,
//! command and sequence number), timeouts and re-sends, the return code, and
//! the handful of commands this family uses.
//!
//! What it is not: the upload loop or the test/confirm flow (`flash`). It is
//! transport-agnostic: [`Transport`] frames the packets.

use otagw_plugin_sdk::{Error, Level, LinkFault, LinkFeature, Port};

use crate::Settings;
use crate::smp::{self, MapBuilder, Packet, Value, group, id, op};
use crate::transport::Transport;

/// Largest read asked of the host at once.
const READ_MAX: u32 = 4096;

/// One entry of the image state list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Slot {
    /// Image number (0 when the device does not say: single-image devices).
    pub image: u32,
    /// 0 = primary (running), 1 = secondary.
    pub slot: u32,
    pub version: String,
    /// The MCUboot image hash (the SHA-256 TLV), not the file's hash.
    pub hash: Vec<u8>,
    pub bootable: bool,
    pub pending: bool,
    pub confirmed: bool,
    pub active: bool,
    pub permanent: bool,
}

/// What an upload request was answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadAnswer {
    /// The offset the device expects next.
    pub off: u64,
    /// `match` on the last chunk, when the device tells.
    pub matched: Option<bool>,
}

/// The SMP client over one link.
pub struct Client<'p, P: Port + ?Sized> {
    port: &'p mut P,
    transport: Transport,
    seq: u8,
    timeout_ms: u32,
    retries: u32,
    /// Requests sent again after a timeout.
    pub resent: u32,
}

impl<'p, P: Port + ?Sized> Client<'p, P> {
    /// A client with the link's framing and the settings' timeout and retries.
    pub fn new(port: &'p mut P, settings: &Settings) -> Client<'p, P> {
        let kind = port.kind();
        let mtu = port.mtu();
        // Start the sequence numbers somewhere a previous job probably did not
        // leave them, so its late answers are not taken for ours.
        let seq = (port.now_ms() as u8).wrapping_mul(31).wrapping_add(0x40);
        Client {
            port,
            transport: Transport::for_link(kind, mtu),
            seq,
            timeout_ms: settings.timeout_ms,
            retries: settings.retries,
            resent: 0,
        }
    }

    /// The port, for progress, logs, the clock.
    pub fn port(&mut self) -> &mut P {
        self.port
    }

    /// The framing in use.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Close the link and open it again, waiting up to `timeout_ms` for the
    /// device (after its reset); the framing starts afresh, with the MTU the
    /// link has now.
    pub fn reopen(&mut self, timeout_ms: u32) -> Result<(), LinkFault> {
        self.port.reopen(timeout_ms)?;
        let (kind, mtu) = (self.port.kind(), self.port.mtu());
        self.transport = Transport::for_link(kind, mtu);
        Ok(())
    }

    /// Discard stale input (boot banners, answers to an earlier job).
    pub fn drain(&mut self) {
        match self.port.drain() {
            Ok(n) if n > 0 => self.log(Level::Debug, &format!("discarded {n} stale bytes")),
            _ => {}
        }
        self.transport.reset();
    }

    fn log(&mut self, level: Level, msg: &str) {
        self.port.log(level, msg);
    }

    /// Send a request and wait for its answer: `attempts` tries of
    /// `timeout_ms` each. Returns the answer's body after checking its
    /// return code; `name` names the command in errors.
    pub fn request(
        &mut self,
        name: &str,
        (req_op, grp, cmd): (u8, u16, u8),
        body: Vec<u8>,
        timeout_ms: u32,
        attempts: u32,
    ) -> Result<Value, Error> {
        let mut seqs = Vec::new();
        for attempt in 0..attempts.max(1) {
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            seqs.push(seq);
            let packet = Packet::request(req_op, grp, cmd, seq, body.clone()).encode();
            if attempt > 0 {
                self.resent += 1;
                self.log(
                    Level::Warn,
                    &format!(
                        "{name}: no answer within {timeout_ms} ms, sending again ({attempt} of {})",
                        attempts - 1
                    ),
                );
            }
            self.transport.send(self.port, &packet)?;
            if let Some(v) = self.wait(req_op + 1, grp, cmd, &seqs, timeout_ms)? {
                check_rc(name, &v)?;
                return Ok(v);
            }
        }
        Err(Error::Timeout(format!(
            "{name}: no answer from the device after {} attempt(s) of {timeout_ms} ms",
            attempts.max(1)
        )))
    }

    /// Wait for an answer with this op/group/id and one of `seqs`.
    fn wait(
        &mut self,
        rsp_op: u8,
        grp: u16,
        cmd: u8,
        seqs: &[u8],
        timeout_ms: u32,
    ) -> Result<Option<Value>, Error> {
        let deadline = self.port.now_ms() + u64::from(timeout_ms);
        loop {
            let now = self.port.now_ms();
            if now >= deadline {
                return Ok(None);
            }
            let wait = u32::try_from(deadline - now).unwrap_or(u32::MAX);
            let bytes = self.port.read(READ_MAX, wait)?;
            if bytes.is_empty() {
                continue;
            }
            let packets = self.transport.receive(&bytes);
            for why in self.transport.take_dropped() {
                self.log(Level::Debug, &format!("dropped a garbled frame: {why:?}"));
            }
            for raw in packets {
                let p = match Packet::decode(&raw) {
                    Ok(p) => p,
                    Err(e) => {
                        self.log(Level::Debug, &format!("ignored a malformed packet: {e}"));
                        continue;
                    }
                };
                let h = p.header;
                if h.op != rsp_op || h.group != grp || h.id != cmd || !seqs.contains(&h.seq) {
                    self.log(
                        Level::Debug,
                        &format!(
                            "ignored an unrelated answer (op {} group {} id {} seq {})",
                            h.op, h.group, h.id, h.seq
                        ),
                    );
                    continue;
                }
                let v = if p.body.is_empty() {
                    Value::Map(Vec::new())
                } else {
                    match Value::decode(&p.body) {
                        Ok(v) => v,
                        Err(e) => {
                            self.log(Level::Debug, &format!("ignored an answer: {e}"));
                            continue;
                        }
                    }
                };
                return Ok(Some(v));
            }
        }
    }

    fn attempts(&self) -> u32 {
        self.retries.saturating_add(1)
    }

    /// OS echo: returns the echoed text. Used to see whether the device is back.
    pub fn echo(&mut self, text: &str, timeout_ms: u32, attempts: u32) -> Result<String, Error> {
        let body = MapBuilder::new().text("d", text).finish();
        let v = self.request(
            "echo",
            (op::WRITE, group::OS, id::ECHO),
            body,
            timeout_ms,
            attempts,
        )?;
        Ok(v.get("r")
            .and_then(Value::as_text)
            .unwrap_or_default()
            .to_string())
    }

    /// MCUmgr parameters: `Some((buf_size, buf_count))`, or `None` when the
    /// device does not support the command or does not answer it (one try).
    pub fn params(&mut self) -> Result<Option<(u32, u32)>, Error> {
        let body = MapBuilder::new().finish();
        let timeout = self.timeout_ms;
        match self.request(
            "MCUmgr parameters",
            (op::READ, group::OS, id::PARAMS),
            body,
            timeout,
            1,
        ) {
            Ok(v) => {
                let size = v.get("buf_size").and_then(Value::as_u64);
                let count = v.get("buf_count").and_then(Value::as_u64).unwrap_or(1);
                let count = u32::try_from(count).map_err(|_| {
                    Error::Transfer(format!(
                        "MCUmgr parameters: buf_count {count} is out of range"
                    ))
                })?;
                // A buffer larger than 4 GiB is as good as 4 GiB: saturate.
                Ok(size.map(|s| (u32::try_from(s).unwrap_or(u32::MAX), count)))
            }
            Err(Error::Device(m) | Error::Timeout(m)) => {
                self.log(Level::Info, &format!("{m}; assuming the default buffer"));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// OS info with `format`: the `output` text.
    pub fn os_info(&mut self, format: &str) -> Result<String, Error> {
        let body = MapBuilder::new().text("format", format).finish();
        let timeout = self.timeout_ms;
        let v = self.request("OS info", (op::READ, group::OS, id::INFO), body, timeout, 1)?;
        Ok(v.get("output")
            .and_then(Value::as_text)
            .unwrap_or_default()
            .to_string())
    }

    /// Image state read.
    pub fn state_read(&mut self) -> Result<Vec<Slot>, Error> {
        let (timeout, attempts) = (self.timeout_ms, self.attempts());
        let v = self.request(
            "image state read",
            (op::READ, group::IMAGE, id::STATE),
            MapBuilder::new().finish(),
            timeout,
            attempts,
        )?;
        parse_slots("image state read", &v)
    }

    /// Image state write: mark `hash` for test (`confirm` false) or confirm it.
    pub fn state_write(&mut self, hash: &[u8], confirm: bool) -> Result<(), Error> {
        let name = if confirm {
            "image confirm"
        } else {
            "image test"
        };
        let body = MapBuilder::new()
            .bytes("hash", hash)
            .bool("confirm", confirm)
            .finish();
        let (timeout, attempts) = (self.timeout_ms, self.attempts());
        self.request(
            name,
            (op::WRITE, group::IMAGE, id::STATE),
            body,
            timeout,
            attempts,
        )?;
        Ok(())
    }

    /// One upload request (already built with [`upload_body`]).
    pub fn upload(
        &mut self,
        off: u64,
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<UploadAnswer, Error> {
        let name = format!("image upload at offset {off}");
        let attempts = self.attempts();
        let v = self.request(
            &name,
            (op::WRITE, group::IMAGE, id::UPLOAD),
            body,
            timeout_ms,
            attempts,
        )?;
        let off = v.get("off").and_then(Value::as_u64).ok_or_else(|| {
            Error::Transfer(format!("{name}: the answer carries no offset (`off`)"))
        })?;
        Ok(UploadAnswer {
            off,
            matched: v.get("match").and_then(Value::as_bool),
        })
    }

    /// Image erase (the device's default: the secondary slot).
    pub fn erase(&mut self, timeout_ms: u32) -> Result<(), Error> {
        let attempts = self.attempts();
        self.request(
            "image erase",
            (op::WRITE, group::IMAGE, id::ERASE),
            MapBuilder::new().finish(),
            timeout_ms,
            attempts,
        )?;
        Ok(())
    }

    /// OS reset, sent once: a lost answer is not retried, because a second
    /// reset before the new image is confirmed would make MCUboot revert it.
    /// Returns whether the device answered. A link that can be reopened and
    /// closes instead of answering went with the device (a BLE peripheral
    /// that hangs up as it reboots): that is no answer, not a failure.
    pub fn reset(&mut self) -> Result<bool, Error> {
        let timeout = self.timeout_ms;
        match self.request(
            "reset",
            (op::WRITE, group::OS, id::RESET),
            MapBuilder::new().finish(),
            timeout,
            1,
        ) {
            Ok(_) => Ok(true),
            Err(Error::Timeout(_)) => Ok(false),
            Err(e) if e.is_link_closed() && self.port.supports(LinkFeature::Reopen) => {
                self.log(
                    Level::Info,
                    &format!("reset: {e} before an answer: the device is rebooting"),
                );
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The CBOR body of an upload request; `first` = (len, sha, image) for
/// the request at offset 0.
pub fn upload_body(off: u64, data: &[u8], first: Option<(u64, &[u8], u32)>) -> Vec<u8> {
    let mut m = MapBuilder::new();
    if let Some((len, sha, image)) = first {
        m = m
            .uint("image", u64::from(image))
            .uint("len", len)
            .bytes("sha", sha);
    }
    m.uint("off", off).bytes("data", data).finish()
}

/// Turn a non-zero return code into `Error::Device` naming the command.
fn check_rc(name: &str, v: &Value) -> Result<(), Error> {
    if let Some(rc) = v.get("rc").and_then(Value::as_int)
        && rc != 0
    {
        return Err(Error::Device(format!(
            "{name}: the device answered rc {rc} ({})",
            smp::rc_meaning(rc)
        )));
    }
    if let Some(err) = v.get("err") {
        let rc = err.get("rc").and_then(Value::as_int).unwrap_or(0);
        let grp = err.get("group").and_then(Value::as_int).unwrap_or(-1);
        if rc != 0 {
            let meaning = if grp == i128::from(group::IMAGE) {
                smp::img_rc_meaning(rc)
            } else {
                "group-specific"
            };
            return Err(Error::Device(format!(
                "{name}: the device answered group {grp} rc {rc} ({meaning})"
            )));
        }
    }
    Ok(())
}

fn parse_slots(name: &str, v: &Value) -> Result<Vec<Slot>, Error> {
    let images = v
        .get("images")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Transfer(format!("{name}: the answer has no `images` list")))?;
    let flag = |e: &Value, k: &str| e.get(k).and_then(Value::as_bool).unwrap_or(false);
    let mut out = Vec::new();
    for e in images {
        let number = |k: &str, v: u64| {
            u32::try_from(v).map_err(|_| {
                Error::Transfer(format!(
                    "{name}: an image entry's `{k}` {v} is out of range"
                ))
            })
        };
        out.push(Slot {
            image: number("image", e.get("image").and_then(Value::as_u64).unwrap_or(0))?,
            slot: number(
                "slot",
                e.get("slot").and_then(Value::as_u64).ok_or_else(|| {
                    Error::Transfer(format!("{name}: an image entry has no `slot`"))
                })?,
            )?,
            version: e
                .get("version")
                .and_then(Value::as_text)
                .unwrap_or_default()
                .to_string(),
            hash: e
                .get("hash")
                .and_then(Value::as_bytes)
                .unwrap_or_default()
                .to_vec(),
            bootable: flag(e, "bootable"),
            pending: flag(e, "pending"),
            confirmed: flag(e, "confirmed"),
            active: flag(e, "active"),
            permanent: flag(e, "permanent"),
        });
    }
    Ok(out)
}

/// The entry of image `image` in `slot`, preferring an active one.
pub fn find_slot(slots: &[Slot], image: u32, slot: u32) -> Option<&Slot> {
    let mut it = slots.iter().filter(|s| s.image == image && s.slot == slot);
    let all: Vec<&Slot> = it.by_ref().collect();
    all.iter().find(|s| s.active).or(all.first()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(slot: i128) -> Value {
        Value::Map(vec![
            (Value::Text("slot".into()), Value::Int(slot)),
            (Value::Text("version".into()), Value::Text("1.2.3".into())),
        ])
    }

    fn state(entries: Vec<Value>) -> Value {
        Value::Map(vec![(Value::Text("images".into()), Value::Array(entries))])
    }

    #[test]
    fn slot_numbers_from_the_device_are_checked_not_truncated() {
        let ok = parse_slots("state", &state(vec![entry(1)])).unwrap();
        assert_eq!((ok[0].image, ok[0].slot), (0, 1));
        // 2^32 + 1 would have become slot 1 with `as u32`.
        let err = parse_slots("state", &state(vec![entry((1 << 32) + 1)])).unwrap_err();
        assert_eq!(
            err,
            Error::Transfer("state: an image entry's `slot` 4294967297 is out of range".into())
        );
    }
}
