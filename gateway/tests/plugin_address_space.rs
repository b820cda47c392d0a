//! The plugin host's engine reserves address space for its instance pool.
//! wasmtime's default, 4 GiB per linear-memory slot (no bounds checks in plugin
//! code), makes a gateway configured for 256 jobs at once (512 instances, 1024
//! memory slots) reserve ~4 TiB: fine on x86-64, impossible on an arm64 kernel
//! with 39-bit addresses (512 GiB in all). There the host must fall back to
//! reserving only the memory limit per slot, and plugins must still run.
//!
//! The small address space is made real with `prlimit --as` (util-linux) on a
//! child process: this test binary again, running the `child` test. Its own
//! test binary, so no other test's engines are counted in `VmSize`.

// The 64-bit pool checks below are compiled out on 32-bit targets.
#![cfg_attr(target_pointer_width = "32", allow(dead_code, unused_imports))]

use std::process::Command;

use otagw::plugin::{Limits, PluginHost};

/// The address space of an arm64 kernel with 39-bit virtual addresses.
const SMALL_ADDRESS_SPACE: u64 = 512 << 30;
const CHILD: &str = "OTAGW_ADDRESS_SPACE_CHILD";

/// What `[jobs] max_parallel = 256` configures (see config.rs).
fn limits_for_256_jobs() -> Limits {
    Limits {
        max_instances: 512,
        ..Limits::default()
    }
}

/// `VmSize` of this process, in bytes.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/self/status");
    kib * 1024
}

#[cfg(target_pointer_width = "64")]
#[test]
fn a_pool_for_256_jobs_fits_a_39_bit_address_space() {
    let out = Command::new("prlimit")
        .arg(format!("--as={SMALL_ADDRESS_SPACE}"))
        .arg(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("run prlimit (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the child test did not run:\n{text}"
    );
}

/// Run by the test above under `prlimit --as=512GiB`; passes trivially when
/// run directly.
#[cfg(target_pointer_width = "64")]
#[tokio::test]
async fn child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let before = vm_size();
    let host = PluginHost::new(limits_for_256_jobs(), None).expect("the engine is created");
    let grown = vm_size().saturating_sub(before);
    eprintln!("the plugin host reserved {} GiB", grown >> 30);
    assert!(
        host.compact_address_space(),
        "the default reservation cannot fit in 512 GiB"
    );
    assert!(
        grown < SMALL_ADDRESS_SPACE / 2,
        "reserved {} GiB",
        grown >> 30
    );
    // Plugin code runs in the compact pool (loading calls `describe`), and a
    // job's session starts.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(otagw_test_artifacts::XMODEM, dir.path().join("xmodem.wasm"))
        .expect("copy the xmodem plugin");
    let report = host.load_dir(dir.path()).await.expect("load the plugins");
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.loaded.len(), 1);
    drop(host.session("xmodem", None).await.expect("a session"));
}

/// Where the address space allows it (every x86-64 Linux: 128 TiB), the host
/// keeps wasmtime's default: plugin code without bounds checks.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_roomy_address_space_keeps_the_fast_default() {
    let host = PluginHost::new(limits_for_256_jobs(), None).expect("the engine is created");
    assert!(!host.compact_address_space());
}

/// A 32-bit gateway (armv7: 3 GiB of address space) holds no pool at all:
/// a pool for 256 jobs would reserve 512 x 2 slots of the 64 MiB memory
/// limit. There the host maps each instance's memory when it starts, and a
/// gateway configured for 256 jobs starts and runs plugins (under qemu-arm,
/// whose guest has exactly 4 GiB: packaging/qemu-test.sh armhf).
#[cfg(target_pointer_width = "32")]
#[tokio::test]
async fn a_host_for_256_jobs_fits_a_32_bit_address_space() {
    let host = PluginHost::new(limits_for_256_jobs(), None).expect("the engine is created");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(otagw_test_artifacts::XMODEM, dir.path().join("xmodem.wasm"))
        .expect("copy the xmodem plugin");
    let report = host.load_dir(dir.path()).await.expect("load the plugins");
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // Sessions at once, each with its own memory.
    let mut sessions = Vec::new();
    for _ in 0..16 {
        sessions.push(host.session("xmodem", None).await.expect("a session"));
    }
}
