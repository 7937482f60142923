#!/usr/bin/env bash
# FUSE passthrough (`--passthrough`, issue 13): libfuse 3.17.2 built into a private prefix and
# pyfuse3 (packaging/constraints.txt) + packaging/pyfuse3-passthrough.patch built against it.
#
#   packaging/build-passthrough.sh VENV          # install into VENV (quickstart: .venv, /opt/s3cachefs)
#   packaging/build-passthrough.sh --cache-only  # build into the cache only, print the entry's path
#
# A build is one cache entry, $S3CACHEFS_PASSTHROUGH_CACHE/KEY (default
# ~/.cache/s3cachefs-passthrough), holding libfuse/ (library + headers) and wheel/pyfuse3-*.whl;
# KEY hashes this script, the patch, constraints.txt and the Python (version, ABI, arch), so a
# change of any of them (Cython's pin included) builds anew, and the dev venv, `quickstart
# install` and the tests' node images pay for one build per machine, not one per venv.
# Installing copies libfuse/ to VENV/libfuse and installs the wheel. The module finds the
# library by a relative rpath ($ORIGIN/../../../../libfuse/lib: from
# PREFIX/lib/pythonX.Y/site-packages/pyfuse3/ to PREFIX/libfuse/lib), so the same wheel works
# in any venv, and in an image's system Python with the library in /usr/local/libfuse (Dockerfile).
#
# Leaves the system alone: the system's libfuse3/fuse3 packages and fusermount3 stay (a root
# daemon mounts directly; libfuse 3.17 has soname libfuse3.so.4, so nothing else can pick it
# up by accident). Needs: Linux >= 6.9 for passthrough at run time, root (CAP_SYS_ADMIN) for
# FUSE_DEV_IOC_BACKING_OPEN; to build: meson, ninja-build, gcc, pkg-config, python3-dev,
# python3-venv, curl, patch, ca-certificates (apt; installed when missing), PyPI for pyfuse3 and its build pins.
# Offline: S3CACHEFS_LIBFUSE_TARBALL=/path/fuse-3.17.2.tar.gz (checked against the same sha256).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
here="$repo/packaging"

FUSE_VERSION=3.17.2
FUSE_SHA256=3d932431ad94e86179e5265cddde1d67aa3bb2fb09a5bd35c641f86f2b5ed06f
# Tried in order, each checked against FUSE_SHA256. All three are the same bytes: Debian's
# orig tarball is upstream's signed release tarball (the pool has its .asc; Homebrew and
# others pin this sha256 for the GitHub URL), and snapshot.debian.org serves a file by its
# sha1 (b79b0c36... is the sha1 of that tarball) after the pool drops it. Only the pool URL
# could be fetched from where this was written (no route to GitHub or snapshot there).
FUSE_URLS=(
    "http://deb.debian.org/debian/pool/main/f/fuse3/fuse3_${FUSE_VERSION}.orig.tar.gz"
    "https://snapshot.debian.org/file/b79b0c3692cf230c3bb720451c1fb6bfb7da5902"
    "https://github.com/libfuse/libfuse/releases/download/fuse-${FUSE_VERSION}/fuse-${FUSE_VERSION}.tar.gz"
)
PYFUSE3_VERSION="$(sed -n 's/^pyfuse3==//p' "$here/constraints.txt")"

mode=install
case "${1:-}" in
    --cache-only) mode=cache; python=python3 ;;
    "" | -*) echo "usage: $0 VENV | --cache-only" >&2; exit 2 ;;
    *)
        venv="$(realpath -m "$1")"
        python="$venv/bin/python"
        [ -x "$python" ] || { echo "build-passthrough: no virtualenv at $venv" >&2; exit 2; }
        ;;
esac

key="$(
    {
        cat "$here/build-passthrough.sh" "$here/pyfuse3-passthrough.patch" "$here/constraints.txt"
        "$python" -c 'import sys, sysconfig; print(sys.version, sysconfig.get_config_var("SOABI"))'
        uname -m
    } | sha256sum | cut -c1-16
)"
cache="${S3CACHEFS_PASSTHROUGH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/s3cachefs-passthrough}"
entry="$cache/$key"

work="$(mktemp -d)"
trap 'rm -rf "$work" "$entry.tmp.$$"' EXIT

