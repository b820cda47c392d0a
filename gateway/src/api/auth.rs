//! Who may read and who may change: the API token (`[api] token_file`),
//! sent as `Authorization: Bearer TOKEN` by the CLI, or turned into a
//! session cookie by the dashboard's login.
//!
//! - Reads (`GET`) are open while the API listens on loopback only, and
//!   then only to requests naming a loopback host (`localhost`, `127.x`,
//!   `[::1]`): a web page that re-points its own name at 127.0.0.1 (DNS
//!   rebinding) is refused. Beyond loopback every read needs the token or a
//!   session too.
//! - Changes (`POST`) always need one. A request carried by the session
//!   cookie must also carry the session's CSRF token in `X-Otagw-Csrf`
//!   (a header a cross-site form cannot set, and a cross-site script cannot
//!   read), and an `Origin`, when sent, must be this host. The cookie is
//!   `HttpOnly; SameSite=Strict` (and `Secure` over TLS).
//! - Sessions live in memory (a restart logs everyone out), 12 hours each,
//!   at most [`MAX_SESSIONS`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::error;

/// The session cookie's name.
pub const COOKIE: &str = "otagw_session";
/// The header that carries a session's CSRF token.
pub const CSRF_HEADER: &str = "x-otagw-csrf";
/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Logins kept at once; the oldest goes first.
pub const MAX_SESSIONS: usize = 64;

struct Session {
    csrf: String,
    since: Instant,
}

/// The API's access rules and its sessions.
pub struct Auth {
    /// What changing requests must carry; `None`: every change is refused.
    token: Option<String>,
    /// Reads need no login (the API listens on loopback only).
    reads_open: bool,
    /// Cookies are marked `Secure` (the API speaks TLS).
    secure: bool,
    sessions: Mutex<HashMap<String, Session>>,
}

/// What `GET /api/session` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub authenticated: bool,
    pub reads_need_login: bool,
    /// The CSRF token changing requests of this session carry.
    pub csrf: Option<String>,
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// How a request proved itself.
enum Who {
    Nobody,
    WrongToken,
    Bearer,
    Session { csrf: String },
}

impl Auth {
    pub fn new(token: Option<String>, reads_open: bool, secure: bool) -> Auth {
        Auth {
            token,
            reads_open,
            secure,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn who(&self, headers: &HeaderMap) -> Who {
        if let Some(given) = bearer(headers) {
            return match &self.token {
                Some(t) if same_token(given.trim().as_bytes(), t.as_bytes()) => Who::Bearer,
                _ => Who::WrongToken,
            };
        }
        let Some(id) = cookie(headers, COOKIE) else {
            return Who::Nobody;
        };
        let mut sessions = self.sessions();
        sessions.retain(|_, s| s.since.elapsed() < SESSION_TTL);
        match sessions
            .iter()
            .find(|(k, _)| same_token(k.as_bytes(), id.as_bytes()))
        {
            Some((_, s)) => Who::Session {
                csrf: s.csrf.clone(),
            },
            None => Who::Nobody,
        }
    }

    /// Whether a read carrying `headers` may see the gateway's data.
    pub fn may_read(&self, headers: &HeaderMap) -> bool {
        match self.who(headers) {
            Who::Bearer | Who::Session { .. } => true,
            Who::WrongToken => false,
            Who::Nobody => self.reads_open && loopback_host(headers),
        }
    }

    fn status(&self, headers: &HeaderMap) -> SessionStatus {
        let (authenticated, csrf) = match self.who(headers) {
            Who::Bearer => (true, None),
            Who::Session { csrf } => (true, Some(csrf)),
            Who::Nobody | Who::WrongToken => (false, None),
        };
        SessionStatus {
            authenticated,
            reads_need_login: !self.reads_open,
            csrf,
        }
    }

    /// A new session; its id and CSRF token.
    fn open(&self) -> std::io::Result<(String, String)> {
        let id = random_hex(32)?;
        let csrf = random_hex(32)?;
        let mut sessions = self.sessions();
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.since)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                since: Instant::now(),
            },
        );
        Ok((id, csrf))
    }

    fn set_cookie(&self, value: &str, max_age: u64) -> String {
        format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
            if self.secure { "; Secure" } else { "" }
        )
    }
}

/// `n` random bytes from the kernel, as hex.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut raw = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    Ok(hex::encode(raw))
}

/// Compare without an early exit (the token's length is not secret).
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    // The scheme is case-insensitive (RFC 9110 11.1).
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the `Host` header names this machine's loopback (any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        // HTTP/1.0 without Host: no browser sends that.
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether the `Origin` (when sent) names the host the request went to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| !host.is_empty() && rest == host)
}

const NEEDS_TOKEN: &str = "this request needs the API token: send `Authorization: Bearer TOKEN` \
                           with the contents of [api] token_file (otagw upgrade and otagw \
                           campaign read it), or log in to the dashboard with it";
const WRONG_TOKEN: &str = "wrong API token: use the contents of [api] token_file of this gateway";

