//! Gateway and sub-devices (protocol.md "Gateway and sub-devices"), sans-I/O:
//! the `topo/add` and `combine/batch_login` requests a gateway sends before it
//! speaks for its leaves, and the reading of their `_reply`s.

use serde_json::{Value, json};

use super::SubDevice;
use super::auth;

/// At most this many leaves per `topo/add` request.
pub const TOPO_ADD_BATCH: usize = 30;
/// At most this many leaves per `combine/batch_login` request.
pub const LOGIN_BATCH: usize = 50;

/// Which sub-device request a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubDeviceRequest {
    /// `/sys/{gwPk}/{gwDn}/thing/topo/add`
    TopoAdd,
    /// `/ext/session/{gwPk}/{gwDn}/combine/batch_login`
    BatchLogin,
}

impl SubDeviceRequest {
    pub fn topic(self, gw_pk: &str, gw_dn: &str) -> String {
        match self {
            SubDeviceRequest::TopoAdd => format!("/sys/{gw_pk}/{gw_dn}/thing/topo/add"),
            SubDeviceRequest::BatchLogin => {
                format!("/ext/session/{gw_pk}/{gw_dn}/combine/batch_login")
            }
        }
    }

    pub fn reply_topic(self, gw_pk: &str, gw_dn: &str) -> String {
        format!("{}_reply", self.topic(gw_pk, gw_dn))
    }
}

/// A leaf with the secret signing needs.
#[derive(Debug, Clone)]
pub struct SignedLeaf<'a> {
    pub product_key: &'a str,
    pub device_name: &'a str,
    pub device_secret: &'a str,
}

