#!/usr/bin/env bash
# Builds localhost/xpand-base, the base of xpand's images, from Debian's packages alone (no
# image registry is needed): a minimal Debian bookworm made by debootstrap, with what the
# gateway and the workers need at run time (ca-certificates, curl for health checks, ffmpeg),
# imported into podman. Kept when it exists; REBUILD=1 makes it again.
set -euo pipefail
image=localhost/xpand-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if podman image exists "$image" && [ -z "${REBUILD:-}" ]; then
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "make-base-image: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
}
root=$(mktemp -d /var/tmp/xpand-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "make-base-image: debootstrap bookworm from $mirror (a few minutes)" >&2
debootstrap --variant=minbase --include=ca-certificates,curl,ffmpeg bookworm "$root" "$mirror" \
    >/dev/null
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc \
    "$root"/usr/share/man "$root"/usr/share/locale
tar -C "$root" --numeric-owner -c . | podman import --change 'CMD ["/bin/sh"]' - "$image" \
    >/dev/null
echo "make-base-image: built $image" >&2
