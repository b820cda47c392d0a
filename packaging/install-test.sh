#!/usr/bin/env bash
# Install a package built by deb.sh into a clean Debian 12 (bookworm) root
# and check it as an operator would:
#
#   packaging/install-test.sh target/debian/otagw_0.1.0-1_amd64.deb
#
# Debian 12 comes from debootstrap (minbase, plus the package's dependencies) into
# target/install-test/; no container runtime is needed, but root is. In that
# root the script checks the files, the conffile, the otagw system user in
# dialout, /var/lib/otagw, the shipped plugins linked into the plugins
# directory and the unit (installed, not enabled); then, as the otagw user, `otagw doctor`
# on the packaged configuration passes, and `otagw run` as the unit starts
# it tells a notify socket READY=1 (systemd cannot run as PID 1 here), and
# STOPPING=1 and a clean exit at SIGTERM. Last, a purge removes the state.
# Run by .ci/run. Needs debootstrap and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(realpath "${1:?usage: $0 PACKAGE.deb}")
root=$(realpath -m target/install-test/root)
# What Debian's minbase lacks of the package's dependencies.
include=adduser,ca-certificates
tarball=target/install-test/bookworm-minbase-$include.tgz

fail() { echo "FAIL: $*" >&2; exit 1; }
mounted=()
cleanup() {
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT

# A clean root every time, from a tarball kept between runs.
mkdir -p target/install-test
if [ ! -f "$tarball" ]; then
    debootstrap --variant=minbase --include=$include --make-tarball="$tarball.part" \
        bookworm target/install-test/tarball-work http://deb.debian.org/debian >/dev/null
    mv "$tarball.part" "$tarball"
    rm -rf target/install-test/tarball-work
fi
rm -rf "$root"
debootstrap --variant=minbase --include=$include --unpack-tarball="$(realpath "$tarball")" \
    bookworm "$root" http://deb.debian.org/debian >/dev/null
mount -t proc proc "$root/proc"; mounted+=("$root/proc")
mount --bind /dev "$root/dev"; mounted+=("$root/dev")
in_root() { chroot "$root" "$@"; }
# As the unit runs it: the otagw user with its groups (one process: signals
# reach otagw itself).
as_otagw() { in_root setpriv --reuid=otagw --regid=otagw --init-groups -- "$@"; }

echo "== install $(basename "$deb") into Debian $(cat "$root/etc/debian_version")"
cp "$deb" "$root/tmp/otagw.deb"
in_root dpkg -i /tmp/otagw.deb

echo "== the installed files"
for f in /usr/bin/otagw /usr/lib/otagw/plugins/xmodem.wasm /usr/lib/otagw/plugins/smp.wasm \
    /usr/lib/otagw/plugins/stm32.wasm /etc/otagw/otagw.toml /lib/systemd/system/otagw.service; do
    [ -f "$root$f" ] || fail "$f is not installed"
done
grep -qx /etc/otagw/otagw.toml "$root/var/lib/dpkg/info/otagw.conffiles" ||
    fail "/etc/otagw/otagw.toml is not a conffile"
in_root id otagw | grep -q '(dialout)' || fail "the otagw user is not in dialout: $(in_root id otagw)"
# (stat in the root: the names are the root's own users)
[ "$(in_root stat -c %U:%a /var/lib/otagw)" = otagw:750 ] ||
    fail "/var/lib/otagw: $(in_root stat -c %U:%a /var/lib/otagw)"
[ "$(in_root stat -c %U:%G:%a /etc/otagw/otagw.toml)" = root:otagw:640 ] ||
    fail "otagw.toml: $(in_root stat -c %U:%G:%a /etc/otagw/otagw.toml)"
for p in xmodem smp stm32; do
    [ "$(readlink "$root/var/lib/otagw/plugins/$p.wasm")" = "/usr/lib/otagw/plugins/$p.wasm" ] ||
        fail "$p.wasm is not linked into the plugins directory"
done
# Installed, not enabled or started: the operator configures first.
[ ! -e "$root/etc/systemd/system/multi-user.target.wants/otagw.service" ] ||
    fail "the unit was enabled before the gateway is configured"

echo "== otagw doctor, as the otagw user"
as_otagw otagw doctor --config /etc/otagw/otagw.toml ||
    fail "otagw doctor found problems on a fresh install"

echo "== otagw run as the unit runs it, with a notify socket"
python3 - "$root" <<'PY'
import os, signal, socket, subprocess, sys
root = sys.argv[1]
os.makedirs(f"{root}/run/otagw-test", exist_ok=True)
path = "/run/otagw-test/notify"
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(root + path)
os.chmod(root + path, 0o666)
s.settimeout(1)
unit = open(f"{root}/lib/systemd/system/otagw.service").read()
cmd = next(l for l in unit.splitlines() if l.startswith("ExecStart=")).split("=", 1)[1].split()
env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="30000000",
           RUST_LOG="warn,otagw=info")
p = subprocess.Popen(["chroot", root, "setpriv", "--reuid=otagw", "--regid=otagw",
                      "--init-groups", "--"] + cmd, env=env)
def until(what, limit=120):
    for _ in range(limit):
        try:
            got = s.recv(4096).decode()
        except socket.timeout:
            if p.poll() is not None:
                sys.exit(f"otagw run exited {p.returncode} before {what}")
            continue
        if what in got:
            return got
    sys.exit(f"no {what} in {limit} s")
try:
    print("notify:", until("READY=1").strip().replace("\n", " "))
    p.send_signal(signal.SIGTERM)
    until("STOPPING=1")
    code = p.wait(timeout=60)
    assert code == 0, f"otagw run exited {code}"
finally:
    if p.poll() is None:
        p.kill()
PY

echo "== purge"
in_root dpkg --purge otagw
[ ! -e "$root/var/lib/otagw" ] || fail "purge left /var/lib/otagw"
[ ! -e "$root/etc/otagw/otagw.toml" ] || fail "purge left the configuration"
[ ! -e "$root/usr/bin/otagw" ] || fail "purge left the binary"
echo "== the package installs, starts, passes doctor and purges cleanly"
