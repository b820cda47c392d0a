//! `GET /api/events`: server-sent events of what the API shows, so the
//! dashboard updates without polling.
//!
//! Every connection (and reconnection) starts with `reset` (`{}`), then the
//! whole state as if it had all changed; after that only what changed, at
//! most about four times a second:
//!
//! - `overview`, `plugins`, `cache`: the whole object, when it changed;
//! - `devices`, `jobs`: `{"upsert": [rows], "remove": [keys]}`, a row's key
//!   being `device#module`;
//! - `campaigns`: `{"upsert": [views], "remove": [ids]}`.
//!
//! A slow link gets the rows that changed, not the table. The stream ends
//! when the gateway stops.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;

use super::{Api, StatusSource};

/// The shortest time between two batches of events.
const COALESCE: Duration = Duration::from_millis(250);
/// How often the state is looked at anyway: a few things change without
/// telling (the outbox, the leaves' presence at the platform), and a
/// reader's login may have ended.
const RECHECK: Duration = Duration::from_secs(5);

/// What one connection last sent, serialized.
#[derive(Default)]
struct Sent {
    whole: BTreeMap<&'static str, String>,
    rows: BTreeMap<&'static str, BTreeMap<String, String>>,
}

impl Sent {
    fn whole(&mut self, out: &mut Vec<Event>, name: &'static str, value: &impl Serialize) {
        let Ok(json) = serde_json::to_string(value) else {
            return;
        };
        if self.whole.get(name) != Some(&json) {
            out.push(Event::default().event(name).data(&json));
            self.whole.insert(name, json);
        }
    }

    fn rows<T: Serialize>(
        &mut self,
        out: &mut Vec<Event>,
        name: &'static str,
        rows: Vec<T>,
        key: impl Fn(&T) -> String,
    ) {
        let last = self.rows.entry(name).or_default();
        let mut now = BTreeMap::new();
        let mut upsert = Vec::new();
        for r in rows {
            let k = key(&r);
            let Ok(json) = serde_json::to_value(&r) else {
                continue;
            };
            let text = json.to_string();
            if last.get(&k) != Some(&text) {
                upsert.push(json);
            }
            now.insert(k, text);
        }
        let remove: Vec<&String> = last.keys().filter(|k| !now.contains_key(*k)).collect();
        if !upsert.is_empty() || !remove.is_empty() {
            let data = serde_json::json!({ "upsert": upsert, "remove": remove });
            out.push(Event::default().event(name).data(data.to_string()));
        }
        *last = now;
    }

    /// The events that bring a client from what it was sent to `source`.
    fn update(&mut self, source: &dyn StatusSource) -> Vec<Event> {
        let mut out = Vec::new();
        self.whole(&mut out, "overview", &super::overview(source));
        self.rows(&mut out, "devices", source.devices(), |d| {
            format!("{}#{}", d.device, d.module)
        });
        self.rows(&mut out, "jobs", source.jobs(), |j| {
            format!("{}#{}", j.device, j.module)
        });
        self.rows(&mut out, "campaigns", source.campaigns(), |c| c.id.clone());
        self.whole(&mut out, "plugins", &source.plugins());
        self.whole(&mut out, "cache", &source.cache());
        out
    }
}

struct Conn {
    api: Api,
    /// The request's credentials, checked again before every batch.
    headers: axum::http::HeaderMap,
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    sent: Sent,
    first: bool,
}

/// The event stream of one client.
pub(super) async fn events(
    State(api): State<Api>,
    headers: axum::http::HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = api.source.changes();
    let conn = Conn {
        api,
        headers,
        changes,
        sent: Sent::default(),
        first: true,
    };
    let batches = futures_util::stream::unfold(conn, |mut c| async move {
        if c.first {
            c.first = false;
            if let Some(rx) = &mut c.changes {
                rx.mark_unchanged();
            }
            let mut batch = vec![Event::default().event("reset").data("{}")];
            batch.extend(c.sent.update(c.api.source.as_ref()));
            return Some((batch, c));
        }
        loop {
            let changed = async {
                match &mut c.changes {
                    Some(rx) => tokio::select! {
                        r = rx.changed() => r.is_ok(),
                        _ = tokio::time::sleep(RECHECK) => true,
                    },
                    None => {
                        tokio::time::sleep(RECHECK).await;
                        true
                    }
                }
            };
            tokio::select! {
                _ = c.api.stop.cancelled() => return None,
                alive = changed => if !alive { return None },
            }
            // Let a burst of changes (a flash's progress) settle into one batch.
            tokio::select! {
                _ = c.api.stop.cancelled() => return None,
                _ = tokio::time::sleep(COALESCE) => {}
            }
            // A logout, an expired or evicted session ends the stream.
            if !c.api.auth.may_read(&c.headers) {
                return None;
            }
            if let Some(rx) = &mut c.changes {
                rx.mark_unchanged();
            }
            let batch = c.sent.update(c.api.source.as_ref());
            if !batch.is_empty() {
                return Some((batch, c));
            }
        }
    });
    use futures_util::StreamExt;
    let stream = batches.flat_map(|b| futures_util::stream::iter(b.into_iter().map(Ok)));
    Sse::new(stream).keep_alive(KeepAlive::default())
}
