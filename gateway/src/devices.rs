//! The leaf registry: every configured leaf (identity, module, family, link,
//! options). The version a leaf last reported lives in the job journal
//! (`ota::journal`), written together with the job that learnt it.

use crate::config::DeviceConfig;
use crate::link::LinkUrl;
use crate::ota::topics::DeviceId;

/// One configured leaf (one firmware module of one device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub id: DeviceId,
    pub module: String,
    pub family: String,
    pub link: String,
    pub options: Vec<(String, String)>,
    pub device_secret: Option<String>,
    pub configured_version: String,
    /// `[[device]] tags`, for selecting it in a rollout.
    pub tags: Vec<String>,
    /// The bus it shares with others ([`bus_of`]).
    pub bus: String,
}

/// The bus every `ble://` leaf shares: the adapter, `[ble] max_connections`
/// links at once.
pub const BLE_BUS: &str = "ble";

/// The bus of a leaf on `link`: its `[[device]] bus`, the BLE adapter's, or
/// its physical link alone.
pub fn bus_of(link: &str, bus: Option<&str>) -> String {
    match bus {
        Some(b) => b.to_string(),
        None if link.starts_with("ble://") => BLE_BUS.to_string(),
        None => link_key(link),
    }
}

/// What identifies a physical link: leaves on one serial port (RS-485
/// multidrop behind one adapter) never run jobs at the same time.
pub fn link_key(link: &str) -> String {
    match LinkUrl::parse(link) {
        Ok(LinkUrl::Serial { path, .. }) => format!("serial:{path}"),
        Ok(LinkUrl::Tcp { host, port }) => format!("tcp:{host}:{port}"),
        Err(_) => link.to_string(),
    }
}

impl Leaf {
    /// What identifies the physical link: two leaves on one RS-485 bus or one
    /// serial port never run jobs at the same time.
    pub fn link_key(&self) -> String {
        link_key(&self.link)
    }
}

/// The registry.
#[derive(Debug, Clone)]
pub struct Devices {
    leaves: Vec<Leaf>,
}

impl Devices {
    pub fn new(config: &[DeviceConfig]) -> Devices {
        let leaves = config
            .iter()
            .map(|d| Leaf {
                id: DeviceId::new(&d.product_key, &d.device_name),
                module: d.module.clone(),
                family: d.family.clone(),
                link: d.link.clone(),
                options: d.options_vec(),
                device_secret: d.device_secret.clone(),
                configured_version: d.version.clone(),
                tags: d.tags.clone(),
                bus: bus_of(&d.link, d.bus.as_deref()),
            })
            .collect();
        Devices { leaves }
    }

    pub fn all(&self) -> &[Leaf] {
        &self.leaves
    }

    /// The leaf for a device and module.
    pub fn find(&self, id: &DeviceId, module: &str) -> Option<&Leaf> {
        self.leaves
            .iter()
            .find(|l| &l.id == id && l.module == module)
    }

    /// Whether any module of this device is configured.
    pub fn knows(&self, id: &DeviceId) -> bool {
        self.leaves.iter().any(|l| &l.id == id)
    }

    /// The distinct devices (a device with two modules appears once).
    pub fn ids(&self) -> Vec<DeviceId> {
        let mut ids: Vec<DeviceId> = self.leaves.iter().map(|l| l.id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_is_on_its_named_bus_the_ble_adapter_or_its_port() {
        assert_eq!(
            bus_of("serial:///dev/ttyS1?baud=9600", Some("rs485-1")),
            "rs485-1"
        );
        assert_eq!(bus_of("ble://AA:BB:CC:DD:EE:FF", None), BLE_BUS);
        // Two devices on one port (told apart by an address option) are
        // one bus, whatever their line settings say.
        assert_eq!(
            bus_of("serial:///dev/ttyS1?baud=9600", None),
            bus_of("serial:///dev/ttyS1?baud=115200", None)
        );
        assert_eq!(bus_of("tcp://10.0.0.5:4001", None), "tcp:10.0.0.5:4001");
    }
}
