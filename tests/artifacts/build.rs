//! Build every plugin the tests use as a real WebAssembly component, the way
//! wasmtime builds its test programs: run cargo for `wasm32-wasip2` into a
//! target directory of its own and export the paths as constants. So `cargo
//! build` never touches wasm and `cargo test` always tests current plugins.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (constant name, package, artifact file stem)
const PLUGINS: &[(&str, &str)] = &[
    ("XMODEM", "otagw-plugin-xmodem"),
    ("SMP", "otagw-plugin-smp"),
    ("STM32", "otagw-plugin-stm32"),
    ("HOSTILE", "otagw-test-plugin-hostile"),
    ("FS_IMPORT", "otagw-test-plugin-fs-import"),
    ("FUTURE_CONTRACT", "otagw-test-plugin-future-contract"),
    ("GATT_PROBE", "otagw-test-plugin-gatt-probe"),
    ("LEGACY_V01", "otagw-test-plugin-legacy-v01"),
    ("XMODEM_NEXT", "otagw-test-plugin-xmodem-next"),
    ("XMODEM_TRAP", "otagw-test-plugin-xmodem-trap"),
];

/// Packages built by a cargo run of their own, into a target directory of
/// their own: they reuse a family crate's protocol code without its export
/// (`default-features = false`). In one run with that family's plugin cargo
/// would build the crate once, with the union of the features (its export
/// included); in a run of their own in the same directory, the family's
/// component built as their dependency would replace the family's plugin.
/// Each group is one cargo run in a directory of its own.
const ON_THEIR_OWN: &[&[&str]] = &[
    &["otagw-test-plugin-legacy-v01"],
    &[
        "otagw-test-plugin-xmodem-next",
        "otagw-test-plugin-xmodem-trap",
    ],
];

/// The group of `pkg` among [`ON_THEIR_OWN`], if any.
fn group_of(pkg: &str) -> Option<&'static [&'static str]> {
    ON_THEIR_OWN.iter().copied().find(|g| g.contains(&pkg))
}

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest
        .join("../..")
        .canonicalize()
        .expect("workspace root");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-plugins");

    for dir in ["wit", "plugins", "tests/plugins"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    let together: Vec<&str> = PLUGINS
        .iter()
        .map(|(_, pkg)| *pkg)
        .filter(|pkg| group_of(pkg).is_none())
        .collect();
    build(&root, &target_dir, &together);
    for group in ON_THEIR_OWN {
        build(&root, &dir_of(&target_dir, group[0]), group);
    }

    let mut consts = String::new();
    for (name, pkg) in PLUGINS {
        let file = dir_of(&target_dir, pkg)
            .join("wasm32-wasip2/release")
            .join(format!("{}.wasm", pkg.replace('-', "_")));
        assert!(file.is_file(), "{} was not built", file.display());
        consts.push_str(&format!(
            "/// The `{pkg}` component.\npub const {name}: &str = {:?};\n",
            file.display().to_string()
        ));
    }
    std::fs::write(out.join("artifacts.rs"), consts).expect("write artifacts.rs");
}

/// The target directory `pkg` is built in.
fn dir_of(target_dir: &Path, pkg: &str) -> PathBuf {
    if let Some(group) = group_of(pkg) {
        target_dir.join(group[0])
    } else {
        target_dir.to_path_buf()
    }
}

/// `cargo build --release --target wasm32-wasip2` of `packages`.
fn build(root: &Path, target_dir: &Path, packages: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(target_dir)
        // Flags meant for the host build must not leak into the wasm build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_PROFILE_RELEASE_DEBUG");
    for pkg in packages {
        cmd.args(["-p", pkg]);
    }
    let status = cmd.status().expect("run cargo to build the wasm plugins");
    assert!(
        status.success(),
        "building the plugins for wasm32-wasip2 failed; is the target installed? (rustup target add wasm32-wasip2)"
    );
}
