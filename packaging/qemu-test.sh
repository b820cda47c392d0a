#!/usr/bin/env bash
# Run the tests that matter for a foreign architecture on this machine,
# under qemu-user:
#
#   packaging/qemu-test.sh arm64|armhf
#
# - the plugin host's own tests (engine choice, compile cache, limits);
# - the plugin-host end-to-end tests: hostile plugins stopped by the CPU and
#   memory limits and the job deadline beside a real XMODEM job over a pty,
#   broken plugins refused, the compile cache, engines kept apart;
# - one 1 MiB XMODEM flash end to end through a pseudo-terminal;
# - the address-space test (arm64: a pool for 256 jobs in a 39-bit address
#   space; armhf: a host for 256 jobs in 32 bits).
# On armhf every plugin runs on the Pulley interpreter.
#
# Needs qemu-user (Debian's qemu-user and qemu-user-binfmt) besides what
# build.sh needs. Test programs start other programs of their architecture
# (the address-space test re-runs itself under prlimit), so qemu is
# registered with binfmt_misc when it is not (this needs root).
# Takes 20-40 minutes per architecture on 2 cores; not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/arch.sh "${1:-}"
if [ -z "$qemu" ]; then
    echo "$1 is this machine's architecture: run cargo test" >&2
    exit 64
fi
command -v "$qemu" >/dev/null || { echo "error: $qemu not found: apt-get install qemu-user qemu-user-binfmt" >&2; exit 69; }
[ -d "$sysroot" ] || { echo "error: $sysroot not found: apt-get install $cc_package" >&2; exit 69; }

binfmt=/proc/sys/fs/binfmt_misc
name=$(basename "$qemu")
if [ ! -e "$binfmt/$name" ]; then
    [ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt"
    cat "/usr/lib/binfmt.d/$name.conf" > "$binfmt/register"
fi
rustup target add "$target" wasm32-wasip2 >/dev/null 2>&1 || true

# The dynamic loader and libc of the target, for qemu (runner and binfmt).
export QEMU_LD_PREFIX="$sysroot"
runner_var="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_RUNNER"
export "$runner_var=$qemu -L $sysroot"

echo "== $target: the plugin host's unit tests" >&2
cargo test --locked --target "$target" -p otagw --lib -- plugin:: config::tests::the_plugin_engine
echo "== $target: the address space" >&2
cargo test --locked --target "$target" -p otagw --test plugin_address_space
echo "== $target: hostile plugins, the compile cache, one flash over a pty" >&2
cargo test --locked --target "$target" -p otagw-e2e --test e2e -- \
    plugin_host:: xmodem::one_mebibyte_over_a_pty_arrives_intact
echo "== $target: passed" >&2
