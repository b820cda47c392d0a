//! `flash`: verify, upload (with resume), mark for test, reset, wait, check
//! that the new image runs, confirm.
//!
//! The flow, and what it relies on:
//! 1. `verify` the image (streamed) before a byte is written: the image hash
//!    (SHA-256 TLV) names it in the state commands, the file's SHA-256 names
//!    the upload session.
//! 2. Image state read. Slot 0 already runs this image: confirmed → nothing to
//!    do; unconfirmed (an earlier flash stopped after the reset) → confirm
//!    only. `require_newer` is checked here (the running version is needed).
//!    Slot 1 already holds this image (an earlier upload completed) → no upload.
//! 3. MCUmgr parameters → the device's buffer (512 bytes if it cannot say);
//!    every upload request is sized so that the SMP packet plus the serial
//!    framing's length and CRC fits that buffer.
//! 4. Upload. The request at offset 0 carries `image`, `len` and `sha` (the
//!    file's SHA-256). **Resume** relies on the Zephyr/mcumgr image-management
//!    behaviour: when a request at offset 0 carries the `sha` of an upload the
//!    device has in progress, the device does not restart but answers with the
//!    offset it has, which is where we continue; the data of that one request
//!    is not written. Every answer's `off` is authoritative: a device that
//!    expects another offset (a lost answer, a device that restarted and
//!    answers 0) gets the data from there. Only bytes the device accepted
//!    count as sent.
//! 5. State write `{hash, confirm: false}` (test), reset (sent once: a second
//!    reset before the confirm would make MCUboot revert), a short pause (Zephyr
//!    resets ~250 ms after answering), then echo until the device answers,
//!    within `reset_wait_ms`.
//! 6. State read: slot 0 must run the new hash, else the image did not boot
//!    (MCUboot reverted it). Then state write `{hash, confirm: true}` and read
//!    back `confirmed`.

use otagw_plugin_sdk::{Error, Level, LinkFeature, Phase, Port, Source};

use crate::Settings;
use crate::client::{Client, Slot, find_slot, upload_body};
use crate::mcuboot::{self, Verified, Version};
use crate::smp::{HEADER_LEN, bstr_head_len};
use crate::transport::Transport;

/// The buffer assumed when the device does not report its MCUmgr parameters.
pub const DEFAULT_BUF_SIZE: u32 = 512;
/// Pause after the reset before polling (Zephyr resets 250 ms after answering).
const RESET_SETTLE_MS: u32 = 1000;
/// Longest wait for one echo while the device reboots.
const ECHO_POLL_MS: u32 = 1000;
/// Finish-phase steps reported through `progress`: test, reset, back, confirm.
const FINISH_STEPS: u64 = 4;

/// What `flash` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Image bytes the device accepted during this call.
    pub bytes_sent: u64,
    /// Requests sent again after a timeout, plus upload requests the device
    /// answered with another offset.
    pub retries: u32,
    /// Where the upload resumed, when the device already had part of it.
    pub resumed_from: Option<u64>,
    /// One line for the job log.
    pub summary: String,
}

/// Counters of one upload.
#[derive(Debug, Default, Clone)]
struct Upload {
    /// The image ranges `[start, end)` the device confirmed receiving from
    /// this call's requests, sorted and disjoint: a byte sent again after the
    /// device rewound (a reset lost its session) counts once, and bytes the
    /// device says it had before (a jump forward) do not count.
    accepted: Vec<(u64, u64)>,
    /// Data bytes put into requests (retries and the resume probe included).
    wire: u64,
    resyncs: u32,
    resumed_from: Option<u64>,
}

impl Upload {
    /// The device confirmed `[start, end)` of the data this call sent.
    fn accept(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // Merge every range that touches [s, e) into it (they are sorted, so
        // a range that comes to touch it as it grows is merged too).
        self.accepted.retain(|&(a, b)| {
            if b < s || a > e {
                return true;
            }
            s = s.min(a);
            e = e.max(b);
            false
        });
        let at = self.accepted.partition_point(|&(a, _)| a < s);
        self.accepted.insert(at, (s, e));
    }

