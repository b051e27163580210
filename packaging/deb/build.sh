#!/bin/sh
# Build the edgefleet-agent .deb with dpkg-deb: the agent in its own virtualenv under
# /opt/edgefleet, config in /etc/edgefleet, state in /var/lib/edgefleet, the systemd unit.
#
#   packaging/deb/build.sh [--mode full|app] [--arch amd64|arm64] [--extras agent,litert]
#                          [--out DIR] [--version VERSION]
#
#   --mode full  (default) the virtualenv holds the agent and its dependencies
#                ('.[agent]': numpy, onnxruntime, paho-mqtt, httpx, psutil, cryptography,
#                msgspec) from PyPI, or offline from a wheelhouse: PIP_NO_INDEX=1
#                PIP_FIND_LINKS=/path/to/wheels packaging/deb/build.sh
#   --mode app   the virtualenv holds only edgefleet itself, no dependencies: the same
#                package layout in seconds, without network. For tests of the package's
#                structure and maintainer scripts; the agent in it cannot run.
#   --arch       the device's Debian architecture (default: this machine's). Another
#                architecture than the build machine's is a cross build: the dependencies are
#                the target's binary wheels (pip --platform manylinux_2_X_<machine>, X up to
#                the device's glibc, $TARGET_GLIBC, default 2.36: Debian 12), never built here.
#                amd64 and arm64 only: armhf/armel (32-bit) have no onnxruntime wheels.
#   --extras     the extras of edgefleet installed (default agent; agent,litert adds LiteRT
#                for TFLite bundles).
#
# The device's Debian release must have the build machine's python3.X (the virtualenv uses
# /usr/bin/python3.X; Debian 12 has 3.11): build with PYTHON=/usr/bin/python3.Y for another.
# Every ELF file in the package is checked to be of the target architecture, and Depends
# names the libraries they link (libstdc++6, ...) and the glibc their wheels need.
# Build dependencies (Debian): dpkg-dev (dpkg-deb), python3-venv, python3-pip,
# python3-setuptools, python3-wheel, binutils (readelf).
# Compression: DEB_COMPRESS=zstd (default; dpkg >= 1.21.18, Debian 12, Ubuntu 21.10) or xz
# (any dpkg, but some 4 minutes for the full virtualenv). Prints the .deb path last.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mode=full
out=$repo/dist
version=
python=${PYTHON:-/usr/bin/python3}
arch=
extras=agent
glibc=${TARGET_GLIBC:-2.36}
compress=${DEB_COMPRESS:-zstd}

while [ $# -gt 0 ]; do
    case $1 in
        --mode) mode=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --version) version=$2; shift 2 ;;
        --arch) arch=$2; shift 2 ;;
        --extras) extras=$2; shift 2 ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $mode in full|app) ;; *) echo "build.sh: --mode $mode: use full or app" >&2; exit 2 ;; esac
for tool in dpkg-deb dpkg; do
    command -v $tool >/dev/null 2>&1 || { echo "build.sh: $tool not found (Debian package dpkg-dev)" >&2; exit 1; }
done
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || { echo "build.sh: $python has no venv/ensurepip (Debian package python3-venv)" >&2; exit 1; }

pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pybin=/usr/bin/python$pyver
[ -x "$pybin" ] || { echo "build.sh: $pybin not found: build with the system's Python (PYTHON=)" >&2; exit 1; }
if [ -z "$version" ]; then
    version=$("$python" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' \
        "$repo/pyproject.toml")-1
fi
host_arch=$(dpkg --print-architecture)
[ -n "$arch" ] || arch=$host_arch
case $arch in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
    armhf|armel|i386)
        if [ "$mode" = full ]; then
            echo "build.sh: --arch $arch: no onnxruntime wheels exist for it (PyPI has amd64 and arm64" \
                 "Linux wheels only); see docs/install.md, 32-bit devices" >&2
            exit 2
        fi
        machine= ;;
    *) echo "build.sh: --arch $arch: use amd64 or arm64" >&2; exit 2 ;;
esac
cross=
[ "$arch" = "$host_arch" ] || cross=1
case $glibc in 2.[0-9]*) ;; *) echo "build.sh: TARGET_GLIBC=$glibc: use e.g. 2.36" >&2; exit 2 ;; esac
if [ "$mode" = full ]; then
    command -v readelf >/dev/null 2>&1 || { echo "build.sh: readelf not found (Debian package binutils)" >&2; exit 1; }
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=/opt/edgefleet