impl<'a> SignedLeaf<'a> {
    /// `None` when the leaf has no secret.
    pub fn of(d: &'a SubDevice) -> Option<SignedLeaf<'a>> {
        Some(SignedLeaf {
            product_key: &d.product_key,
            device_name: &d.device_name,
            device_secret: d.device_secret.as_deref()?,
        })
    }

    /// The clientId a leaf is signed with: `{pk}.{dn}`, the convention of the
    /// platform's SDKs.
    pub fn client_id(&self) -> String {
        format!("{}.{}", self.product_key, self.device_name)
    }
}

/// A leaf's signed identity, as both `topo/add` and `batch_login` list it,
/// plus the one field in which the two differ.
fn signed_entry(l: &SignedLeaf<'_>, ts_ms: u64, extra: (&str, &str)) -> Value {
    let cid = l.client_id();
    let mut entry = json!({
        "productKey": l.product_key,
        "deviceName": l.device_name,
        "clientId": cid,
        "timestamp": ts_ms.to_string(),
        "sign": auth::sign(l.device_secret, &cid, l.device_name, l.product_key, ts_ms),
    });
    entry[extra.0] = Value::from(extra.1);
    entry
}

/// One `topo/add` payload per batch of at most [`TOPO_ADD_BATCH`] leaves.
/// `first_id` numbers the requests (`id` is a decimal string).
pub fn topo_add_payloads(
    leaves: &[SignedLeaf<'_>],
    ts_ms: u64,
    first_id: u64,
) -> Vec<(String, Vec<u8>)> {
    leaves
        .chunks(TOPO_ADD_BATCH)
        .zip(first_id..)
        .map(|(chunk, id)| {
            let params: Vec<Value> = chunk
                .iter()
                .map(|l| signed_entry(l, ts_ms, ("signmethod", "hmacSha256")))
                .collect();
            let id = id.to_string();
            let body = json!({
                "id": id,
                "version": "1.0",
                "params": params,
                "method": "thing.topo.add",
            });
            (id, body.to_string().into_bytes())
        })
        .collect()
}

/// One `combine/batch_login` payload per batch of at most [`LOGIN_BATCH`] leaves.
pub fn batch_login_payloads(
    leaves: &[SignedLeaf<'_>],
    ts_ms: u64,
    first_id: u64,
) -> Vec<(String, Vec<u8>)> {
    leaves
        .chunks(LOGIN_BATCH)
        .zip(first_id..)
        .map(|(chunk, id)| {
            let list: Vec<Value> = chunk
                .iter()
                .map(|l| signed_entry(l, ts_ms, ("cleanSession", "true")))
                .collect();
            let id = id.to_string();
            let body = json!({
                "id": id,
                "params": { "signMethod": "hmacSha256", "deviceList": list },
            });
            (id, body.to_string().into_bytes())
        })
        .collect()
}

/// What a `_reply` said: `code` (200 = success; a number or a numeric string
/// is accepted), `message` when present, `id` of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: Option<String>,
    pub code: i64,
    pub message: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        self.code == 200
    }
}

/// Lenient parse of a reply; an unreadable one becomes code -1 with the reason.
pub fn parse_reply(payload: &[u8]) -> Reply {
    let v: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            return Reply {
                id: None,
                code: -1,
                message: format!("unreadable reply: {e}"),
            };
        }
    };
    let id = match v.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let code = match v.get("code") {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(-1),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(-1),
        _ => -1,
    };
    let message = v
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if code == -1 {
                "reply without a code".into()
            } else {
                String::new()
            }
        });
    Reply { id, code, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<SubDevice> {
        (0..n)
            .map(|i| SubDevice {
                product_key: "a1Leaf".into(),
                device_name: format!("leaf-{i}"),
                device_secret: Some(format!("secret-{i}")),
            })
            .collect()
    }

    #[test]
    fn topo_add_is_batched_by_30_and_signed_per_leaf() {
        let devs = leaves(31);
        let signed: Vec<_> = devs.iter().filter_map(SignedLeaf::of).collect();
        let p = topo_add_payloads(&signed, 1_700_000_000_000, 7);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, "7");
        let v: Value = serde_json::from_slice(&p[0].1).unwrap();
        assert_eq!(v["method"], "thing.topo.add");
        assert_eq!(v["params"].as_array().unwrap().len(), 30);
        let first = &v["params"][0];
        assert_eq!(first["clientId"], "a1Leaf.leaf-0");
        assert_eq!(first["timestamp"], "1700000000000");
        assert_eq!(first["signmethod"], "hmacSha256");
        assert_eq!(
            first["sign"],
            auth::sign(
                "secret-0",
                "a1Leaf.leaf-0",
                "leaf-0",
                "a1Leaf",
                1_700_000_000_000
            )
        );
        let v: Value = serde_json::from_slice(&p[1].1).unwrap();
        assert_eq!(v["id"], "8");
        assert_eq!(v["params"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn batch_login_is_batched_by_50() {
        let devs = leaves(101);
        let signed: Vec<_> = devs.iter().filter_map(SignedLeaf::of).collect();
        let p = batch_login_payloads(&signed, 5, 1);
        assert_eq!(p.len(), 3);
        let v: Value = serde_json::from_slice(&p[0].1).unwrap();
        assert_eq!(v["params"]["signMethod"], "hmacSha256");
        let list = v["params"]["deviceList"].as_array().unwrap();
        assert_eq!(list.len(), 50);
        assert_eq!(list[0]["cleanSession"], "true");
        assert_eq!(list[0]["timestamp"], "5");
    }

    #[test]
    fn replies_are_read_leniently() {
        assert!(parse_reply(br#"{"id":"1","code":200,"data":[]}"#).is_ok());
        assert!(parse_reply(br#"{"id":2,"code":"200"}"#).is_ok());
        let r =
            parse_reply(br#"{"id":"3","code":6402,"message":"topo relation cannot add by self"}"#);
        assert_eq!(r.code, 6402);
        assert_eq!(r.id.as_deref(), Some("3"));
        assert!(!r.is_ok());
        assert_eq!(parse_reply(b"nope").code, -1);
    }
}
