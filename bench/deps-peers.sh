#!/bin/sh
# Peers `make bench` measures beside our code where Debian ships them: the Mender client
# (mender-client 3.4; bench/b_memory.py runs `mender daemon` idle) and mender-artifact
# (bench/b_verify.py times `mender-artifact validate` of the same payload). Installed when
# missing and we are root with apt-get; otherwise their rows say "not measured".
set -eu
missing=""
command -v mender >/dev/null 2>&1 || missing="$missing mender-client"
command -v mender-artifact >/dev/null 2>&1 || missing="$missing mender-artifact"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing$missing (Debian) to measure them beside edgefleet"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
        || echo "bench:$missing could not be installed; their rows will say not measured"
else
    echo "bench:$missing not installed (apt-get install$missing as root); their rows will say not measured"
fi
