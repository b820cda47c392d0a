//! TLS setup shared by the HTTP downloader and the MQTT upstream: rustls with
//! the `ring` provider (no C toolchain needed), installed once per process.

/// Install ring as the process's default rustls crypto provider. Idempotent;
/// call before building any HTTP client or TLS connection.
pub fn init() {
    // Fails only when a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
