//! The leaf registry: every configured leaf (identity, module, family, link,
//! options) and the last version known for it, persisted in the `devices` tree
//! so a restart reports what the leaf really runs, not the configured version.

use crate::config::DeviceConfig;
use crate::link::LinkUrl;
use crate::ota::topics::DeviceId;
use crate::store::{Store, StoreError};

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
}

impl Leaf {
    /// What identifies the physical link: two leaves on one RS-485 bus or one
    /// serial port never run jobs at the same time.
    pub fn link_key(&self) -> String {
        match LinkUrl::parse(&self.link) {
            Ok(LinkUrl::Serial { path, .. }) => format!("serial:{path}"),
            Ok(LinkUrl::Tcp { host, port }) => format!("tcp:{host}:{port}"),
            Err(_) => self.link.clone(),
        }
    }
}

/// The registry.
#[derive(Debug, Clone)]
pub struct Devices {
    leaves: Vec<Leaf>,
    versions: sled::Tree,
}

const TREE: &str = "devices";

fn key(id: &DeviceId, module: &str) -> Vec<u8> {
    format!("{}\0{}\0{}", id.product_key, id.device_name, module).into_bytes()
}

impl Devices {
    pub fn new(config: &[DeviceConfig], store: &Store) -> Result<Devices, StoreError> {
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
            })
            .collect();
        Ok(Devices {
            leaves,
            versions: store.tree(TREE)?,
        })
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

    /// The last version read back from the leaf, or the configured one.
    pub fn version(&self, leaf: &Leaf) -> String {
        match self.versions.get(key(&leaf.id, &leaf.module)) {
            Ok(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
            Ok(None) => leaf.configured_version.clone(),
            Err(e) => {
                tracing::warn!(leaf = %leaf.id, "cannot read the stored version ({e}); using the configured one");
                leaf.configured_version.clone()
            }
        }
    }

    /// Remember the version a leaf reported (durably).
    pub async fn set_version(&self, leaf: &Leaf, version: &str) -> Result<(), StoreError> {
        let tree = |source| StoreError::Tree { tree: TREE, source };
        self.versions
            .insert(key(&leaf.id, &leaf.module), version.as_bytes())
            .map_err(tree)?;
        crate::store::flush_tree(&self.versions)
            .await
            .map_err(tree)?;
        Ok(())
    }
}
