#!/usr/bin/env bash
# Build the Debian package for one architecture:
#
#   packaging/deb.sh amd64|arm64|armhf
#
# It holds /usr/bin/otagw, the xmodem, smp and stm32 families in
# /usr/lib/otagw/plugins, /etc/otagw/otagw.toml (a conffile), the hardened
# systemd unit (enabled and started on install) and a postinst that makes
# the `otagw` system user (in dialout) and /var/lib/otagw. Needs cargo-deb
# (`cargo install --locked cargo-deb --version 3.8.0`) and what build.sh needs.
# The last line of output is the path of the package.
set -euo pipefail
cd "$(dirname "$0")/.."
packaging/build.sh "${1:-}" >&2
. packaging/arch.sh "$1"
if ! command -v cargo-deb >/dev/null; then
    echo "error: cargo-deb not found: cargo install --locked cargo-deb --version 3.8.0" >&2
    exit 69
fi
# The package must ask for the C library the binary needs.
bin="target/$target/gateway/otagw"
need=$("${cc%gcc}objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | cut -d_ -f2 | sort -uV | tail -1)
declared=$(sed -n 's/^depends = ".*libc6 (>= \([0-9.]*\)).*/\1/p' gateway/Cargo.toml)
if dpkg --compare-versions "$need" gt "$declared"; then
    echo "error: $bin needs glibc $need but the package depends on libc6 (>= $declared):" \
        "raise it in gateway/Cargo.toml [package.metadata.deb]" >&2
    exit 70
fi
# cargo-deb prints the path of the package it wrote.
deb=$(cargo deb --quiet --no-build --no-strip --profile gateway --target "$target" -p otagw \
    --output target/debian/ | tail -1)
echo "$deb"
