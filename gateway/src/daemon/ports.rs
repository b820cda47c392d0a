//! What the daemon's core talks to, as small traits (CONVENTIONS 11): the
//! upstream publisher and the clock. The real ones are the MQTT session and the
//! system clock; the fakes in [`fakes`] let the intake, the job table and the
//! runner's rules be unit-tested without sockets or wall-clock time.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::upstream::presence::LeafPlatform;
use crate::upstream::{Delivery, Upstream};

/// Where the daemon's messages go.
pub(crate) trait Publisher: Send + Sync {
    /// Publish `payload` on `topic`. An error means it was not taken: a
    /// best-effort message is then lost, a durable one was not stored.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Each leaf's state at the platform, where the upstream has one
    /// (aliyun mode).
    fn platform(&self) -> Option<Vec<LeafPlatform>> {
        None
    }

    /// Subscribe to more topics (leaves added by a reload).
    fn subscribe(&self, _topics: Vec<String>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Durable messages waiting for the broker, and since when (Unix ms)
    /// the oldest has waited.
    fn outbox(&self) -> (usize, Option<u64>) {
        (0, None)
    }
}

impl Publisher for Upstream {
    fn platform(&self) -> Option<Vec<LeafPlatform>> {
        Upstream::platform(self)
    }

    fn outbox(&self) -> (usize, Option<u64>) {
        (self.outbox_len(), self.outbox_oldest())
    }

    fn subscribe(&self, topics: Vec<String>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            Upstream::subscribe(self, topics)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        delivery: Delivery,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            Upstream::publish(self, topic, Bytes::from(payload), delivery)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The jobs' clock: milliseconds since the unix epoch.
pub(crate) trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system's wall clock (job histories carry dates an operator can read).
#[derive(Debug, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default()
    }
}

/// The clock the daemon uses unless a test gives it another.
pub(crate) fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

#[cfg(test)]
pub(crate) mod fakes {
    //! Fakes of the ports, for unit tests.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A clock that only moves when told.
    #[derive(Debug, Default)]
    pub(crate) struct ManualClock(AtomicU64);

    impl ManualClock {
        pub fn at(ms: u64) -> ManualClock {
            ManualClock(AtomicU64::new(ms))
        }
    }

    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// One message a [`Recorder`] took.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) struct Sent {
        pub topic: String,
        pub payload: serde_json::Value,
        pub delivery: Delivery,
    }

    /// A publisher that records what it is given (and can refuse best-effort
    /// messages, as a disconnected session does).
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub sent: Mutex<Vec<Sent>>,
        pub offline: std::sync::atomic::AtomicBool,
    }

    impl Recorder {
        pub fn take(&self) -> Vec<Sent> {
            std::mem::take(&mut *self.sent.lock().unwrap())
        }
    }

    impl Publisher for Recorder {
        fn publish<'a>(
            &'a self,
            topic: &'a str,
            payload: Vec<u8>,
            delivery: Delivery,
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                if delivery == Delivery::BestEffort && self.offline.load(Ordering::SeqCst) {
                    return Err("not connected".into());
                }
                let payload = serde_json::from_slice(&payload).expect("the daemon sends JSON");
                self.sent.lock().unwrap().push(Sent {
                    topic: topic.to_string(),
                    payload,
                    delivery,
                });
                Ok(())
            })
        }
    }
}
