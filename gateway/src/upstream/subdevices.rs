//! Gateway and sub-devices (protocol.md "Gateway and sub-devices"), sans-I/O:
//! the `topo/add` and `combine/batch_login` requests a gateway sends before it
//! speaks for its leaves, their inverses (`combine/batch_logout`,
//! `topo/delete`), the reading of their `_reply`s and of what the platform
//! says on its own (`topo/change`, `/ext/error`). The per-leaf state built on
//! them is [`super::presence`].

use serde_json::{Value, json};

use super::SubDevice;
use super::auth;

/// At most this many leaves per `topo/add` request.
pub const TOPO_ADD_BATCH: usize = 30;
/// At most this many leaves per `combine/batch_login` request.
pub const LOGIN_BATCH: usize = 50;

/// At most this many leaves per `combine/batch_logout` or `topo/delete`.
pub const LOGOUT_BATCH: usize = 50;

/// Which sub-device request a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubDeviceRequest {
    /// `/sys/{gwPk}/{gwDn}/thing/topo/add`
    TopoAdd,
    /// `/ext/session/{gwPk}/{gwDn}/combine/batch_login`
    BatchLogin,
    /// `/ext/session/{gwPk}/{gwDn}/combine/batch_logout`
    BatchLogout,
    /// `/sys/{gwPk}/{gwDn}/thing/topo/delete`
    TopoDelete,
}

impl SubDeviceRequest {
    pub const ALL: [SubDeviceRequest; 4] = [
        SubDeviceRequest::TopoAdd,
        SubDeviceRequest::BatchLogin,
        SubDeviceRequest::BatchLogout,
        SubDeviceRequest::TopoDelete,
    ];

    pub fn topic(self, gw_pk: &str, gw_dn: &str) -> String {
        match self {
            SubDeviceRequest::TopoAdd => format!("/sys/{gw_pk}/{gw_dn}/thing/topo/add"),
            SubDeviceRequest::TopoDelete => format!("/sys/{gw_pk}/{gw_dn}/thing/topo/delete"),
            SubDeviceRequest::BatchLogin => {
                format!("/ext/session/{gw_pk}/{gw_dn}/combine/batch_login")
            }
            SubDeviceRequest::BatchLogout => {
                format!("/ext/session/{gw_pk}/{gw_dn}/combine/batch_logout")
            }
        }
    }

    /// The platform takes logins and logouts at QoS 0 only.
    pub fn qos0(self) -> bool {
        matches!(
            self,
            SubDeviceRequest::BatchLogin | SubDeviceRequest::BatchLogout
        )
    }

    /// In words, for logs and the status API.
    pub fn name(self) -> &'static str {
        match self {
            SubDeviceRequest::TopoAdd => "topo/add",
            SubDeviceRequest::BatchLogin => "batch_login",
            SubDeviceRequest::BatchLogout => "batch_logout",
            SubDeviceRequest::TopoDelete => "topo/delete",
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

/// `/sys/{gwPk}/{gwDn}/thing/topo/change`: the console added, removed,
/// enabled or disabled leaves.
pub fn topo_change_topic(gw_pk: &str, gw_dn: &str) -> String {
    format!("/sys/{gw_pk}/{gw_dn}/thing/topo/change")
}

/// `/ext/error/{gwPk}/{gwDn}`: the platform took a leaf offline (deleted,
/// disabled, relation removed, logged in elsewhere) or dropped a message of a
/// leaf without a session.
pub fn ext_error_topic(gw_pk: &str, gw_dn: &str) -> String {
    format!("/ext/error/{gw_pk}/{gw_dn}")
}

/// One `combine/batch_logout` payload per batch of at most [`LOGOUT_BATCH`].
pub fn batch_logout_payloads(leaves: &[(String, String)], first_id: u64) -> Vec<(String, Vec<u8>)> {
    leaves
        .chunks(LOGOUT_BATCH)
        .zip(first_id..)
        .map(|(chunk, id)| {
            let id = id.to_string();
            let body = json!({ "id": id, "params": identities(chunk) });
            (id, body.to_string().into_bytes())
        })
        .collect()
}

/// One `thing/topo/delete` payload per batch of at most [`LOGOUT_BATCH`].
pub fn topo_delete_payloads(leaves: &[(String, String)], first_id: u64) -> Vec<(String, Vec<u8>)> {
    leaves
        .chunks(LOGOUT_BATCH)
        .zip(first_id..)
        .map(|(chunk, id)| {
            let id = id.to_string();
            let body = json!({
                "id": id,
                "version": "1.0",
                "params": identities(chunk),
                "method": "thing.topo.delete",
            });
            (id, body.to_string().into_bytes())
        })
        .collect()
}

fn identities(leaves: &[(String, String)]) -> Vec<Value> {
    leaves
        .iter()
        .map(|(pk, dn)| json!({ "productKey": pk, "deviceName": dn }))
        .collect()
}

/// What a `topo/change` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopoChange {
    pub status: TopoStatus,
    pub leaves: Vec<(String, String)>,
}

/// `params.status` of a `topo/change`. The platform's documents disagree on
/// 2 and 8 (one table says 2 = disable, 8 = enable; its example, the Chinese
/// version and the SDKs say 2 = enabled again, 8 = disabled): we follow the
/// latter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopoStatus {
    Created,
    Deleted,
    Enabled,
    Disabled,
    Other(i64),
}

