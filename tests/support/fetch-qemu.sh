#!/bin/sh
# Unpacks QEMU (qemu-system-x86 from the configured apt sources) and the Debian cloud kernel into
# a folder of the tests' own, without installing them: installing qemu-system-x86 7.2 on these
# machines would remove the qemu-utils 10.x that is there. tests/qemu_e2e.rs finds them there
# when qemu-system-x86_64 is not in PATH and no vmlinuz-*-cloud-amd64 is in /boot.
#
#   fetch-qemu.sh [DIR]      (default: target/qemu next to this repository's Cargo.toml)
#
# Needs apt-get (after `apt-get update`) and dpkg-deb. Idempotent: does nothing once DIR/root has
# both QEMU and a kernel.
set -eu

here=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$here/target/qemu}
root=$dir/root
debs=$dir/debs

if [ -x "$root/usr/bin/qemu-system-x86_64" ] && ls "$root"/boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1; then
    echo "fetch-qemu: $root already has QEMU and a kernel"
    exit 0
fi

# The kernel package behind the metapackage, e.g. linux-image-6.1.0-57-cloud-amd64.
kernel=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n 1)
[ -n "$kernel" ] || { echo "fetch-qemu: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }

# QEMU, its firmware (seabios; qemu-system-data has linuxboot_dma.bin) and the libraries it
# links that a plain Debian 12 lacks.
pkgs="qemu-system-x86 qemu-system-common qemu-system-data seabios $kernel
      libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2 libndctl6
      libdaxctl1 libnl-route-3-200 libnl-3-200 libaio1 liburing2 libnuma1 libpixman-1-0
      libjpeg62-turbo libpng16-16 libzstd1 libgnutls30 libsasl2-2 libseccomp2 libudev1"
mkdir -p "$debs" "$root"
# apt-get download writes into the current directory; _apt may not write there (a warning).
(cd "$debs" && apt-get download $pkgs)
for f in "$debs"/*.deb; do dpkg-deb -x "$f" "$root"; done

lib=$root/usr/lib/x86_64-linux-gnu
missing=$(LD_LIBRARY_PATH=$lib ldd "$root/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
if [ -n "$missing" ]; then
    echo "fetch-qemu: qemu-system-x86_64 still misses libraries:" >&2
    echo "$missing" >&2
    exit 1
fi
LD_LIBRARY_PATH=$lib "$root/usr/bin/qemu-system-x86_64" --version | head -n 1
ls "$root"/boot/vmlinuz-*-cloud-amd64