    /// Image bytes the device accepted during this call, each counted once.
    fn acked(&self) -> u64 {
        self.accepted.iter().map(|(a, b)| b - a).sum()
    }
}

/// Flash `src` to the device behind `port`.
pub fn flash<P: Port + ?Sized, S: Source + ?Sized>(
    port: &mut P,
    src: &mut S,
    s: &Settings,
) -> Result<Report, Error> {
    let img = mcuboot::verify(src, s.public_key.as_ref())?;
    port.log(Level::Info, &format!("verified: {}", img.summary));
    let mut c = Client::new(port, s);
    c.drain();
    let slots = c.state_read()?;
    let running = find_slot(&slots, s.image, 0).cloned();
    let new_ver = img.header.version;
    let mut up = Upload::default();

    match &running {
        Some(r) if r.hash == img.hash && r.confirmed => {
            c.port().progress(FINISH_STEPS, FINISH_STEPS, Phase::Finish);
            return Ok(Report {
                bytes_sent: 0,
                retries: c.resent,
                resumed_from: None,
                summary: format!("image {new_ver} already runs confirmed in slot 0: nothing to do"),
            });
        }
        Some(r) if r.hash == img.hash => {
            c.port().log(
                Level::Info,
                &format!(
                    "image {new_ver} already runs in slot 0 but is not confirmed \
                     (an earlier flash stopped after the reset): confirming it"
                ),
            );
        }
        _ => {
            if s.require_newer {
                check_newer(running.as_ref(), new_ver)?;
            }
            let staged = find_slot(&slots, s.image, 1).is_some_and(|x| x.hash == img.hash);
            if staged {
                c.port().log(
                    Level::Info,
                    "slot 1 already holds this image (an earlier upload completed): no upload",
                );
                c.port().progress(img.size, img.size, Phase::Transfer);
            } else {
                up = upload(&mut c, src, &img, s)?;
            }
            test_and_reset(&mut c, &img, s)?;
        }
    }

    // Confirm.
    c.state_write(&img.hash, true)?;
    let slots = c.state_read()?;
    match find_slot(&slots, s.image, 0) {
        Some(r) if r.hash == img.hash && r.confirmed => {}
        other => {
            return Err(Error::Device(format!(
                "image confirm: the device answered, but slot 0 {}",
                describe(other)
            )));
        }
    }
    c.port().progress(FINISH_STEPS, FINISH_STEPS, Phase::Finish);
    let retries = c.resent + up.resyncs;
    let resumed = up
        .resumed_from
        .map(|o| format!(", resumed at offset {o}"))
        .unwrap_or_default();
    Ok(Report {
        bytes_sent: up.acked(),
        retries,
        resumed_from: up.resumed_from,
        summary: format!(
            "image {new_ver} uploaded ({} bytes accepted, {} data bytes sent{resumed}, {retries} retries), tested, booted and confirmed",
            up.acked(),
            up.wire
        ),
    })
}

/// Refuse an image that is not newer than the running one (step -3).
fn check_newer(running: Option<&Slot>, new: Version) -> Result<(), Error> {
    let Some(r) = running else {
        return Err(Error::Verify(
            "require_newer: the device lists no image in slot 0 to compare with".into(),
        ));
    };
    let Some(cur) = Version::parse(&r.version) else {
        return Err(Error::Verify(format!(
            "require_newer: cannot read the running version {:?}",
            r.version
        )));
    };
    if new <= cur {
        return Err(Error::Verify(format!(
            "require_newer: image version {new} is not newer than the running {cur}"
        )));
    }
    Ok(())
}

fn describe(slot: Option<&Slot>) -> String {
    match slot {
        None => "lists no image".into(),
        Some(r) => format!(
            "runs {} ({}{})",
            if r.version.is_empty() {
                "?"
            } else {
                &r.version
            },
            r.hash
                .iter()
                .take(8)
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            if r.confirmed {
                ", confirmed"
            } else {
                ", not confirmed"
            }
        ),
    }
}