# 1. the edgefleet wheel, from a copy of the sources (the repository stays clean)
mkdir -p "$work/src" "$work/wheels"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/agent" "$repo/shared" "$repo/fleet" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
if "$python" -c 'import setuptools, wheel, pip' 2>/dev/null; then
    isolation=--no-build-isolation   # Debian's python3-setuptools and python3-wheel: offline
else
    isolation=                        # pip fetches setuptools and wheel
fi
"$python" -m pip wheel --quiet --no-deps $isolation --wheel-dir "$work/wheels" "$work/src" >&2
whl=$(ls "$work/wheels"/edgefleet-*.whl)

# 2. the virtualenv, created where it will live, then moved into the package root
# Without pip inside: the device does not need it. The build's pip installs into it.
"$python" -m venv --without-pip "$stage$venv"
site=$stage$venv/lib/python$pyver/site-packages
if [ "$mode" = app ] || [ -n "$cross" ]; then
    set -- --no-deps --no-index "$whl"
else
    set -- "$whl[$extras]"
fi
"$python" -m pip --python "$stage$venv/bin/python" install --quiet --disable-pip-version-check "$@" >&2
if [ "$mode" = full ] && [ -n "$cross" ]; then
    # The target's wheels: manylinux tags from the device's glibc down to 2.17 (pip does not
    # widen a manylinux_2_X tag itself), binary only, for its CPython ABI.
    minor=${glibc#2.}
    set --
    while [ "$minor" -ge 17 ]; do
        set -- "$@" --platform "manylinux_2_${minor}_$machine"
        minor=$((minor - 1))
    done
    abi=cp$(echo "$pyver" | tr -d .)
    "$python" -m pip install --quiet --disable-pip-version-check --target "$work/deps" --only-binary=:all: \
        "$@" --platform "manylinux2014_$machine" --python-version "$pyver" --implementation cp \
        --abi "$abi" "$whl[$extras]" >&2
    # edgefleet itself is in the venv already (with its command); the deps' commands name the
    # build machine's Python and the agent does not need them.
    rm -rf "$work/deps/bin" "$work/deps/agent" "$work/deps/shared" "$work/deps/fleet" \
        "$work"/deps/edgefleet-*.dist-info
    cp -a "$work/deps/." "$site/"
fi
# The agent never imports the fleet (and the fleet's dependencies are not installed).
rm -rf "$site/fleet" "$stage$venv/bin/edgefleet"
# direct_url.json names the wheel in the build directory; the package is not from a URL.
rm -f "$site"/edgefleet-*.dist-info/direct_url.json
sed -i '/direct_url.json/d' "$site"/edgefleet-*.dist-info/RECORD
# Paths inside the venv name the staging directory: point them at /opt/edgefleet.
rm -f "$stage$venv"/bin/Activate.ps1 "$stage$venv"/bin/activate.csh "$stage$venv"/bin/activate.fish
for f in "$stage$venv"/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    sed -i "s|$stage$venv|$venv|g" "$f"
done
sed -i "s|$stage$venv|$venv|g" "$stage$venv/pyvenv.cfg"
for link in python python3 "python$pyver"; do
    ln -sf "$pybin" "$stage$venv/bin/$link"
done
find "$stage$venv" -name __pycache__ -prune -exec rm -rf {} +
# Byte-code is compiled now (the unit's ProtectSystem=strict forbids it at run time), with
# /opt/edgefleet paths and hashes instead of timestamps.
"$stage$venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash \
    -s "$stage" -p / "$stage$venv/lib" >/dev/null
if grep -rIl "$work" "$stage$venv" >/dev/null 2>&1; then
    echo "build.sh: the staging path is still named in:" >&2
    grep -rIl "$work" "$stage$venv" >&2
    exit 1
fi

# Every ELF file is of the target architecture (a wheel of the build machine would not run).
elf_check() {  # prints: MACHINE PATH for each ELF file whose e_machine is not the target's
    "$python" - "$stage" "$1" <<'PY'
import os, sys
want = {"x86_64": 62, "aarch64": 183}[sys.argv[2]]
for top, _, names in os.walk(sys.argv[1]):
    for name in names:
        path = os.path.join(top, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            head = f.read(20)
        if head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little" if head[5] == 1 else "big") != want:
            print(int.from_bytes(head[18:20], "little"), path)
PY
}
if [ -n "$machine" ]; then
    wrong=$(elf_check "$machine")
    if [ -n "$wrong" ]; then
        echo "build.sh: ELF files not built for $arch ($machine): e_machine and path:" >&2
        echo "$wrong" | head -20 >&2
        exit 1
    fi
fi
# Depends: the Debian packages of the shared libraries the ELF files link and the package
# does not carry itself, and the newest glibc the wheels' manylinux tags ask for.
libdepends=
if [ "$mode" = full ]; then
    needed=$(find "$stage" -type f \( -name '*.so' -o -name '*.so.*' \) -exec readelf -d {} + 2>/dev/null \
        | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u)
    for soname in $needed; do
        [ -n "$(find "$stage" -name "$soname" -print -quit)" ] && continue   # carried by a wheel
        case $soname in
            libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libutil.so.*|libresolv.so.*|ld-linux*) ;;
            libstdc++.so.6) libdepends="$libdepends, libstdc++6" ;;
            libgcc_s.so.1) libdepends="$libdepends, libgcc-s1" ;;
            libz.so.1) libdepends="$libdepends, zlib1g" ;;
            libexpat.so.1) libdepends="$libdepends, libexpat1" ;;
            libffi.so.8) libdepends="$libdepends, libffi8" ;;
            libssl.so.3|libcrypto.so.3) libdepends="$libdepends, libssl3" ;;
            *) echo "build.sh: an ELF file links $soname, which no wheel carries and build.sh does not" \
                    "map to a Debian package: add it to the Depends mapping" >&2; exit 1 ;;
        esac
    done
    libdepends=$(echo "$libdepends" | tr ',' '\n' | sed 's/^ *//' | sed '/^$/d' | sort -u | sed 's/^/, /' | tr -d '\n')
    # a wheel runs on the lowest glibc among its tags; the package needs the highest of those
    libc_min=$(for w in "$site"/*.dist-info/WHEEL; do
        sed -n 's/^Tag: .*-manylinux_2_\([0-9]*\)_.*/\1/p' "$w" | sort -n | head -1
    done | sort -n | tail -1)
    if [ -n "$libc_min" ]; then
        libc_dep="libc6 (>= 2.$libc_min)"
    fi