build() {
    # Debian packages for what is missing (by command, not by package: an image's own
    # Python, e.g. python:3.11-slim's, has its headers and venv outside dpkg).
    local missing=() tool
    for tool in meson:meson ninja:ninja-build gcc:gcc pkg-config:pkg-config curl:curl patch:patch; do
        command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
    done
    [ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
    "$python" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' ||
        missing+=(python3-dev)
    "$python" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi

    # --- libfuse sources: the offline tarball, else the first URL that serves the right bytes
    local tarball="$work/fuse.tar.gz" sources=("${FUSE_URLS[@]}") got=""
    [ -z "${S3CACHEFS_LIBFUSE_TARBALL:-}" ] || sources=("file://$(realpath -m "$S3CACHEFS_LIBFUSE_TARBALL")")
    for url in "${sources[@]}"; do
        if ! curl -sSfL --connect-timeout 20 -o "$tarball" "$url" 2>"$work/curl.err"; then
            echo "build-passthrough: $url: $(tr '\n' ' ' <"$work/curl.err")" >&2
        elif ! echo "$FUSE_SHA256  $tarball" | sha256sum -c --quiet - >/dev/null 2>&1; then
            echo "build-passthrough: $url: not the sha256 $FUSE_SHA256" >&2
        else
            got="$url"
            break
        fi
    done
    [ -n "$got" ] || {
        echo "build-passthrough: no source of fuse-$FUSE_VERSION.tar.gz with sha256 $FUSE_SHA256 (set S3CACHEFS_LIBFUSE_TARBALL=/path to build offline)" >&2
        return 1
    }
    tar -xzf "$tarball" -C "$work"

    # --- libfuse, the library and headers only, into the new entry ----------
    local new="$entry.tmp.$$"
    rm -rf "$new"
    mkdir -p "$new/wheel"
    meson setup "$work/fuse-build" "$work/fuse-$FUSE_VERSION" --prefix="$new/libfuse" --libdir=lib \
        -Dutils=false -Dexamples=false -Dtests=false -Dinitscriptdir= -Duseroot=false >/dev/null
    ninja -C "$work/fuse-build" >/dev/null
    # Not into $DESTDIR: `quickstart install` stages under one, and meson honours it.
    DESTDIR= ninja -C "$work/fuse-build" install >/dev/null

    # --- pyfuse3, patched, compiled by the pinned Cython in a throwaway venv --
    "$python" -m venv "$work/buildenv"
    local pip=("$work/buildenv/bin/python" -m pip -q)
    "${pip[@]}" install -c "$here/constraints.txt" Cython setuptools setuptools-scm
    "${pip[@]}" download --no-deps --no-binary :all: -d "$work" "pyfuse3==$PYFUSE3_VERSION"
    tar -xzf "$work/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$work"
    local src="$work/pyfuse3-$PYFUSE3_VERSION"
    patch -s -p1 -d "$src" <"$here/pyfuse3-passthrough.patch"
    rm -f "$src/src/pyfuse3/__init__.c" # generated from the patched .pyx, not the shipped one
    # pkg-config --libs adds -L of the build prefix; the runtime path is relative only.
    # -g0: Debian's Python compiles extensions with -g, which triples the time of this
    # one large generated C file (3m40s against 1m13s in the image's build stage).
    PKG_CONFIG_PATH="$new/libfuse/lib/pkgconfig" LDFLAGS="-Wl,-rpath,\$ORIGIN/../../../../libfuse/lib" \
        CFLAGS="${CFLAGS:-} -g0" \
        "${pip[@]}" wheel --no-deps --no-build-isolation --no-cache-dir -w "$new/wheel" "$src"
    "$work/buildenv/bin/python" -c 'import Cython; print(Cython.__version__)' >"$new/cython-version"
    mkdir -p "$cache"
    rm -rf "$entry"
    # A concurrent build of the same key may have won: its entry is as good as ours.
    mv -T "$new" "$entry" 2>/dev/null || [ -n "$(ls "$entry"/wheel/*.whl 2>/dev/null)" ]
}

[ -n "$(ls "$entry"/wheel/*.whl 2>/dev/null)" ] || build
if [ "$mode" = cache ]; then
    echo "$entry"
    exit 0
fi

# --- install into VENV: the library first, so that the module never lacks it ---
rm -rf "$venv/libfuse.new"
cp -a "$entry/libfuse" "$venv/libfuse.new"
rm -rf "$venv/libfuse"
mv "$venv/libfuse.new" "$venv/libfuse"
wheel="$(ls "$entry"/wheel/*.whl)"
"$python" -m pip install -q --no-deps --force-reinstall "$wheel"
"$python" -m pip install -q -c "$here/constraints.txt" "$wheel" # its dependencies (trio), if missing
"$python" - <<'EOF'
import pyfuse3
assert hasattr(pyfuse3, "passthrough_open"), "pyfuse3 is not the patched build"
print("build-passthrough: pyfuse3", pyfuse3.__file__, "linked to libfuse 3.17 with passthrough")
EOF
ldd "$("$python" -c 'import pyfuse3; print(pyfuse3.__file__)')" | grep 'libfuse/lib/libfuse3\.so\.4'
echo "build-passthrough: Cython $(cat "$entry/cython-version"), entry $entry"
