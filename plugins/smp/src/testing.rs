//! Test support (compiled for tests only): a builder of MCUboot images, and
//! a simulated SMP device on a virtual clock that speaks the serial framing
//! (or raw packets for BLE), with Zephyr's upload offset semantics,
//! MCUboot's test/confirm/revert swap, and fault injection. Images in memory
//! are the SDK's `MemImage`.

use std::collections::HashSet;

use minicbor::Encoder;
use otagw_plugin_sdk::testing::{MemImage, Wire};
use otagw_plugin_sdk::{Level, LinkFault, LinkFeature, LinkKind, Phase, Port};
use sha2::{Digest, Sha256};

use crate::PublicKey;
use crate::mcuboot;
use crate::smp::{Header, Packet, Value, group, id, op};
use crate::transport::Transport;

// ---------------------------------------------------------------------------
// Images.

/// A signing key for test images.
#[derive(Debug, Clone, Copy)]
pub enum TestKey {
    Ed25519([u8; 32]),
    P256([u8; 32]),
}

impl TestKey {
    pub fn public(&self) -> PublicKey {
        match self {
            TestKey::Ed25519(seed) => {
                let sk = ed25519_dalek::SigningKey::from_bytes(seed);
                PublicKey::from_bytes(sk.verifying_key().as_bytes()).unwrap()
            }
            TestKey::P256(d) => {
                let sk = p256::ecdsa::SigningKey::from_slice(d).unwrap();
                PublicKey::from_bytes(sk.verifying_key().to_sec1_point(false).as_bytes()).unwrap()
            }
        }
    }