fi

# 3. configuration, unit, documentation, maintainer scripts
install -d "$stage/etc/edgefleet" "$stage/lib/systemd/system" "$stage/usr/bin" \
    "$stage/usr/share/doc/edgefleet-agent" "$stage/var/lib/edgefleet" "$stage/DEBIAN"
install -m 0640 "$repo/packaging/config/agent.toml" "$stage/etc/edgefleet/agent.toml"
install -m 0644 "$repo/packaging/systemd/edgefleet-agent.service" "$stage/lib/systemd/system/"
ln -s "$venv/bin/edgefleet-agent" "$stage/usr/bin/edgefleet-agent"
install -m 0644 "$here/debian/copyright" "$stage/usr/share/doc/edgefleet-agent/copyright"
if [ -f "$repo/docs/install.md" ]; then
    install -m 0644 "$repo/docs/install.md" "$stage/usr/share/doc/edgefleet-agent/"
fi
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$stage/DEBIAN/$script"
done
install -m 0644 "$here/debian/conffiles" "$stage/DEBIAN/conffiles"

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
description_mode=
suffix=
if [ "$mode" = app ]; then
    description_mode=" (test build without dependencies)"
    suffix=+app
fi
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@PYVER@|$pyver|g" -e "s|@SIZE@|$size|" \
    -e "s|@MODE@|$description_mode|" -e "s|@LIBC@|${libc_dep:-libc6}|" -e "s|@LIBDEPENDS@|$libdepends|" \
    "$here/debian/control.in" >"$stage/DEBIAN/control"

deb=$out/edgefleet-agent_${version}_${arch}$suffix.deb
dpkg-deb --root-owner-group -Z"$compress" --build "$stage" "$deb" >&2
echo "$deb"