/// The gate in front of every route but the page, health and login.
pub async fn gate(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let changing = !matches!(*req.method(), Method::GET | Method::HEAD);
    if changing && auth.token.is_none() {
        return error(
            StatusCode::FORBIDDEN,
            "this API has no token configured: changing requests are refused".into(),
        );
    }
    match auth.who(req.headers()) {
        Who::WrongToken => error(StatusCode::FORBIDDEN, WRONG_TOKEN.into()),
        Who::Bearer => next.run(req).await,
        Who::Session { csrf } => {
            if changing {
                let given = req
                    .headers()
                    .get(CSRF_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !same_token(given.as_bytes(), csrf.as_bytes()) || !same_origin(req.headers()) {
                    return error(
                        StatusCode::FORBIDDEN,
                        "refused: a changing request from the dashboard must come from its \
                         own page (reload the page and try again)"
                            .into(),
                    );
                }
            }
            next.run(req).await
        }
        Who::Nobody if !changing && auth.reads_open => {
            if loopback_host(req.headers()) {
                next.run(req).await
            } else {
                error(
                    StatusCode::FORBIDDEN,
                    "refused: without the API token this gateway answers only requests to \
                     localhost or 127.0.0.1 (open it by that address, or log in)"
                        .into(),
                )
            }
        }
        Who::Nobody => error(StatusCode::UNAUTHORIZED, NEEDS_TOKEN.into()),
    }
}

/// `GET /api/session`.
pub async fn session(State(auth): State<Arc<Auth>>, headers: HeaderMap) -> Response {
    axum::Json(auth.status(&headers)).into_response()
}

/// `POST /api/login` with `{"token": "..."}` (JSON only: a cross-site form
/// cannot send it): a session cookie.
pub async fn login(
    State(auth): State<Arc<Auth>>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json || !same_origin(&headers) {
        return error(
            StatusCode::BAD_REQUEST,
            "log in with a JSON body {\"token\": \"...\"} from the dashboard's page".into(),
        );
    }
    let Ok(l) = serde_json::from_slice::<Login>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "log in with a JSON body {\"token\": \"...\"}".into(),
        );
    };
    let ok = auth
        .token
        .as_ref()
        .is_some_and(|t| same_token(l.token.trim().as_bytes(), t.as_bytes()));
    if !ok {
        tracing::warn!("dashboard login refused: wrong API token");
        return error(StatusCode::FORBIDDEN, WRONG_TOKEN.into());
    }
    match auth.open() {
        Ok((id, _)) => (
            StatusCode::NO_CONTENT,
            [(
                header::SET_COOKIE,
                auth.set_cookie(&id, SESSION_TTL.as_secs()),
            )],
        )
            .into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot make a session: {e}"),
        ),
    }
}

/// `POST /api/logout`: the session ends; the cookie is cleared.
pub async fn logout(State(auth): State<Arc<Auth>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        auth.sessions().remove(id);
    }
    (
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, auth.set_cookie("", 0))],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_session_is_found_by_its_cookie_among_others() {
        let auth = Auth::new(Some("t0k".into()), true, false);
        let (id, csrf) = auth.open().unwrap();
        let h = headers(&[("cookie", &format!("a=b; {COOKIE}={id}; c=d"))]);
        let s = auth.status(&h);
        assert!(s.authenticated);
        assert_eq!(s.csrf, Some(csrf));
        assert!(
            !auth
                .status(&headers(&[("cookie", "otagw_session=nope")]))
                .authenticated
        );
        assert!(
            auth.status(&headers(&[("authorization", "bearer t0k")]))
                .authenticated
        );
    }

    #[test]
    fn sessions_are_capped_oldest_out() {
        let auth = Auth::new(Some("t".into()), true, true);
        let (first, _) = auth.open().unwrap();
        for _ in 0..MAX_SESSIONS {
            auth.open().unwrap();
        }
        assert_eq!(auth.sessions().len(), MAX_SESSIONS);
        assert!(!auth.sessions().contains_key(&first));
        assert!(auth.set_cookie("x", 1).ends_with("; Secure"));
    }

    #[test]
    fn open_reads_are_for_loopback_names_only() {
        let auth = Auth::new(Some("t".into()), true, false);
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "127.1.2.3",
        ] {
            assert!(auth.may_read(&headers(&[("host", host)])), "{host}");
        }
        for host in [
            "evil.example:8080",
            "10.0.0.2:8080",
            "[fe80::1]:80",
            "localhost.evil.example",
        ] {
            assert!(!auth.may_read(&headers(&[("host", host)])), "{host}");
        }
        let closed = Auth::new(Some("t".into()), false, false);
        assert!(!closed.may_read(&headers(&[("host", "127.0.0.1")])));
        assert!(closed.may_read(&headers(&[("host", "x"), ("authorization", "Bearer t")])));
    }

    #[test]
    fn origin_must_be_the_host_when_sent() {
        assert!(same_origin(&headers(&[("host", "10.0.0.2:8080")])));
        assert!(same_origin(&headers(&[
            ("host", "10.0.0.2:8080"),
            ("origin", "http://10.0.0.2:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "10.0.0.2:8080"),
            ("origin", "http://evil.example")
        ])));
    }
}
