#!/usr/bin/env bash
# FUSE passthrough (`--passthrough`, issue 13): build libfuse 3.17.2 into a private prefix and
# pyfuse3 3.5.0 + packaging/pyfuse3-passthrough.patch against it, into a virtualenv.
#
#   packaging/build-passthrough.sh [VENV]      # default: .venv of this checkout
#
# Leaves the system alone: libfuse goes to VENV/libfuse (the pyfuse3 module finds it
# by its rpath), the system's libfuse3/fuse3 packages and fusermount3 stay as they are
# (a root daemon mounts directly; libfuse 3.17 has soname libfuse3.so.4, so nothing else
# can pick it up by accident). Needs: Linux >= 6.9 for passthrough at run time, root
# (CAP_SYS_ADMIN) for FUSE_DEV_IOC_BACKING_OPEN; to build: meson, ninja-build, gcc,
# pkg-config, python3-dev, curl, patch (apt), Cython (pip, a build dependency of pyfuse3).
# Re-running rebuilds both from scratch (`quickstart` skips it while its stamp matches).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(realpath -m "${1:-$repo/.venv}")"
prefix="$venv/libfuse"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

FUSE_VERSION=3.17.2
# Debian's pool serves the upstream tarball; the hash is the one in trixie's Sources.
FUSE_URL="http://deb.debian.org/debian/pool/main/f/fuse3/fuse3_${FUSE_VERSION}.orig.tar.gz"
FUSE_SHA256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
PYFUSE3_VERSION=3.5.0

[ -x "$venv/bin/python" ] || { echo "build-passthrough: no virtualenv at $venv" >&2; exit 2; }
missing=()
for pkg in meson ninja-build gcc pkg-config python3-dev curl patch ca-certificates; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi

# --- libfuse, private prefix: the library and headers only -------------------
curl -sSfL -o "$work/fuse.tar.gz" "$FUSE_URL"
echo "$FUSE_SHA256  $work/fuse.tar.gz" | sha256sum -c --quiet -
tar -xzf "$work/fuse.tar.gz" -C "$work"
rm -rf "$prefix"
meson setup "$work/fuse-build" "$work/fuse-$FUSE_VERSION" --prefix="$prefix" --libdir=lib \
    -Dutils=false -Dexamples=false -Dtests=false -Dinitscriptdir= -Duseroot=false >/dev/null
ninja -C "$work/fuse-build" >/dev/null
ninja -C "$work/fuse-build" install >/dev/null

# --- pyfuse3, patched, linked to it ----------------------------------------
"$venv/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$work" "pyfuse3==$PYFUSE3_VERSION"
tar -xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$work"
src="$work/pyfuse3-$PYFUSE3_VERSION"
patch -s -p1 -d "$src" <"$repo/packaging/pyfuse3-passthrough.patch"
rm -f "$src/src/pyfuse3/__init__.c" # generated from the patched .pyx, not the shipped one
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" LDFLAGS="-Wl,-rpath,$prefix/lib" \
    "$venv/bin/python" -m pip install -q --no-deps --force-reinstall --no-cache-dir "$src"

"$venv/bin/python" - <<'EOF'
import pyfuse3
assert hasattr(pyfuse3, "passthrough_open"), "pyfuse3 is not the patched build"
print("build-passthrough: pyfuse3", pyfuse3.__file__, "linked to libfuse 3.17 with passthrough")
EOF
ldd "$("$venv/bin/python" -c 'import pyfuse3; print(pyfuse3.__file__)')" | grep libfuse3
