#!/usr/bin/env bash
# Build what ships to a gateway: the otagw binary for one architecture
# (the `gateway` profile: fat LTO, stripped, panics unwind) and the three
# device-family plugins (WebAssembly: the same files for every architecture).
#
#   packaging/build.sh amd64|arm64|armhf
#
# Cross builds need Debian's cross compilers (gcc-aarch64-linux-gnu,
# gcc-arm-linux-gnueabihf; `apt-get install` them) and the Rust targets
# (this script adds them with rustup). armhf runs plugins on wasmtime's
# Pulley interpreter: Cranelift has no 32-bit ARM backend.
# The last two lines of output: the binary, then the plugins' directory.
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/arch.sh "${1:-}"

rustup target add "$target" wasm32-wasip2 >/dev/null 2>&1 || true
if ! command -v "$cc" >/dev/null; then
    echo "error: $cc not found: apt-get install $cc_package" >&2
    exit 69
fi

cargo build --locked --profile gateway --target "$target" -p otagw
cargo build --locked --release --target wasm32-wasip2 \
    --target-dir target/wasm-plugins/package \
    -p otagw-plugin-xmodem -p otagw-plugin-smp -p otagw-plugin-stm32

echo "target/$target/gateway/otagw"
echo "target/wasm-plugins/package/wasm32-wasip2/release"
