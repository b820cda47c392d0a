//! An HTTP server for firmware images: real HTTP on 127.0.0.1, Range
//! requests, a record of every request, and faults to inject.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

/// What a request asked for and got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub path: String,
    /// The Range header, if any.
    pub range: Option<String>,
    pub status: u16,
}

/// A fault served for a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status, always.
    Status(u16),
    /// Send only the first `n` bytes of the body and then close, once; later
    /// requests are served whole.
    TruncateOnce(usize),
    /// Send only the first `n` bytes of the body and then close, every time.
    Truncate(usize),
    /// Send the first `n` bytes and then stall forever (until the client gives up).
    StallAfter(usize),
    /// Ignore Range headers (always 200 with the whole file).
    NoRanges,
    /// Serve the body at about this many bytes a second, in small pieces
    /// (a slow server, so a client can be interrupted mid-download).
    Throttle(u64),
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, Bytes>,
    faults: HashMap<String, Fault>,
    log: Vec<Request>,
    /// Body bytes handed to the connection, per path.
    served: HashMap<String, u64>,
}

/// The running server.
pub struct FileServer {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for FileServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl FileServer {
    pub async fn start() -> FileServer {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .route("/{*path}", get(serve))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        FileServer { addr, inner, stop }
    }

    /// Serve `bytes` at `/{name}`; returns the URL.
    pub fn add(&self, name: &str, bytes: impl Into<Bytes>) -> String {
        self.lock().files.insert(name.to_string(), bytes.into());
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    pub fn fault(&self, name: &str, fault: Fault) {
        self.lock().faults.insert(name.to_string(), fault);
    }

    pub fn clear_fault(&self, name: &str) {
        self.lock().faults.remove(name);
    }

    /// Every request for `/{name}` so far.
    pub fn requests(&self, name: &str) -> Vec<Request> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.path == name)
            .cloned()
            .collect()
    }

    /// Body bytes of `/{name}` handed to connections so far, over every
    /// request: what clients fetched, counted in pieces of at most 16 KiB as
    /// the connection takes them (a client that goes away mid-body is
    /// counted up to the piece in flight).
    pub fn bytes_served(&self, name: &str) -> u64 {
        self.lock().served.get(name).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn parse_range(h: &str, len: usize) -> Option<(usize, usize)> {
    let spec = h.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: usize = a.parse().ok()?;
    let end = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<usize>().ok()?.min(len - 1)
    };
    (start <= end && start < len).then_some((start, end))
}

async fn serve(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (file, fault) = {
        let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
        let fault = g.faults.get(&path).cloned();
        if let Some(Fault::TruncateOnce(_)) = fault {
            g.faults.remove(&path);
        }
        (g.files.get(&path).cloned(), fault)
    };
    let record = |status: u16| {
        inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log
            .push(Request {
                path: path.clone(),
                range: range.clone(),
                status,
            })
    };
    let Some(file) = file else {
        record(404);
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Some(Fault::Status(s)) = fault {
        record(s);
        return StatusCode::from_u16(s)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response();
    }
    let ranged = match (&range, &fault) {
        (Some(r), f) if *f != Some(Fault::NoRanges) => parse_range(r, file.len()),
        _ => None,
    };
    if range.is_some() && ranged.is_none() && fault != Some(Fault::NoRanges) {
        record(416);
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let (status, body, content_range) = match ranged {
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            file.slice(a..=b),
            Some(format!("bytes {a}-{b}/{}", file.len())),
        ),
        None => (StatusCode::OK, file.clone(), None),
    };
    record(status.as_u16());
    let full_len = body.len();
    let stream_body = match fault {
        Some(Fault::TruncateOnce(n)) | Some(Fault::Truncate(n)) => {
            // Promise the full length, send less, close: a truncated download.
            let part = body.slice(..n.min(full_len));
            Body::from_stream(futures_once(part, false))
        }
        Some(Fault::StallAfter(n)) => {
            let part = body.slice(..n.min(full_len));
            Body::from_stream(futures_once(part, true))
        }
        Some(Fault::Throttle(rate)) => {
            Body::from_stream(counted(body, Some(rate), inner.clone(), path.clone()))
        }
        _ => Body::from_stream(counted(body, None, inner.clone(), path.clone())),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, full_len)
        .header(header::ACCEPT_RANGES, "bytes");
    if let Some(cr) = content_range {
        resp = resp.header(header::CONTENT_RANGE, cr);
    }
    resp.body(stream_body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A body stream that yields `part`, then either fails (the connection drops
/// before Content-Length is reached) or never ends.
fn futures_once(
    part: Bytes,
    stall: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    use futures_util::StreamExt;
    let head = futures_util::stream::iter([Ok(part)]);
    if stall {
        head.chain(futures_util::stream::pending()).boxed()
    } else {
        head.chain(futures_util::stream::iter([Err(std::io::Error::other(
            "truncated on purpose",
        ))]))
        .boxed()
    }
}

/// Piece size of a counted body.
const PIECE: usize = 16 * 1024;

/// `body` in pieces of [`PIECE`] bytes, each added to the path's served count
/// when the connection asks for it; with `rate`, piece k is not handed out
/// before k pieces' worth of time at `rate` bytes a second has passed.
fn counted(
    body: Bytes,
    rate: Option<u64>,
    inner: Arc<Mutex<Inner>>,
    path: String,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let start = tokio::time::Instant::now();
    futures_util::stream::unfold(0usize, move |at| {
        let (body, inner, path) = (body.clone(), inner.clone(), path.clone());
        async move {
            if at >= body.len() {
                return None;
            }
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = std::time::Duration::from_secs_f64(at as f64 / rate as f64);
                tokio::time::sleep_until(start + due).await;
            }
            let piece = body.slice(at..(at + PIECE).min(body.len()));
            *inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .served
                .entry(path)
                .or_default() += piece.len() as u64;
            Some((Ok(piece), at + PIECE))
        }
    })
}
