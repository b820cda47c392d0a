//! The MQTT topic scheme of the upstream OTA protocol (`shared/protocol.md`):
//! builders for every topic the gateway publishes or subscribes, and a parser
//! that tells which device a received topic is about.
//!
//! Every topic carries the product key and device name of the device it is
//! about: the gateway's own, or a leaf's (a gateway proxies a leaf by using the
//! leaf's own topics). This module only formats and parses strings; it does not
//! subscribe or publish anything.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The identity of a device on the platform: its product key and device name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId {
    pub product_key: String,
    pub device_name: String,
}

impl DeviceId {
    pub fn new(product_key: impl Into<String>, device_name: impl Into<String>) -> DeviceId {
        DeviceId {
            product_key: product_key.into(),
            device_name: device_name.into(),
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.product_key, self.device_name)
    }
}

/// Which OTA topic a received topic is.
///
/// [`parse`] recognises the two downlink topics the platform sends on and, for
/// the local broker where leaves publish their own reports, the three uplink
/// ones; [`TopicKind::is_downlink`] tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// `/ota/device/upgrade/{pk}/{dn}`: an upgrade notice (down).
    Upgrade,
    /// `/sys/{pk}/{dn}/thing/ota/firmware/get_reply`: the answer to `firmware/get` (down).
    FirmwareGetReply,
    /// `/ota/device/inform/{pk}/{dn}`: a device's current version (up).
    Inform,
    /// `/ota/device/progress/{pk}/{dn}`: progress or failure (up).
    Progress,
    /// `/sys/{pk}/{dn}/thing/ota/firmware/get`: ask for the pending package (up).
    FirmwareGet,
}

impl TopicKind {
    /// True for the topics the platform publishes (the ones to subscribe upstream).
    pub fn is_downlink(self) -> bool {
        matches!(self, TopicKind::Upgrade | TopicKind::FirmwareGetReply)
    }

    /// The topic of this kind for the device `pk`/`dn`.
    pub fn topic(self, pk: &str, dn: &str) -> String {
        match self {
            TopicKind::Upgrade => upgrade(pk, dn),
            TopicKind::FirmwareGetReply => firmware_get_reply(pk, dn),
            TopicKind::Inform => inform(pk, dn),
            TopicKind::Progress => progress(pk, dn),
            TopicKind::FirmwareGet => firmware_get(pk, dn),
        }
    }
}

/// `/ota/device/inform/{pk}/{dn}`: report the current version of one module (up).
pub fn inform(pk: &str, dn: &str) -> String {
    format!("/ota/device/inform/{pk}/{dn}")
}

/// `/ota/device/upgrade/{pk}/{dn}`: upgrade notices (down).
pub fn upgrade(pk: &str, dn: &str) -> String {
    format!("/ota/device/upgrade/{pk}/{dn}")
}

/// `/ota/device/progress/{pk}/{dn}`: progress and failures (up).
pub fn progress(pk: &str, dn: &str) -> String {
    format!("/ota/device/progress/{pk}/{dn}")
}

/// `/sys/{pk}/{dn}/thing/ota/firmware/get`: ask for the pending package (up).
pub fn firmware_get(pk: &str, dn: &str) -> String {
    format!("/sys/{pk}/{dn}/thing/ota/firmware/get")
}

/// `/sys/{pk}/{dn}/thing/ota/firmware/get_reply`: the answer to `firmware/get` (down).
pub fn firmware_get_reply(pk: &str, dn: &str) -> String {
    format!("/sys/{pk}/{dn}/thing/ota/firmware/get_reply")
}

/// `/{gwPk}/{gwDn}/user/ota/summary`: the gateway's own summary of all jobs (up).
pub fn summary(gw_pk: &str, gw_dn: &str) -> String {
    format!("/{gw_pk}/{gw_dn}/user/ota/summary")
}

