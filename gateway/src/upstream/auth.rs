//! Alibaba Cloud IoT ("aliyun") device signing: the MQTT CONNECT credentials of
//! the gateway and the `sign` of each sub-device in `topo/add` and
//! `combine/batch_login` (protocol.md, "Connecting to the platform" and
//! "Gateway and sub-devices"). Pure functions, no I/O.
//!
//! Only `hmacsha256` is implemented; the platform also allows `hmacsha1` and
//! `hmacmd5`, which we never send.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The three fields of an MQTT CONNECT for an aliyun device.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectCredentials {
    /// `{id}|securemode=2,signmethod=hmacsha256,timestamp={ms}|`
    pub client_id: String,
    /// `{deviceName}&{productKey}`
    pub username: String,
    /// lowercase hex HMAC-SHA256 of the sorted key/value string.
    pub password: String,
}

impl std::fmt::Debug for ConnectCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is a short-lived token, but keep it out of logs anyway.
        f.debug_struct("ConnectCredentials")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The string the platform signs: the parameters `clientId`, `deviceName`,
/// `productKey`, `timestamp` sorted by key, each key followed by its value.
pub fn content_to_sign(
    client_id: &str,
    device_name: &str,
    product_key: &str,
    ts_ms: u64,
) -> String {
    format!("clientId{client_id}deviceName{device_name}productKey{product_key}timestamp{ts_ms}")
}

/// Lowercase hex HMAC-SHA256(secret, [`content_to_sign`]). The same signature
/// serves the gateway's CONNECT password and each sub-device's `sign`.
pub fn sign(
    secret: &str,
    client_id: &str,
    device_name: &str,
    product_key: &str,
    ts_ms: u64,
) -> String {
    hmac_sha256_hex(
        secret.as_bytes(),
        content_to_sign(client_id, device_name, product_key, ts_ms).as_bytes(),
    )
}

fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail here.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// CONNECT credentials of a device. `tls` picks `securemode=2` (TLS) or
/// `securemode=3` (plain TCP).
pub fn connect_credentials(
    product_key: &str,
    device_name: &str,
    device_secret: &str,
    id: &str,
    ts_ms: u64,
    tls: bool,
) -> ConnectCredentials {
    let securemode = if tls { 2 } else { 3 };
    ConnectCredentials {
        client_id: format!("{id}|securemode={securemode},signmethod=hmacsha256,timestamp={ts_ms}|"),
        username: format!("{device_name}&{product_key}"),
        password: sign(device_secret, id, device_name, product_key, ts_ms),
    }
}

/// Milliseconds since the Unix epoch, the `timestamp` every signature carries.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The platform's worked example of a CONNECT signature (Alibaba Cloud IoT
    // "MQTT-based device connection" docs, https://help.aliyun.com/document_detail/73742.html,
    // reproduced with its inputs and outputs at https://553668.com/manong/261125.html and
    // http://kerwin.cn/dl/74): productKey a14Xib5kdYd, deviceName light1983432,
    // deviceSecret oLyaKqVxtRvjH284LdhqVgVUx1UPy6zq, clientId SN1928339,
    // timestamp 1539421321846, signmethod hmacsha1:
    //   content      = clientIdSN1928339deviceNamelight1983432productKeya14Xib5kdYdtimestamp1539421321846
    //   mqttPassword = b2488041f64f425016b467ee1c94959ebd592ad1 (HMAC-SHA1)
    // We sign with HMAC-SHA256, for which the docs give no worked value. The
    // expected value below was computed independently with Python's standard
    // library, after checking that the same call with hashlib.sha1 reproduces the
    // documented b2488041…ad1:
    //   python3 -c "import hmac,hashlib; print(hmac.new(b'oLyaKqVxtRvjH284LdhqVgVUx1UPy6zq',
    //     b'clientIdSN1928339deviceNamelight1983432productKeya14Xib5kdYdtimestamp1539421321846',
    //     hashlib.sha256).hexdigest())"
    const PK: &str = "a14Xib5kdYd";
    const DN: &str = "light1983432";
    const SECRET: &str = "oLyaKqVxtRvjH284LdhqVgVUx1UPy6zq";
    const ID: &str = "SN1928339";
    const TS: u64 = 1539421321846;
    const DOC_CONTENT: &str =
        "clientIdSN1928339deviceNamelight1983432productKeya14Xib5kdYdtimestamp1539421321846";
    const PY_HMAC_SHA256: &str = "e6ad631b665206c0bf2efbe1b48ac4d84ff2a61fe89bac30065e17975a482c40";

    #[test]
    fn the_signed_content_is_the_documented_one() {
        assert_eq!(content_to_sign(ID, DN, PK, TS), DOC_CONTENT);
    }

    #[test]
    fn the_signature_matches_an_independent_hmac_sha256() {
        assert_eq!(sign(SECRET, ID, DN, PK, TS), PY_HMAC_SHA256);
    }

    #[test]
    fn connect_credentials_follow_the_platform_format() {
        let plain = connect_credentials(PK, DN, SECRET, ID, TS, false);
        assert_eq!(
            plain.client_id,
            "SN1928339|securemode=3,signmethod=hmacsha256,timestamp=1539421321846|"
        );
        assert_eq!(plain.username, "light1983432&a14Xib5kdYd");
        assert_eq!(plain.password, PY_HMAC_SHA256);
        let tls = connect_credentials(PK, DN, SECRET, ID, TS, true);
        assert_eq!(
            tls.client_id,
            "SN1928339|securemode=2,signmethod=hmacsha256,timestamp=1539421321846|"
        );
        assert_eq!(tls.password, plain.password, "securemode is not signed");
        assert!(
            !format!("{tls:?}").contains(PY_HMAC_SHA256),
            "no password in Debug"
        );
    }

    #[test]
    fn rfc4231_case_2() {
        // RFC 4231 test case 2 ("Jefe"), a check of the HMAC itself.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
