#!/usr/bin/env bash
# The otagw demo, on a fresh machine: build the gateway, the xmodem plugin and
# the leaf simulator; start a simulated leaf (an XMODEM bootloader behind a
# pseudo-terminal, running firmware 1.0.0); flash firmware 2.0.0 onto it with
# `otagw flash`, as a technician would; read the new version back. Exits
# non-zero unless the leaf ends up running 2.0.0 with exactly the image.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 >/dev/null
echo "== building (the first build compiles wasmtime: several minutes on 2 cores)"
cargo build --quiet -p otagw -p otagw-leaf-sim
cargo build --quiet --release --target wasm32-wasip2 -p otagw-plugin-xmodem

work=$(mktemp -d)
sim_pid=
cleanup() {
    [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/plugins"
cp target/wasm32-wasip2/release/otagw_plugin_xmodem.wasm "$work/plugins/"
export OTAGW_PLUGINS_DIR="$work/plugins" OTAGW_CACHE_DIR="$work/compiled"

# A 256 KiB firmware image that announces its version to the simulated leaf.
head -c 262144 /dev/urandom > "$work/fw.bin"
printf 'FWVER:2.0.0\0' | dd of="$work/fw.bin" bs=1 seek=64 conv=notrunc status=none

echo "== starting a simulated leaf on a pseudo-terminal"
mkfifo "$work/sim.out"
target/debug/leaf-sim xmodem --pty --protocol ymodem --version 1.0.0 \
    --enter-command 'update\r' --version-command 'version\r' \
    --out "$work/received.bin" > "$work/sim.out" &
sim_pid=$!
exec 3< "$work/sim.out"
read -r -t 30 -u 3 line || { echo "the simulator did not start"; exit 1; }
pty=${line#pty: }
echo "   leaf on $pty"
link="serial://$pty?baud=115200"
opts=(-o protocol=ymodem -o 'enter_command=update\r' -o 'version_command=version\r')

echo "== otagw identify (before)"
target/debug/otagw identify --family xmodem --link "$link" "${opts[@]}"
echo "== otagw flash"
target/debug/otagw flash --family xmodem --link "$link" --image "$work/fw.bin" --version 2.0.0 "${opts[@]}"
echo "== otagw identify (after)"
after=$(target/debug/otagw identify --family xmodem --link "$link" "${opts[@]}")
echo "$after"

[ "$after" = "version 2.0.0" ] || { echo "FAIL: the leaf runs '$after', not 2.0.0"; exit 1; }
cmp "$work/fw.bin" "$work/received.bin" || { echo "FAIL: the leaf holds other bytes than the image"; exit 1; }
echo "== OK: the leaf runs 2.0.0 and holds exactly the image"
