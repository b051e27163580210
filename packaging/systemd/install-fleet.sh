#!/bin/sh
# Install the fleet service on a systemd host from a checkout of this repository:
#
#   sudo packaging/systemd/install-fleet.sh
#
# Makes what the fleet's units name: the user edgefleet-fleet, the virtualenv
# /opt/edgefleet-fleet (the fleet and its CLI, `edgefleet`), /etc/edgefleet/fleet.env (from
# packaging/deploy/fleet.env.example, kept when it exists), the documentation the units
# point at, and the units themselves. It enables nothing: fill fleet.env, put the keys in
# /etc/edgefleet/keys, then `systemctl enable --now edgefleet-fleet` (or the role units).
# PYTHON: the interpreter (default python3, 3.11 or newer). PIP_ARGS: extra pip arguments
# (a wheel directory for an offline host: PIP_ARGS="--no-index --find-links /srv/wheels").
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=/opt/edgefleet-fleet
python=${PYTHON:-python3}

id edgefleet-fleet >/dev/null 2>&1 || useradd --system --home-dir /var/lib/edgefleet-fleet \
    --shell /usr/sbin/nologin edgefleet-fleet
"$python" -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install --no-cache-dir ${PIP_ARGS:-} "$repo[fleet]"
install -d -m 0750 -o root -g edgefleet-fleet /etc/edgefleet /etc/edgefleet/keys
[ -f /etc/edgefleet/fleet.env ] || \
    install -m 0640 -o root -g edgefleet-fleet "$repo/packaging/deploy/fleet.env.example" /etc/edgefleet/fleet.env
install -d -m 0755 /usr/share/doc/edgefleet-fleet
install -m 0644 "$repo/docs/install.md" "$repo/docs/deployment.md" /usr/share/doc/edgefleet-fleet/
install -m 0644 "$repo/packaging/systemd/edgefleet-fleet.service" \
    "$repo/packaging/systemd/edgefleet-fleet@.service" /etc/systemd/system/
systemctl daemon-reload
echo "installed $venv/bin/edgefleet; fill /etc/edgefleet/fleet.env, then: systemctl enable --now edgefleet-fleet"
