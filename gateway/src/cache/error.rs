//! [`CacheError`]: why an image could not be fetched or read, with the context
//! (URL, digest, offset) and the upstream step code it maps to.
//!
//! `Display` is short (it becomes the 128-character `desc` of a progress
//! message): it names the host, never the whole signed URL, and abbreviates
//! digests. The full values are in the fields.

use std::sync::Arc;

use super::digest::{Digest, ParseDigestError};

/// Why the cache failed. Cheap to clone: every caller sharing one download
/// gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// Connection refused, DNS, timeout, a broken or short body, HTTP 5xx:
    /// after the retries ran out.
    #[error("{}: download failed at byte {offset}: {reason}", host(url))]
    Download {
        url: String,
        digest: Digest,
        offset: u64,
        reason: String,
        #[source]
        source: Option<Arc<reqwest::Error>>,
    },
    /// The server answered with a status that retrying will not change (404,
    /// 410, …), or 5xx after the retries ran out.
    #[error("download from {} failed: HTTP {status}", host(url))]
    Status {
        url: String,
        digest: Digest,
        offset: u64,
        status: u16,
    },
    /// HTTP 403, what OSS answers once a signed URL has expired: ask the
    /// platform for the notice again (`firmware/get`).
    #[error("download URL expired (HTTP 403 from {})", host(url))]
    UrlExpired { url: String, digest: Digest },
    /// The whole image does not hash to the notice's `sign`.
    #[error("image digest mismatch: expected {}, got {}", expected.short(), got.short())]
    Digest { expected: Digest, got: Digest },
    /// The server sent more or fewer bytes than the notice's `size`.
    /// The server sent (or announced) more or fewer bytes than the notice's
    /// `size`; `got` is what was counted when the download stopped.
    #[error("image size mismatch: expected {expected} bytes, got {got}")]
    Size {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    /// The disk of `data_dir` has not got room for the rest of the image.
    #[error("not enough free space for the image: {needed} bytes needed, {free} free in {}", path.display())]
    NoSpace {
        needed: u64,
        free: u64,
        path: std::path::PathBuf,
    },
    /// The request cannot be downloaded at all (not an http(s) URL).
    #[error("cannot download {}: {reason}", host(url))]
    BadRequest { url: String, reason: String },
    /// The notice's `sign`/`signMethod` is not a digest.
    #[error(transparent)]
    BadDigest(#[from] ParseDigestError),
    /// The sled store (the images' metadata) failed.
    #[error("firmware cache store ({op}): {source}")]
    Store {
        op: &'static str,
        #[source]
        source: Arc<sled::Error>,
    },
    /// An image file could not be created, written, synced, read or deleted.
    #[error("firmware cache: cannot {op} {}: {source}", path.display())]
    File {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The store holds something the cache cannot read.
    #[error("firmware cache: damaged entry for {}: {reason}", digest.short())]
    Corrupt { digest: Digest, reason: String },
    /// The HTTP client could not be built.
    #[error("firmware cache: HTTP client: {0}")]
    Client(Arc<reqwest::Error>),
    #[error("firmware cache: {0}")]
    Storage(Arc<crate::store::StoreError>),
    /// The cache is shutting down ([`super::Cache::shutdown`]).
    #[error("firmware cache shut down during the download")]
    ShutDown,
}

impl CacheError {
    /// The upstream progress step this failure is reported as: `-2` download
    /// failed (including an expired URL), `-3` verification failed (digest or
    /// size), `-1` anything else (the gateway's own store).
    pub fn step_code(&self) -> i32 {
        match self {
            CacheError::Download { .. }
            | CacheError::Status { .. }
            | CacheError::UrlExpired { .. }
            | CacheError::NoSpace { .. }
            | CacheError::BadRequest { .. } => -2,
            CacheError::Digest { .. } | CacheError::Size { .. } | CacheError::BadDigest(_) => -3,
            CacheError::Store { .. }
            | CacheError::Corrupt { .. }
            | CacheError::File { .. }
            | CacheError::Client(_)
            | CacheError::Storage(_)
            | CacheError::ShutDown => -1,
        }
    }

    /// The platform must be asked for a fresh notice (new signed URL).
    pub fn url_expired(&self) -> bool {
        matches!(self, CacheError::UrlExpired { .. })
    }

    pub(crate) fn store(op: &'static str) -> impl FnOnce(sled::Error) -> CacheError {
        move |source| CacheError::Store {
            op,
            source: Arc::new(source),
        }
    }
}

impl From<crate::store::StoreError> for CacheError {
    fn from(e: crate::store::StoreError) -> Self {
        CacheError::Storage(Arc::new(e))
    }
}

/// The host of a URL (`cdn.example.com:8080`), for messages; the signed query
/// string of an OSS URL is long and says nothing to a person.
pub(crate) fn host(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => clip(&format!("{h}:{p}"), 40),
            (Some(h), None) => clip(h, 40),
            _ => "?".to_string(),
        },
        Err(_) => clip(url, 40),
    }
}

/// A short cause of an HTTP error (`connection refused`, `DNS lookup
/// failed`): reqwest's own message is generic, the innermost one can be long.
pub(crate) fn reason(e: &reqwest::Error) -> String {
    let mut chain = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        chain.push(c);
        cause = c.source();
    }
    for c in &chain {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            let s = match io.kind() {
                ConnectionRefused => "connection refused",
                ConnectionReset => "connection reset",
                ConnectionAborted => "connection aborted",
                TimedOut => "timed out",
                HostUnreachable => "host unreachable",
                NetworkUnreachable => "network unreachable",
                UnexpectedEof => "connection closed early",
                _ => continue,
            };
            return s.to_string();
        }
    }
    let inner = chain.last().map(|c| c.to_string()).unwrap_or_default();
    if e.is_timeout() {
        "timed out".to_string()
    } else if inner.contains("lookup") || inner.to_ascii_lowercase().contains("dns") {
        "DNS lookup failed".to_string()
    } else if e.is_body() || e.is_decode() {
        format!("connection broken ({})", clip(&inner, 40))
    } else {
        clip(&inner, 48)
    }
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(max - 1).collect();
        c.push('…');
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_error_messages_fit_a_desc() {
        let d = Digest::from_sign("SHA256", &"ab".repeat(32)).unwrap();
        let g = Digest::from_sign("SHA256", &"cd".repeat(32)).unwrap();
        let long = format!(
            "https://ota-bucket.oss-cn-shanghai.aliyuncs.com/{}/fw.bin?Expires=1&OSSAccessKeyId=x&Signature={}",
            "p".repeat(80),
            "s".repeat(60)
        );
        let errors = [
            CacheError::Digest {
                expected: d.clone(),
                got: g,
            },
            CacheError::UrlExpired {
                url: long.clone(),
                digest: d.clone(),
            },
            CacheError::Status {
                url: long.clone(),
                digest: d.clone(),
                offset: 0,
                status: 404,
            },
            CacheError::Download {
                url: long.clone(),
                digest: d.clone(),
                offset: 123_456_789,
                reason: "x".repeat(48),
                source: None,
            },
            CacheError::Size {
                digest: d,
                expected: 432_945,
                got: 432_946,
            },
        ];
        for e in &errors {
            let s = e.to_string();
            assert!(s.len() < 128, "{} chars: {s}", s.len());
            assert!(!s.contains("Signature"), "{s}");
        }
        assert_eq!(
            errors.iter().map(CacheError::step_code).collect::<Vec<_>>(),
            [-3, -2, -2, -2, -3]
        );
    }
}