/// Which OTA topic `topic` is, and the device it is about. `None` for any other
/// topic, and for one whose product key or device name is empty or an MQTT
/// wildcard.
pub fn parse(topic: &str) -> Option<(TopicKind, DeviceId)> {
    let parts: Vec<&str> = topic.split('/').collect();
    let (kind, pk, dn) = match parts.as_slice() {
        ["", "ota", "device", "upgrade", pk, dn] => (TopicKind::Upgrade, *pk, *dn),
        ["", "ota", "device", "inform", pk, dn] => (TopicKind::Inform, *pk, *dn),
        ["", "ota", "device", "progress", pk, dn] => (TopicKind::Progress, *pk, *dn),
        ["", "sys", pk, dn, "thing", "ota", "firmware", "get_reply"] => {
            (TopicKind::FirmwareGetReply, *pk, *dn)
        }
        ["", "sys", pk, dn, "thing", "ota", "firmware", "get"] => {
            (TopicKind::FirmwareGet, *pk, *dn)
        }
        _ => return None,
    };
    let valid = |s: &str| !s.is_empty() && !s.contains(['+', '#']);
    if !valid(pk) || !valid(dn) {
        return None;
    }
    Some((kind, DeviceId::new(pk, dn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [TopicKind; 5] = [
        TopicKind::Upgrade,
        TopicKind::FirmwareGetReply,
        TopicKind::Inform,
        TopicKind::Progress,
        TopicKind::FirmwareGet,
    ];

    #[test]
    fn builders_follow_the_protocol() {
        assert_eq!(inform("a1PK", "leaf-01"), "/ota/device/inform/a1PK/leaf-01");
        assert_eq!(
            upgrade("a1PK", "leaf-01"),
            "/ota/device/upgrade/a1PK/leaf-01"
        );
        assert_eq!(
            progress("a1PK", "leaf-01"),
            "/ota/device/progress/a1PK/leaf-01"
        );
        assert_eq!(
            firmware_get("a1PK", "leaf-01"),
            "/sys/a1PK/leaf-01/thing/ota/firmware/get"
        );
        assert_eq!(
            firmware_get_reply("a1PK", "leaf-01"),
            "/sys/a1PK/leaf-01/thing/ota/firmware/get_reply"
        );
        assert_eq!(summary("a1GwPK", "gw-01"), "/a1GwPK/gw-01/user/ota/summary");
    }

    #[test]
    fn parse_is_the_inverse_of_the_builders() {
        let leaf = DeviceId::new("a1LeafPK", "leaf-01");
        for kind in ALL {
            let topic = kind.topic(&leaf.product_key, &leaf.device_name);
            assert_eq!(parse(&topic), Some((kind, leaf.clone())), "{topic}");
        }
        assert!(TopicKind::Upgrade.is_downlink());
        assert!(TopicKind::FirmwareGetReply.is_downlink());
        assert!(!TopicKind::Inform.is_downlink());
    }

    #[test]
    fn parse_rejects_other_topics() {
        for topic in [
            "",
            "/",
            "/ota/device/upgrade/pk",
            "/ota/device/upgrade/pk/dn/extra",
            "ota/device/upgrade/pk/dn",
            "/ota/device/upgrade//dn",
            "/ota/device/upgrade/pk/",
            "/ota/device/upgrade/+/dn",
            "/ota/device/upgrade/pk/#",
            "/sys/pk/dn/thing/ota/firmware/get_replyx",
            "/sys/pk/dn/thing/event/property/post",
            "/a1GwPK/gw-01/user/ota/summary",
        ] {
            assert_eq!(parse(topic), None, "{topic:?}");
        }
    }

    #[test]
    fn device_id_displays_as_pk_slash_dn_and_round_trips_through_serde() {
        let id = DeviceId::new("a1PK", "dn");
        assert_eq!(id.to_string(), "a1PK/dn");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, r#"{"product_key":"a1PK","device_name":"dn"}"#);
        assert_eq!(serde_json::from_str::<DeviceId>(&json).unwrap(), id);
    }
}
