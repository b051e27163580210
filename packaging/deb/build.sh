#!/bin/sh
# Build the edgefleet-agent .deb with dpkg-deb: the agent in its own virtualenv under
# /opt/edgefleet, config in /etc/edgefleet, state in /var/lib/edgefleet, the systemd unit.
#
#   packaging/deb/build.sh [--mode full|app] [--out DIR] [--version VERSION]
#
#   --mode full  (default) the virtualenv holds the agent and its dependencies
#                ('.[agent]': numpy, onnxruntime, paho-mqtt, httpx, psutil, cryptography,
#                msgspec) from PyPI, or offline from a wheelhouse: PIP_NO_INDEX=1
#                PIP_FIND_LINKS=/path/to/wheels packaging/deb/build.sh
#   --mode app   the virtualenv holds only edgefleet itself, no dependencies: the same
#                package layout in seconds, without network. For tests of the package's
#                structure and maintainer scripts; the agent in it cannot run.
#
# Build on the distribution and architecture of the devices (the virtualenv uses the
# system's /usr/bin/python3.X, and wheels are per architecture). Build dependencies
# (Debian): dpkg-dev (dpkg-deb), python3-venv, python3-pip, python3-setuptools, python3-wheel.
# Compression: DEB_COMPRESS=zstd (default; dpkg >= 1.21.18, Debian 12, Ubuntu 21.10) or xz
# (any dpkg, but some 4 minutes for the full virtualenv). Prints the .deb path last.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mode=full
out=$repo/dist
version=
python=${PYTHON:-/usr/bin/python3}
compress=${DEB_COMPRESS:-zstd}

while [ $# -gt 0 ]; do
    case $1 in
        --mode) mode=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --version) version=$2; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
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
arch=$(dpkg --print-architecture)
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
if [ "$mode" = app ]; then
    set -- --no-deps --no-index "$whl"
else
    set -- "$whl[agent]"
fi
"$python" -m pip --python "$stage$venv/bin/python" install --quiet --disable-pip-version-check "$@" >&2
# The agent never imports the fleet (and the fleet's dependencies are not installed).
site=$stage$venv/lib/python$pyver/site-packages
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
    -e "s|@MODE@|$description_mode|" "$here/debian/control.in" >"$stage/DEBIAN/control"

deb=$out/edgefleet-agent_${version}_${arch}$suffix.deb
dpkg-deb --root-owner-group -Z"$compress" --build "$stage" "$deb" >&2
echo "$deb"
