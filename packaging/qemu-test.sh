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
# qemu-user must implement the termios2 ioctls (TCGETS2), which every serial
# port open uses (serialport; rustix for the simulators): QEMU 7.2 (Debian 12)
# and 10.0 (bookworm-backports, Debian 13) do not, and the gateway cannot
# open a pty there; QEMU 11 does. So the script takes Debian's static
# qemu-user from trixie-backports (curl, xz, dpkg-deb; an x86-64 machine)
# into target/qemu-user/, unless OTAGW_QEMU names a qemu binary to use.
# Test programs start programs of their own architecture (the address-space
# test re-runs itself under prlimit): that qemu is registered with
# binfmt_misc as otagw-<qemu> (needs root; the script mounts binfmt_misc
# when it is not). Needs the target's libc too: Debian's
# libc6-dev-arm64-cross / libc6-dev-armhf-cross (with the cross gcc).
# Takes 10-30 minutes per architecture on 2 cores; not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/arch.sh "${1:-}"
if [ -z "$qemu" ]; then
    echo "$1 is this machine's architecture: run cargo test" >&2
    exit 64
fi
[ -d "$sysroot" ] || { echo "error: $sysroot not found: apt-get install $cc_package" >&2; exit 69; }

if [ -n "${OTAGW_QEMU:-}" ]; then
    qemu_bin=$(realpath "$OTAGW_QEMU")
else
    dir=target/qemu-user
    if [ ! -x "$dir/usr/bin/$qemu" ]; then
        mirror=http://deb.debian.org/debian
        file=$(curl -fsSL "$mirror/dists/trixie-backports/main/binary-amd64/Packages.xz" | xz -dc |
            awk '/^Package: qemu-user$/ {p = 1} p && !f && /^Filename:/ {print $2; f = 1}')
        [ -n "$file" ] || { echo "error: no qemu-user in trixie-backports" >&2; exit 69; }
        echo "== fetching $mirror/$file" >&2
        curl -fsSL -o target/qemu-user.deb "$mirror/$file"
        rm -rf "$dir" && dpkg-deb -x target/qemu-user.deb "$dir" && rm target/qemu-user.deb
    fi
    qemu_bin=$(realpath "$dir/usr/bin/$qemu")
fi
echo "== $("$qemu_bin" --version | head -1)" >&2

binfmt=/proc/sys/fs/binfmt_misc
entry="otagw-$qemu"
[ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt"
# An entry of an earlier run may name another qemu: register this one.
[ ! -e "$binfmt/$entry" ] || echo -1 > "$binfmt/$entry"
echo ":$entry:M::$elf_magic:$elf_mask:$qemu_bin:F" > "$binfmt/register"
rustup target add "$target" wasm32-wasip2 >/dev/null 2>&1 || true

# The dynamic loader and libc of the target, for qemu (runner and binfmt).
export QEMU_LD_PREFIX="$sysroot"
runner_var="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_RUNNER"
export "$runner_var=$qemu_bin -L $sysroot"

echo "== $target: the plugin host's unit tests" >&2
cargo test --locked --target "$target" -p otagw --lib -- plugin:: config::tests::the_plugin_engine
echo "== $target: the address space" >&2
cargo test --locked --target "$target" -p otagw --test plugin_address_space
echo "== $target: hostile plugins, the compile cache, one flash over a pty" >&2
cargo test --locked --target "$target" -p otagw-e2e --test e2e -- \
    plugin_host:: xmodem::one_mebibyte_over_a_pty_arrives_intact
echo "== $target: passed" >&2