    /// Hex of the raw public key, as an operator would configure it.
    pub fn public_hex(&self) -> String {
        let der = self.public().spki_der();
        let raw = match self {
            TestKey::Ed25519(_) => &der[12..],
            TestKey::P256(_) => &der[26..],
        };
        raw.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sign(&self, hash: &[u8; 32]) -> (u16, Vec<u8>) {
        match self {
            TestKey::Ed25519(seed) => {
                use ed25519_dalek::Signer;
                let sk = ed25519_dalek::SigningKey::from_bytes(seed);
                (0x24, sk.sign(hash).to_bytes().to_vec())
            }
            TestKey::P256(d) => {
                use p256::ecdsa::signature::hazmat::PrehashSigner;
                let sk = p256::ecdsa::SigningKey::from_slice(d).unwrap();
                let sig: p256::ecdsa::Signature = sk.sign_prehash(hash).unwrap();
                (0x22, sig.to_der().as_bytes().to_vec())
            }
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub version: (u8, u8, u16, u32),
    pub hdr_size: u16,
    pub payload: Vec<u8>,
    pub protected: Vec<(u16, Vec<u8>)>,
    pub key: Option<TestKey>,
    /// Embed the full key (TLV 0x02) instead of its hash.
    pub full_key: bool,
    /// Bytes after the TLV area (padding).
    pub trailer: Vec<u8>,
}

impl ImageSpec {
    pub fn new(version: (u8, u8, u16, u32), payload_len: usize) -> ImageSpec {
        ImageSpec {
            version,
            hdr_size: 0x200,
            payload: (0..payload_len).map(|i| (i * 31 + i / 251) as u8).collect(),
            protected: Vec::new(),
            key: None,
            full_key: false,
            trailer: Vec::new(),
        }
    }

    pub fn signed(mut self, key: TestKey) -> ImageSpec {
        self.key = Some(key);
        self
    }

    /// The image bytes.
    pub fn build(&self) -> Vec<u8> {
        let prot_size = if self.protected.is_empty() {
            0
        } else {
            4 + self
                .protected
                .iter()
                .map(|(_, v)| 4 + v.len())
                .sum::<usize>()
        };
        let mut out = Vec::new();
        out.extend(mcuboot::IMAGE_MAGIC.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(self.hdr_size.to_le_bytes());
        out.extend((prot_size as u16).to_le_bytes());
        out.extend((self.payload.len() as u32).to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.push(self.version.0);
        out.push(self.version.1);
        out.extend(self.version.2.to_le_bytes());
        out.extend(self.version.3.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.resize(usize::from(self.hdr_size), 0);
        out.extend(&self.payload);
        if prot_size > 0 {
            out.extend(mcuboot::TLV_PROT_INFO_MAGIC.to_le_bytes());
            out.extend((prot_size as u16).to_le_bytes());
            for (k, v) in &self.protected {
                out.extend(k.to_le_bytes());
                out.extend((v.len() as u16).to_le_bytes());
                out.extend(v);
            }
        }
        let hash: [u8; 32] = Sha256::digest(&out).into();
        let mut tlvs: Vec<(u16, Vec<u8>)> = vec![(0x10, hash.to_vec())];
        if let Some(key) = &self.key {
            let public = key.public();
            if self.full_key {
                tlvs.push((0x02, public.spki_der()));
            } else {
                tlvs.push((0x01, public.key_hash().to_vec()));
            }
            tlvs.push(key.sign(&hash));
        }
        let total = 4 + tlvs.iter().map(|(_, v)| 4 + v.len()).sum::<usize>();
        out.extend(mcuboot::TLV_INFO_MAGIC.to_le_bytes());
        out.extend((total as u16).to_le_bytes());
        for (k, v) in &tlvs {
            out.extend(k.to_le_bytes());
            out.extend((v.len() as u16).to_le_bytes());
            out.extend(v);
        }
        out.extend(&self.trailer);
        out
    }
}

// ---------------------------------------------------------------------------
// The simulated device.

/// An image in a slot of the simulated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimImage {
    pub version: String,
    pub hash: Vec<u8>,
    pub confirmed: bool,
    pub pending: bool,
}

impl SimImage {
    pub fn running(version: &str, hash_byte: u8) -> SimImage {
        SimImage {
            version: version.to_string(),
            hash: vec![hash_byte; 32],
            confirmed: true,
            pending: false,
        }
    }
}

/// An upload in progress (Zephyr keeps it in RAM).
#[derive(Debug, Clone)]
pub struct Session {
    pub sha: Vec<u8>,
    pub len: u64,
    pub data: Vec<u8>,
}

/// Fault injection and behaviour switches.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Indices (0-based, over all requests) whose answer is lost.
    pub drop_answers: HashSet<usize>,
    /// Indices whose answer is garbled on the wire.
    pub garble_answers: HashSet<usize>,
    /// Lose every upload answer whose request offset is in this set, once.
    pub drop_upload_at: HashSet<u64>,
    /// The device resets (losing its upload session) once an upload reaches
    /// this offset.
    pub reset_at_upload_off: Option<u64>,
    /// The new image crashes: MCUboot reverts to the old one.
    pub never_boots: bool,
    /// Console output between answers.
    pub console_noise: bool,
    /// Refuse uploads with this rc.
    pub refuse_upload_rc: Option<i64>,
    /// No answer at all to this group/id (an old device).
    pub ignore: Option<(u16, u8)>,
    /// Upload requests at or past this offset are lost (the link broke).
    pub silent_from_off: Option<u64>,
    /// The link goes down with a reset (USB-CDC, BLE) until it is reopened.
    pub link_drops_on_reset: bool,
    /// The device resets as soon as it has the command, before its answer
    /// is out (with `drop_answers` of the reset: the answer is lost).
    pub reset_at_once: bool,
    /// Once the device holds this many upload bytes, the link closes
    /// instead of the answer (a BLE peripheral out of range) for this
    /// long (ms); the device keeps its upload session. Fires once.
    pub leaves_at_upload_off: Option<(u64, u64)>,
    /// The link cannot be reopened (a plain serial port).
    pub no_reopen: bool,
}

/// The simulated SMP device and the port to it.
pub struct Sim {
    pub now: u64,
    pub kind: LinkKind,
    pub mtu: u32,
    rx: Transport,
    out: Wire,
    /// The link went down with a reset and was not reopened yet.
    pub link_down: bool,
    /// Successful reopens of the link.
    pub reopens: u32,
    pub slot0: Option<SimImage>,
    pub slot1: Option<SimImage>,
    pub session: Option<Session>,
    /// `buf_size` the device reports (None: the command is not supported).
    pub buf_size: Option<u32>,
    /// The real buffer: requests larger than this are counted in `oversize`.
    pub real_buf: usize,
    pub oversize: usize,
    pub model: Option<String>,
    pub faults: Faults,
    /// Requests seen (group, id, op), in order.
    pub requests: Vec<(u16, u8, u8)>,
    /// Upload data bytes received / written.
    pub data_received: u64,
    pub data_written: u64,
    pub resets: u32,
    pending_reset: Option<u64>,
    down_until: u64,
    /// How long a reset (MCUboot swap included) keeps the device silent.
    pub reboot_ms: u64,
    pub logs: Vec<(Level, String)>,
    pub progress: Vec<(u64, u64, Phase)>,
    pub writes: usize,
    pub drained: u32,
}

impl Default for Sim {
    fn default() -> Self {
        Sim::new()
    }
}

impl Sim {
    pub fn new() -> Sim {
        Sim {
            now: 0,
            kind: LinkKind::Serial,
            mtu: 256,
            rx: Transport::for_link(LinkKind::Serial, 256),
            out: Wire::default(),
            link_down: false,
            reopens: 0,
            slot0: Some(SimImage::running("1.0.0", 0xaa)),
            slot1: None,
            session: None,
            buf_size: Some(1024),
            real_buf: 1024,
            oversize: 0,
            model: Some("sim_board".into()),
            faults: Faults::default(),
            requests: Vec::new(),
            data_received: 0,
            data_written: 0,
            resets: 0,
            pending_reset: None,
            down_until: 0,
            reboot_ms: 2000,
            logs: Vec::new(),
            progress: Vec::new(),
            writes: 0,
            drained: 0,
        }
    }

    pub fn ble(mut self, mtu: u32) -> Sim {
        self.kind = LinkKind::Ble;
        self.mtu = mtu;
        self.rx = Transport::for_link(LinkKind::Ble, mtu);
        self
    }

    fn tick(&mut self) {
        if let Some(t) = self.pending_reset
            && self.now >= t
        {
            self.pending_reset = None;
            self.do_reset();
        }
    }

    /// MCUboot at boot: a pending image is swapped in for a test run; an
    /// unconfirmed running image is swapped back (revert).
    fn do_reset(&mut self) {
        self.resets += 1;
        self.session = None;
        self.down_until = self.now + self.reboot_ms;
        self.out.clear();
        self.link_down = self.faults.link_drops_on_reset;
        let s0 = self.slot0.clone();
        let s1 = self.slot1.clone();
        match (s0, s1) {
            (Some(old), Some(new)) if new.pending => {
                if self.faults.never_boots {
                    // Swapped, crashed, reverted by MCUboot on the next boot.
                    self.slot1 = Some(SimImage {
                        pending: false,
                        ..new
                    });
                } else {
                    self.slot0 = Some(SimImage {
                        pending: false,
                        confirmed: false,
                        ..new
                    });
                    self.slot1 = Some(old);
                }
            }
            (Some(cur), Some(prev)) if !cur.confirmed => {
                self.slot0 = Some(SimImage {
                    confirmed: true,
                    ..prev
                });
                self.slot1 = Some(cur);
            }
            _ => {}
        }
        if self.faults.console_noise {
            self.out.send(
                self.down_until,
                b"*** Booting MCUboot ***\r\n*** Booting Zephyr OS ***\r\n",
            );
        }
    }

    fn answer(&mut self, index: usize, req: &Header, body: Vec<u8>) {
        let mut h = *req;
        h.op += 1;
        let pkt = Packet { header: h, body }.encode();
        let mut wire = match &self.rx {
            Transport::Serial(_) => crate::serial::encode(&pkt),
            Transport::Raw { .. } => pkt,
        };
        if self.faults.drop_answers.contains(&index) {
            return;
        }
        if self.faults.garble_answers.contains(&index) {
            let i = wire.len() / 2;
            wire[i] = if wire[i] == b'A' { b'B' } else { b'A' };
        }
        let at = self.now + 3;
        if self.faults.console_noise {
            self.out.send(at, b"[00:00:01.234] <inf> app: tick\r\n");
        }
        self.out.send(at, wire);
    }

    fn handle(&mut self, raw: Vec<u8>) {
        if self.now < self.down_until {
            return;
        }
        let index = self.requests.len();
        let cost = self.rx.buffer_cost(raw.len());
        let p = Packet::decode(&raw).expect("client sent a malformed packet");
        let h = p.header;
        self.requests.push((h.group, h.id, h.op));
        if cost > self.real_buf {
            self.oversize += 1;
            return;
        }
        if self.faults.ignore == Some((h.group, h.id)) {
            return;
        }
        let req = Value::decode(&p.body).expect("client sent bad CBOR");
        let mut e = Encoder::new(Vec::new());
        match (h.group, h.id, h.op) {
            (group::OS, id::ECHO, op::WRITE) => {
                let d = req.get("d").and_then(Value::as_text).unwrap_or("");
                e.map(1).unwrap().str("r").unwrap().str(d).unwrap();
            }
            (group::OS, id::PARAMS, op::READ) => match self.buf_size {
                Some(b) => {
                    e.map(2).unwrap();
                    e.str("buf_size").unwrap().u32(b).unwrap();
                    e.str("buf_count").unwrap().u32(4).unwrap();
                }
                None => rc(&mut e, 8),
            },
            (group::OS, id::INFO, op::READ) => match &self.model {
                Some(m) => {
                    e.map(1).unwrap().str("output").unwrap().str(m).unwrap();
                }
                None => rc(&mut e, 8),
            },
            (group::OS, id::RESET, op::WRITE) => {
                e.map(0).unwrap();
                // Zephyr answers, then resets 250 ms later; a device that
                // resets at once never gets its answer out.
                self.pending_reset =
                    Some(self.now + if self.faults.reset_at_once { 0 } else { 250 });
            }
            (group::IMAGE, id::STATE, op::READ) => self.state_list(&mut e),
            (group::IMAGE, id::STATE, op::WRITE) => {
                let hash = req
                    .get("hash")
                    .and_then(Value::as_bytes)
                    .map(<[u8]>::to_vec);
                let confirm = req.get("confirm").and_then(Value::as_bool).unwrap_or(false);
                let ok = if confirm {
                    match (&mut self.slot0, hash) {
                        (Some(s0), None) => {
                            s0.confirmed = true;
                            true
                        }
                        (Some(s0), Some(h)) if s0.hash == h => {
                            s0.confirmed = true;
                            true
                        }
                        _ => false,
                    }
                } else {
                    match (&mut self.slot1, hash) {
                        (Some(s1), Some(h)) if s1.hash == h => {
                            s1.pending = true;
                            true
                        }
                        _ => false,
                    }
                };
                if ok {
                    self.state_list(&mut e);
                } else {
                    rc(&mut e, 3);
                }
            }
            (group::IMAGE, id::UPLOAD, op::WRITE) => {
                if !self.upload(&req, &mut e) {
                    return;
                }
            }
            (group::IMAGE, id::ERASE, op::WRITE) => {
                self.slot1 = None;
                self.session = None;
                e.map(1).unwrap().str("rc").unwrap().u32(0).unwrap();
            }
            _ => rc(&mut e, 8),
        }
        let body = e.into_writer();
        // The answer to an upload request at a dropped offset is lost, once.
        if h.group == group::IMAGE && h.id == id::UPLOAD {
            let off = req.get("off").and_then(Value::as_u64).unwrap_or(0);
            if self.faults.drop_upload_at.remove(&off) {
                return;
            }
        }
        self.answer(index, &h, body);
    }

    fn state_list(&self, e: &mut Encoder<Vec<u8>>) {
        let entries: Vec<(u32, &SimImage)> = [(0u32, &self.slot0), (1u32, &self.slot1)]
            .into_iter()
            .filter_map(|(n, s)| s.as_ref().map(|s| (n, s)))
            .collect();
        e.map(1).unwrap().str("images").unwrap();
        e.array(entries.len() as u64).unwrap();
        for (slot, s) in entries {
            // Zephyr leaves out false flags.
            let flags = [
                ("bootable", true),
                ("pending", s.pending),
                ("confirmed", s.confirmed),
                ("active", slot == 0),
            ];
            let n = 3 + flags.iter().filter(|(_, v)| *v).count() as u64;
            e.map(n).unwrap();
            e.str("slot").unwrap().u32(slot).unwrap();
            e.str("version").unwrap().str(&s.version).unwrap();
            e.str("hash").unwrap().bytes(&s.hash).unwrap();
            for (k, v) in flags {
                if v {
                    e.str(k).unwrap().bool(true).unwrap();
                }
            }
        }
    }

    /// Zephyr's offset semantics. Returns false when no answer goes out.
    fn upload(&mut self, req: &Value, e: &mut Encoder<Vec<u8>>) -> bool {
        if let Some(code) = self.faults.refuse_upload_rc {
            rc(e, code);
            return true;
        }
        let off = req.get("off").and_then(Value::as_u64).expect("off");
        if self.faults.silent_from_off.is_some_and(|x| off >= x) {
            return false;
        }
        let data = req
            .get("data")
            .and_then(Value::as_bytes)
            .expect("data")
            .to_vec();
        self.data_received += data.len() as u64;
        let sha = req.get("sha").and_then(Value::as_bytes).map(<[u8]>::to_vec);
        if off == 0 {
            let len = req
                .get("len")
                .and_then(Value::as_u64)
                .expect("len at off 0");
            let resume = match (&self.session, &sha) {
                (Some(s), Some(sha)) => s.sha == *sha && s.len == len,
                _ => false,
            };
            if !resume {
                self.slot1 = None;
                self.session = Some(Session {
                    sha: sha.unwrap_or_default(),
                    len,
                    data: Vec::new(),
                });
                self.write(&data);
            }
        } else {
            match &self.session {
                Some(s) if s.data.len() as u64 == off => self.write(&data),
                _ => {}
            }
        }
        let next = self.session.as_ref().map_or(0, |s| s.data.len() as u64);
        e.map(2).unwrap();
        e.str("rc").unwrap().u32(0).unwrap();
        e.str("off").unwrap().u64(next).unwrap();
        if let Some(at) = self.faults.reset_at_upload_off
            && next >= at
        {
            self.faults.reset_at_upload_off = None;
            // The device dies before answering.
            self.do_reset();
            return false;
        }
        if let Some((at, away_ms)) = self.faults.leaves_at_upload_off
            && next >= at
        {
            self.faults.leaves_at_upload_off = None;
            self.link_down = true;
            self.down_until = self.now + away_ms;
            return false;
        }
        true
    }

    fn write(&mut self, data: &[u8]) {
        let Some(s) = &mut self.session else { return };
        s.data.extend_from_slice(data);
        self.data_written += data.len() as u64;
        if s.data.len() as u64 == s.len {
            let mut img = MemImage::new(s.data.clone());
            let v = mcuboot::verify(&mut img, None).expect("uploaded image verifies");
            self.slot1 = Some(SimImage {
                version: v.header.version.to_string(),
                hash: v.hash.to_vec(),
                confirmed: false,
                pending: false,
            });
        }
    }
}

fn rc(e: &mut Encoder<Vec<u8>>, code: i64) {
    e.map(1).unwrap().str("rc").unwrap().i64(code).unwrap();
}

impl Sim {
    /// `closed` while the link is down.
    fn link(&mut self) -> Result<(), LinkFault> {
        self.tick();
        if self.link_down {
            return Err(LinkFault::Closed("the device reset".into()));
        }
        Ok(())
    }
}

impl Port for Sim {
    fn write(&mut self, data: &[u8]) -> Result<(), LinkFault> {
        self.link()?;
        self.writes += 1;
        for pkt in self.rx.receive(data) {
            self.handle(pkt);
        }
        Ok(())
    }

    fn read(&mut self, max: u32, timeout_ms: u32) -> Result<Vec<u8>, LinkFault> {
        self.link()?;
        let got = self.out.read(&mut self.now, max, timeout_ms);
        if got.is_empty() {
            self.tick();
        }
        Ok(got)
    }

    fn now_ms(&mut self) -> u64 {
        self.now
    }

    fn sleep(&mut self, ms: u32) {
        self.now += u64::from(ms);
        self.tick();
    }

    fn drain(&mut self) -> Result<u32, LinkFault> {
        self.link()?;
        let n = self.out.drain(self.now);
        self.drained += n;
        Ok(n)
    }

    fn mtu(&mut self) -> u32 {
        self.mtu
    }

    fn kind(&mut self) -> LinkKind {
        self.kind.clone()
    }

    fn supports(&mut self, feature: LinkFeature) -> bool {
        feature == LinkFeature::Reopen && !self.faults.no_reopen
    }

    /// Back once the device has rebooted, if that is within `timeout_ms`.
    fn reopen(&mut self, timeout_ms: u32) -> Result<(), LinkFault> {
        let back = if self.link_down {
            self.down_until
        } else {
            self.now
        };
        if back > self.now + u64::from(timeout_ms) {
            self.now += u64::from(timeout_ms);
            return Err(LinkFault::Timeout("the device is not back".into()));
        }
        self.now = self.now.max(back);
        self.link_down = false;
        self.reopens += 1;
        self.out.clear();
        self.rx.reset();
        Ok(())
    }

    fn progress(&mut self, done: u64, total: u64, phase: Phase) {
        self.progress.push((done, total, phase));
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}
