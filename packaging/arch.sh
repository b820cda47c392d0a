# Sourced by packaging/*.sh: Debian architecture name -> Rust target, C
# cross compiler (for the crates that build C: ring), qemu-user and the
# cross sysroot that runs its binaries.
case "${1:-}" in
amd64)
    target=x86_64-unknown-linux-gnu cc=gcc cc_package=gcc
    qemu="" sysroot=""
    ;;
arm64)
    target=aarch64-unknown-linux-gnu cc=aarch64-linux-gnu-gcc cc_package=gcc-aarch64-linux-gnu
    qemu=qemu-aarch64 sysroot=/usr/aarch64-linux-gnu
    ;;
armhf)
    target=armv7-unknown-linux-gnueabihf cc=arm-linux-gnueabihf-gcc cc_package=gcc-arm-linux-gnueabihf
    qemu=qemu-arm sysroot=/usr/arm-linux-gnueabihf
    ;;
*)
    echo "usage: $0 amd64|arm64|armhf (the gateway's Debian architecture)" >&2
    exit 64
    ;;
esac
export "CC_${target//-/_}=$cc"