/// Most data bytes an upload request at `off` can carry so that the packet
/// fits the device's buffer.
fn chunk_len(
    t: &Transport,
    buf: u32,
    max_chunk: Option<u32>,
    off: u64,
    remaining: u64,
    first: Option<(u64, &[u8], u32)>,
) -> Result<usize, Error> {
    let empty = upload_body(off, &[], first);
    // The empty body holds a 1-byte bstr head the real one replaces.
    let fixed = t.buffer_cost(HEADER_LEN + empty.len() - 1);
    let buf = buf as usize;
    let mut d = buf.saturating_sub(fixed + 1);
    while d > 0 && fixed + bstr_head_len(d) + d > buf {
        d -= 1;
    }
    if let Some(m) = max_chunk {
        d = d.min(m as usize);
    }
    let remaining = usize::try_from(remaining).unwrap_or(usize::MAX);
    if d < remaining {
        d = d / 4 * 4;
    } else {
        d = remaining;
    }
    if d == 0 {
        return Err(Error::Transfer(format!(
            "the device's SMP buffer ({buf} bytes) is too small for an upload request"
        )));
    }
    Ok(d)
}

fn upload<P: Port + ?Sized, S: Source + ?Sized>(
    c: &mut Client<'_, P>,
    src: &mut S,
    img: &Verified,
    s: &Settings,
) -> Result<Upload, Error> {
    let buf = match s.buf_size {
        Some(b) => b,
        None => match c.params()? {
            Some((size, _)) => size,
            None => DEFAULT_BUF_SIZE,
        },
    };
    if s.erase {
        c.port()
            .log(Level::Info, "erasing the secondary slot (option erase)");
        c.erase(s.erase_timeout_ms)?;
    }
    let total = img.size;
    let mut up = Upload::default();
    let mut off = 0u64;
    let mut stalls = 0u32;
    let mut restarts = 0u32;
    let mut reconnects = 0u32;
    let mut matched = None;
    let mut logged_size = false;
    c.port().progress(0, total, Phase::Transfer);
    while off < total {
        let first = (off == 0).then_some((total, &img.file_sha256[..], s.image));
        let n = chunk_len(c.transport(), buf, s.max_chunk, off, total - off, first)?;
        if !logged_size {
            logged_size = true;
            c.port().log(
                Level::Debug,
                &format!("device buffer {buf} bytes: up to {n} image bytes per request"),
            );
        }
        let data = src.read(off, n as u32);
        if data.len() != n {
            return Err(Error::Transfer(format!(
                "the image returned {} bytes at offset {off}, expected {n}",
                data.len()
            )));
        }
        let body = upload_body(off, &data, first);
        let timeout = if off == 0 {
            s.erase_timeout_ms
        } else {
            s.timeout_ms
        };
        up.wire += n as u64;
        let ans = match c.upload(off, body, timeout) {
            Ok(ans) => ans,
            // The link closed mid-upload (a BLE peripheral left radio range):
            // connect again and start at offset 0 with the image's sha; a
            // device that kept the upload answers the offset it holds.
            Err(e)
                if e.is_link_closed()
                    && reconnects < s.retries.max(1)
                    && c.port().supports(LinkFeature::Reopen) =>
            {
                reconnects += 1;
                c.port().log(
                    Level::Warn,
                    &format!(
                        "image upload at offset {off}: {e}; connecting again ({reconnects} of {}) \
                         to resume where the device is",
                        s.retries.max(1)
                    ),
                );
                c.reopen(s.reset_wait_ms).map_err(|r| {
                    Error::Transfer(format!(
                        "image upload at offset {off}: {e}; the device did not come back: {r}"
                    ))
                })?;
                off = 0;
                continue;
            }
            Err(e) => return Err(e),
        };
        let next = ans.off;
        matched = ans.matched.or(matched);
        if next > total {
            return Err(Error::Transfer(format!(
                "image upload at offset {off}: the device asks for offset {next}, beyond the image's {total} bytes"
            )));
        }
        if next == off + n as u64 {
            up.accept(off, next);
            stalls = 0;
        } else if off == 0 && next > n as u64 {
            up.resumed_from = Some(next);
            c.port().log(
                Level::Info,
                &format!(
                    "the device already holds {next} of {total} bytes of this image (same sha): resuming there"
                ),
            );
        } else {
            up.resyncs += 1;
            c.port().log(
                Level::Warn,
                &format!("image upload: sent offset {off}, the device expects offset {next}: continuing from there"),
            );
            if next > off {
                // Part of the chunk, or all of it and more the device had.
                up.accept(off, next.min(off + n as u64));
                stalls = 0;
            } else if next == off {
                stalls += 1;
            } else {
                restarts += 1;
            }
            if stalls > s.retries || restarts > s.retries.max(1) {
                return Err(Error::Transfer(format!(
                    "image upload: no progress, the device keeps asking for offset {next} ({stalls} stalls, {restarts} restarts)"
                )));
            }
        }
        off = next;
        c.port().progress(off, total, Phase::Transfer);
    }
    if matched == Some(false) {
        return Err(Error::Device(
            "image upload: the device reports that the uploaded data does not match its sha".into(),
        ));
    }
    Ok(up)
}

