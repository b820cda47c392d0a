//! An MQTT client that subscribes to everything and records what it sees, in
//! order, so tests can wait for messages and assert on exact payloads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One message the probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

#[derive(Default)]
struct Seen {
    messages: Vec<Message>,
}

/// A recording MQTT client.
pub struct MqttProbe {
    client: AsyncClient,
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
}

impl std::fmt::Debug for MqttProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttProbe").finish_non_exhaustive()
    }
}

impl MqttProbe {
    /// Connect to `127.0.0.1:port`, subscribe to `filter` (e.g. "#") and wait
    /// for the SUBACK, so nothing published afterwards is missed. The session
    /// is persistent: across a broker restart that keeps sessions
    /// ([`crate::Mosquitto::restart`]) the broker queues what the probe
    /// missed; where the session is lost, the probe subscribes again.
    pub async fn connect(port: u16, filter: &str) -> MqttProbe {
        let id = format!("probe-{}", crate::free_port());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_clean_session(false);
        let (client, mut el) = AsyncClient::new(opts, 256);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let changed = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (subacked_tx, subacked_rx) = tokio::sync::oneshot::channel();
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        {
            let resubscribe = client.clone();
            let filter = filter.to_string();
            let seen = seen.clone();
            let changed = changed.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut subacked = Some(subacked_tx);
                loop {
                    let ev = tokio::select! {
                        _ = stop.cancelled() => return,
                        ev = el.poll() => ev,
                    };
                    match ev {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            seen.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .messages
                                .push(Message {
                                    topic: p.topic.clone(),
                                    payload: p.payload.to_vec(),
                                });
                            changed.notify_waiters();
                        }
                        Ok(Event::Incoming(Packet::ConnAck(ack)))
                            if !ack.session_present && subacked.is_none() =>
                        {
                            let _ = resubscribe.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = subacked.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            // The broker went away (a test restarts it): retry.
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            }
                        }
                    }
                }
            });
        }
        tokio::time::timeout(Duration::from_secs(10), subacked_rx)
            .await
            .expect("SUBACK within 10 s")
            .expect("probe task alive");
        MqttProbe {
            client,
            seen,
            changed,
            stop,
        }
    }

    /// Publish (QoS 1).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue PUBLISH");
    }

    /// Every message seen so far.
    pub fn messages(&self) -> Vec<Message> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .messages
            .clone()
    }

    /// Messages on `topic`, in order.
    pub fn on(&self, topic: &str) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Wait until `done` holds over everything seen (checked on every new
    /// message), at most `limit`; panics with what was seen otherwise.
    pub async fn wait_until(&self, limit: Duration, what: &str, done: impl Fn(&[Message]) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if done(&self.messages()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen: Vec<String> = self
                    .messages()
                    .iter()
                    .map(|m| format!("{} {}", m.topic, m.text()))
                    .collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}; seen:\n{}",
                    seen.join("\n")
                );
            }
        }
    }
}

/// Incremental reading, for runs with thousands of messages where re-scanning
/// everything on each arrival ([`MqttProbe::wait_until`]) would cost more
/// than what is measured.
impl MqttProbe {
    /// Messages seen after the first `from`, in order.
    pub fn messages_from(&self, from: usize) -> Vec<Message> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.messages.get(from..).unwrap_or_default().to_vec()
    }

    /// Wait until more than `count` messages were seen, at most until
    /// `deadline`; false if the deadline passed first.
    pub async fn wait_beyond(&self, count: usize, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.changed.notified();
            if self
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .messages
                .len()
                > count
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for MqttProbe {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
