//! Where to connect: the upstream URL (`mqtt://` plain TCP, `mqtts://` TLS)
//! and, for TLS, a rustls client config (ring provider, see `crate::tls`)
//! trusting the system's roots plus an optional extra CA file.
//!
//! System roots are read from PEM bundles on disk (`SSL_CERT_FILE`, else the
//! usual distribution paths) with rustls' own PEM parser: no C, no extra crate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::UpstreamError;

/// A parsed upstream URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883);
/// `tcp`/`ssl`/`tls` are accepted as aliases.
pub fn parse_url(raw: &str) -> Result<Endpoint, UpstreamError> {
    let bad = |reason: &str| UpstreamError::Url {
        url: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    let tls = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        other => return Err(bad(&format!("scheme {other:?} is not mqtt:// or mqtts://"))),
    };
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(bad("no host")),
    };
    if !(url.path().is_empty() || url.path() == "/") || url.query().is_some() {
        return Err(bad("a broker URL has no path or query"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("put credentials in `auth`, not in the URL"));
    }
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    Ok(Endpoint { host, port, tls })
}

/// Well-known CA bundle locations (Debian/Ubuntu/Alpine, Fedora/RHEL,
/// openSUSE, macOS/BSD).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A rustls client config: system roots, plus `ca_file` when given.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    crate::tls::init();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let certs = read_pem_certs(path).map_err(|reason| UpstreamError::Tls {
            phase: "read ca_file",
            reason,
        })?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(UpstreamError::Tls {
                phase: "read ca_file",
                reason: format!("{}: no usable CA certificate", path.display()),
            });
        }
    }
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from))
        .find(|p| p.is_file());
    match system {
        Some(bundle) => match read_pem_certs(&bundle) {
            Ok(certs) => {
                roots.add_parsable_certificates(certs);
            }
            Err(reason) => tracing::warn!(%reason, "cannot read the system CA bundle"),
        },
        None => tracing::warn!("no system CA bundle found; trusting ca_file only"),
    }
    if roots.is_empty() {
        return Err(UpstreamError::Tls {
            phase: "load trust roots",
            reason: "no CA certificates: set ca_file or install the system CA bundle".into(),
        });
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1").unwrap(),
            Endpoint {
                host: "127.0.0.1".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(
            parse_url("mqtts://a1b.iot-as-mqtt.cn-shanghai.aliyuncs.com").unwrap(),
            Endpoint {
                host: "a1b.iot-as-mqtt.cn-shanghai.aliyuncs.com".into(),
                port: 8883,
                tls: true
            }
        );
        assert_eq!(parse_url("mqtts://h:1883/").unwrap().port, 1883);
        for bad in [
            "http://h",
            "mqtt://",
            "mqtt://u:p@h",
            "mqtt://h/x",
            "h:1883",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let e = client_config(Some(&f)).unwrap_err();
        assert!(e.to_string().contains("ca_file"), "{e}");
        assert!(client_config(Some(&dir.path().join("missing.pem"))).is_err());
    }
}