fn test_and_reset<P: Port + ?Sized>(
    c: &mut Client<'_, P>,
    img: &Verified,
    s: &Settings,
) -> Result<(), Error> {
    c.state_write(&img.hash, false)?;
    c.port().progress(1, FINISH_STEPS, Phase::Finish);
    if !c.reset()? {
        c.port().log(
            Level::Warn,
            "reset: no answer (not sent again); waiting for the device anyway",
        );
    }
    c.port().progress(2, FINISH_STEPS, Phase::Finish);
    wait_for_device(c, s)?;
    c.port().progress(3, FINISH_STEPS, Phase::Finish);
    let slots = c.state_read()?;
    match find_slot(&slots, s.image, 0) {
        Some(r) if r.hash == img.hash => Ok(()),
        other => Err(Error::Device(format!(
            "the new image did not boot: slot 0 {} (MCUboot reverts an unconfirmed image)",
            describe(other)
        ))),
    }
}

/// After a reset: pause, then echo until the device answers or
/// `reset_wait_ms` has passed; a link that fails meanwhile is reopened where
/// it can be.
fn wait_for_device<P: Port + ?Sized>(c: &mut Client<'_, P>, s: &Settings) -> Result<(), Error> {
    let start = c.port().now_ms();
    c.port().sleep(RESET_SETTLE_MS.min(s.reset_wait_ms / 4));
    let mut last = String::from("no answer");
    loop {
        c.drain();
        let elapsed = c.port().now_ms().saturating_sub(start);
        if elapsed >= u64::from(s.reset_wait_ms) {
            return Err(Error::Timeout(format!(
                "the device did not answer within reset_wait_ms = {} ms after the reset ({last}); \
                 MCUboot reverts the unconfirmed image on its next reset",
                s.reset_wait_ms
            )));
        }
        let left = u32::try_from(u64::from(s.reset_wait_ms) - elapsed).unwrap_or(u32::MAX);
        let t = s.timeout_ms.min(ECHO_POLL_MS).min(left).max(1);
        match c.echo("otagw", t, 1) {
            Ok(_) => {
                c.drain();
                return Ok(());
            }
            Err(Error::Timeout(_)) => {}
            Err(Error::Transfer(m)) if c.port().supports(LinkFeature::Reopen) => {
                // The link went with the device (a USB-CDC port that
                // re-enumerates, a BLE peripheral that reboots): open it
                // again, waiting for the device.
                last = match c.reopen(left) {
                    Ok(()) => m,
                    Err(e) => {
                        c.port().sleep(t);
                        format!("{m}; reopening the link: {e}")
                    }
                };
            }
            Err(Error::Transfer(m)) => {
                last = m;
                c.port().sleep(t);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
