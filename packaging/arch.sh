# Sourced by packaging/*.sh: Debian architecture name -> Rust target, C
# cross compiler (for the crates that build C: ring), qemu-user and the
# cross sysroot that runs its binaries, and the ELF header binfmt_misc
# knows them by.
case "${1:-}" in
amd64)
    target=x86_64-unknown-linux-gnu cc=gcc cc_package=gcc
    qemu="" sysroot=""
    ;;
arm64)
    target=aarch64-unknown-linux-gnu cc=aarch64-linux-gnu-gcc cc_package=gcc-aarch64-linux-gnu
    qemu=qemu-aarch64 sysroot=/usr/aarch64-linux-gnu
    elf_magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    elf_mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    ;;
armhf)
    target=armv7-unknown-linux-gnueabihf cc=arm-linux-gnueabihf-gcc cc_package=gcc-arm-linux-gnueabihf
    qemu=qemu-arm sysroot=/usr/arm-linux-gnueabihf
    elf_magic='\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00'
    elf_mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    ;;
*)
    echo "usage: $0 amd64|arm64|armhf (the gateway's Debian architecture)" >&2
    exit 64
    ;;
esac
export "CC_${target//-/_}=$cc"
