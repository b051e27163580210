#!/bin/sh
# Peers `make bench` measures beside our code where Debian ships them: the Mender client
# (Debian package mender-client 3.4; bench/b_memory.py runs `mender daemon` idle). Installed
# when missing and we are root with apt-get; otherwise the rows say "not measured".
set -eu
command -v mender >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing mender-client (Debian) to measure its idle memory beside the agent"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mender-client \
        || echo "bench: mender-client could not be installed; its rows will say not measured"
else
    echo "bench: mender-client is not installed (apt-get install mender-client as root); its rows will say not measured"
fi
