//! The one harness of otagw's end-to-end tests (CONVENTIONS 12): plugin
//! directories made of real components, hosts built on them, images, and
//! simulated leaves on real pseudo-terminals and TCP ports.
//!
//! Everything a test starts is owned by a value that cleans up when dropped
//! (temporary directories, simulator tasks); ports are ephemeral.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use otagw::plugin::{Limits, PluginHost};
pub use otagw_leaf_sim::transport::{PtySim, TcpSim};
pub use otagw_leaf_sim::xmodem::{Faults, Mode, Protocol, XmodemSimConfig};
pub use otagw_test_artifacts as artifacts;

/// A plugins directory holding copies of the given components.
#[derive(Debug)]
pub struct PluginsDir {
    dir: tempfile::TempDir,
}

impl PluginsDir {
    pub fn with(components: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        for c in components {
            let src = Path::new(c);
            let name = src.file_name().expect("component file name");
            std::fs::copy(src, dir.path().join(name)).expect("copy the component");
        }
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Add a file with arbitrary bytes (a broken plugin).
    pub fn add_raw(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join(name), bytes).expect("write a raw plugin");
    }
}

/// Limits that keep tests quick: a hostile plugin is stopped within about a second.
pub fn test_limits() -> Limits {
    Limits {
        memory: 32 << 20,
        cpu: Duration::from_secs(1),
        job: Duration::from_secs(120),
        max_instances: 32,
    }
}

/// A host with `dir` loaded; panics if any plugin in it is broken.
pub async fn host_with(dir: &PluginsDir, cache: Option<PathBuf>) -> PluginHost {
    let host = PluginHost::new(test_limits(), cache).expect("plugin host");
    let report = host
        .load_dir(dir.path())
        .await
        .expect("read the plugins dir");
    assert!(
        report.failed.is_empty(),
        "broken plugins: {:?}",
        report.failed
    );
    host
}

/// `size` bytes of a deterministic pseudo-random image (xorshift), so a
/// misplaced block never looks right by accident.
pub fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An image with a version marker the simulated firmware boots with.
pub fn versioned_image(size: usize, version: &str) -> Vec<u8> {
    let mut img = image(size, 7);
    let marker = format!("FWVER:{version}\0");
    img[64..64 + marker.len()].copy_from_slice(marker.as_bytes());
    img
}

/// An image as a plugin sees it.
pub fn source(bytes: &[u8]) -> Arc<dyn otagw::plugin::ImageSource> {
    Arc::new(bytes.to_vec())
}

/// Options as `key=value` pairs.
pub fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Assert that what an XMODEM device holds is `image` followed by nothing but
/// the pad byte, up to the next block boundary.
pub fn assert_padded(received: &[u8], image: &[u8], pad: u8) {
    assert!(
        received.len() >= image.len(),
        "device holds {} bytes, image has {}",
        received.len(),
        image.len()
    );
    assert!(
        received[..image.len()] == *image,
        "device content differs from the image"
    );
    let tail = &received[image.len()..];
    assert!(tail.len() < 1024, "{} bytes of padding", tail.len());
    assert!(
        tail.iter().all(|b| *b == pad),
        "padding is not all {pad:#04x}"
    );
}