/// Read a `topo/change`; `None` when it names no leaf.
pub fn parse_topo_change(payload: &[u8]) -> Option<TopoChange> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let params = v.get("params")?;
    let status = match number(params.get("status")?)? {
        0 => TopoStatus::Created,
        1 => TopoStatus::Deleted,
        2 => TopoStatus::Enabled,
        8 => TopoStatus::Disabled,
        n => TopoStatus::Other(n),
    };
    let leaves = devices(params.get("subList")?);
    (!leaves.is_empty()).then_some(TopoChange { status, leaves })
}

fn number(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The `{productKey, deviceName}` pairs of an object or a list of them.
fn devices(v: &Value) -> Vec<(String, String)> {
    let one = |o: &Value| {
        Some((
            o.get("productKey")?.as_str()?.to_owned(),
            o.get("deviceName")?.as_str()?.to_owned(),
        ))
    };
    match v {
        Value::Array(list) => list.iter().filter_map(one).collect(),
        Value::Object(_) => one(v).into_iter().collect(),
        _ => Vec::new(),
    }
}

/// What a `_reply` (or an `/ext/error` notice) said: `code` (200 = success; a
/// number or a numeric string is accepted), `message` when present, `id` of
/// the request, and the leaves its `data` names (on a refusal, the ones it
/// is about, when the platform says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: Option<String>,
    pub code: i64,
    pub message: String,
    pub devices: Vec<(String, String)>,
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
                devices: Vec::new(),
            };
        }
    };
    let id = match v.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let code = v.get("code").and_then(number).unwrap_or(-1);
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
    let devices = v.get("data").map(devices).unwrap_or_default();
    Reply {
        id,
        code,
        message,
        devices,
    }
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
        let r = parse_reply(
            br#"{"id":"4","code":"6287","message":"invalid sign","data":[{"productKey":"p","deviceName":"d"}]}"#,
        );
        assert_eq!(r.code, 6287);
        assert_eq!(r.devices, [("p".to_owned(), "d".to_owned())]);
        let r = parse_reply(br#"{"code":521,"data":{"productKey":"p","deviceName":"e"}}"#);
        assert_eq!(r.devices, [("p".to_owned(), "e".to_owned())]);
    }

    #[test]
    fn topo_change_is_read_with_its_status() {
        let c = parse_topo_change(
            br#"{"id":"1","version":"1.0","params":{"status":1,"subList":[{"productKey":"p","deviceName":"d"}]},"method":"thing.topo.change"}"#,
        )
        .unwrap();
        assert_eq!(c.status, TopoStatus::Deleted);
        assert_eq!(c.leaves, [("p".to_owned(), "d".to_owned())]);
        let c = parse_topo_change(
            br#"{"params":{"status":"8","subList":[{"productKey":"p","deviceName":"d"}]}}"#,
        )
        .unwrap();
        assert_eq!(c.status, TopoStatus::Disabled);
        assert!(parse_topo_change(br#"{"params":{"status":1,"subList":[]}}"#).is_none());
        assert!(parse_topo_change(b"[").is_none());
    }

    #[test]
    fn logout_and_delete_list_identities() {
        let leaves = vec![
            ("p".to_owned(), "a".to_owned()),
            ("p".to_owned(), "b".to_owned()),
        ];
        let (id, body) = &batch_logout_payloads(&leaves, 3)[0];
        assert_eq!(id, "3");
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["params"][1]["deviceName"], "b");
        let (_, body) = &topo_delete_payloads(&leaves, 4)[0];
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["method"], "thing.topo.delete");
        assert_eq!(v["params"][0]["productKey"], "p");
    }
}
