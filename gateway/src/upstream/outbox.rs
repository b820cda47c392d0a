//! The durable outbox: publishes the platform must not lose (terminal progress,
//! informs after a flash) kept in the store's `outbox` tree until the broker
//! acknowledges them (PUBACK). Keys are sequence numbers (u64 big-endian, so
//! the tree iterates in publish order); values are `{topic, payload}`.
//!
//! Every push is flushed to disk before the message is handed to the MQTT
//! client. Removals are not flushed one by one: losing a removal in a crash
//! only re-sends a message the broker already has, which QoS 1
//! (at-least-once) allows anyway.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::UpstreamError;
use crate::store::Store;

/// The tree name, owned by this module.
pub const TREE: &str = "outbox";

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: u64,
    pub topic: String,
    pub payload: Bytes,
}

/// Typed access to the `outbox` tree.
#[derive(Debug, Clone)]
pub struct Outbox {
    tree: sled::Tree,
    next: std::sync::Arc<AtomicU64>,
    /// When each waiting message was stored, in memory: entries found at
    /// `open` count from then (their age before a restart is not kept).
    /// Unix milliseconds.
    stamps: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u64, u64>>>,
}

impl Outbox {
    /// Open the tree; sequence numbers continue after the last stored entry.
    pub fn open(store: &Store) -> Result<Outbox, UpstreamError> {
        let tree = store.tree(TREE).map_err(|source| UpstreamError::Store {
            phase: "open the outbox",
            source: Box::new(source),
        })?;
        let last = tree
            .last()
            .map_err(|e| sled_err("read the outbox", e))?
            .and_then(|(k, _)| key_to_seq(&k));
        let now = now_ms();
        let stamps = tree
            .iter()
            .keys()
            .filter_map(|k| k.ok().and_then(|k| key_to_seq(&k)))
            .map(|seq| (seq, now))
            .collect();
        Ok(Outbox {
            tree,
            next: std::sync::Arc::new(AtomicU64::new(last.map_or(1, |s| s + 1))),
            stamps: std::sync::Arc::new(std::sync::Mutex::new(stamps)),
        })
    }

    /// Store a message and flush it to disk; returns its sequence number.
    pub async fn push(&self, topic: &str, payload: &[u8]) -> Result<u64, UpstreamError> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        self.tree
            .insert(seq.to_be_bytes(), encode(topic, payload))
            .map_err(|e| sled_err("write to the outbox", e))?;
        self.stamps().insert(seq, now_ms());
        crate::store::flush_tree(&self.tree)
            .await
            .map_err(|e| sled_err("flush the outbox", e))?;
        Ok(seq)
    }

    /// Forget an acknowledged message (not flushed: see the module doc).
    pub fn remove(&self, seq: u64) -> Result<bool, UpstreamError> {
        self.stamps().remove(&seq);
        self.tree
            .remove(seq.to_be_bytes())
            .map(|old| old.is_some())
            .map_err(|e| sled_err("remove from the outbox", e))
    }

    /// Every stored message, oldest first. Undecodable entries (a damaged
    /// store) are logged and dropped rather than blocking the rest.
    pub fn entries(&self) -> Result<Vec<OutboxEntry>, UpstreamError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| sled_err("read the outbox", e))?;
            match (key_to_seq(&k), decode(&v)) {
                (Some(seq), Some((topic, payload))) => out.push(OutboxEntry {
                    seq,
                    topic,
                    payload,
                }),
                _ => {
                    tracing::error!(key = ?k, "dropping an undecodable outbox entry");
                    if let Some(seq) = key_to_seq(&k) {
                        self.stamps().remove(&seq);
                    }
                    let _ = self.tree.remove(k);
                }
            }
        }
        Ok(out)
    }

    /// One stored message, if it is still waiting for its PUBACK.
    pub fn get(&self, seq: u64) -> Option<OutboxEntry> {
        let v = self.tree.get(seq.to_be_bytes()).ok()??;
        let (topic, payload) = decode(&v)?;
        Some(OutboxEntry {
            seq,
            topic,
            payload,
        })
    }

    /// The sequence number the next push gets: every entry stored (or being
    /// stored) so far has a smaller one.
    pub fn next_seq(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Whether a message is still waiting for its PUBACK.
    pub fn contains(&self, seq: u64) -> bool {
        self.tree.contains_key(seq.to_be_bytes()).unwrap_or(false)
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Since when (Unix ms) the oldest waiting message has waited (since
    /// this start at most); `None` when none waits.
    pub fn oldest_since_ms(&self) -> Option<u64> {
        // A stamp whose entry is gone another way (undecodable) is passed
        // over; `remove` and `entries` drop them.
        self.stamps()
            .iter()
            .find(|(seq, _)| self.contains(**seq))
            .map(|(_, at)| *at)
    }

    fn stamps(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, u64>> {
        self.stamps.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn sled_err(phase: &'static str, e: sled::Error) -> UpstreamError {
    UpstreamError::Store {
        phase,
        source: Box::new(e),
    }
}

fn key_to_seq(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

/// `u32 BE topic length ‖ topic ‖ payload`.
fn encode(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + topic.len() + payload.len());
    v.extend_from_slice(&u32::try_from(topic.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(payload);
    v
}

fn decode(v: &[u8]) -> Option<(String, Bytes)> {
    let len = usize::try_from(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)).ok()?;
    let topic = std::str::from_utf8(v.get(4..4 + len)?).ok()?.to_owned();
    Some((topic, Bytes::copy_from_slice(&v[4 + len..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_survive_a_reopen_in_order_and_sequence_numbers_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let (store, _) = Store::open(&path).unwrap();
            let ob = Outbox::open(&store).unwrap();
            assert_eq!(ob.push("a/b", b"one").await.unwrap(), 1);
            assert_eq!(ob.push("c", b"").await.unwrap(), 2);
            assert_eq!(ob.push("d", b"three").await.unwrap(), 3);
            assert!(ob.remove(1).unwrap());
            assert!(!ob.remove(1).unwrap());
        }
        crate::store::wait_unlocked(&path);
        let (store, _) = Store::open(&path).unwrap();
        let ob = Outbox::open(&store).unwrap();
        let e = ob.entries().unwrap();
        assert_eq!(
            e,
            vec![
                OutboxEntry {
                    seq: 2,
                    topic: "c".into(),
                    payload: Bytes::new()
                },
                OutboxEntry {
                    seq: 3,
                    topic: "d".into(),
                    payload: Bytes::from_static(b"three")
                },
            ]
        );
        assert_eq!(ob.push("e", b"x").await.unwrap(), 4);
        assert_eq!(ob.len(), 3);
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let v = encode("/ota/device/progress/pk/dn", b"{\"id\":\"1\"}");
        assert_eq!(
            decode(&v),
            Some((
                "/ota/device/progress/pk/dn".to_owned(),
                Bytes::from_static(b"{\"id\":\"1\"}")
            ))
        );
        assert_eq!(decode(b"\0\0"), None);
        assert_eq!(decode(b"\0\0\0\x09abc"), None);
    }
}
