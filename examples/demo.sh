#!/usr/bin/env bash
# The otagw demo, on a fresh machine: build the gateway, the xmodem plugin,
# the leaf simulator and the demo driver; then run a standalone gateway that
# upgrades three simulated leaves (XMODEM bootloaders behind pseudo-terminals)
# from 1.0.0 to 2.0.0, served over local HTTP, with live progress, then rolls
# 2.1.0 out with `otagw upgrade --canary 1 --follow`. Exits non-zero unless
# every leaf ends up reporting 2.0.0 and then running 2.1.0.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 >/dev/null
echo "== building (the first build compiles wasmtime: several minutes on 2 cores)"
cargo build --quiet -p otagw -p otagw-leaf-sim -p otagw-demo
cargo build --quiet --release --target wasm32-wasip2 -p otagw-plugin-xmodem

exec target/debug/otagw-demo target/wasm32-wasip2/release/otagw_plugin_xmodem.wasm
