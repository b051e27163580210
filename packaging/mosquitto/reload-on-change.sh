#!/bin/sh
# Sends Mosquitto SIGHUP whenever the devices' password file changes, so a login the fleet
# writes (enrollment, rotation) works and a revoked one ends, without a broker restart.
# For Kubernetes, where the fleet cannot signal the broker's pod: this runs as a sidecar in
# the broker's pod (shareProcessNamespace: true, the broker's uid) and watches the file on
# the volume the fleet's API writes (packaging/deploy/k8s/mosquitto.yaml).
#
#   reload-on-change.sh FILE [PROCESS_NAME] [INTERVAL_S]
#
# It polls (inode, size, mtime) rather than using inotify: the volume is ReadWriteMany
# (NFS or the like), where a write from another node raises no inotify event. The fleet
# appends a line per change (the size grows) and compacts by renaming (the inode changes).
# The broker loads the file when it starts; a change made between then and this script's
# first look is applied with the next one.
set -eu
file=$1
name=${2:-mosquitto}
interval=${3:-2}

state() { stat -L -c '%i %s %Y' "$file" 2>/dev/null || echo missing; }

broker_pids() {
    for dir in /proc/[0-9]*; do
        [ "$(cat "$dir/comm" 2>/dev/null)" = "$name" ] && echo "${dir#/proc/}"
    done
    return 0
}

last=$(state)
echo "reload-on-change: watching $file every ${interval}s for process $name"
while sleep "$interval"; do
    now=$(state)
    [ "$now" = "$last" ] && continue
    pids=$(broker_pids)
    if [ -z "$pids" ]; then
        echo "reload-on-change: $file changed but no process $name runs; retrying" >&2
        continue
    fi
    for pid in $pids; do
        kill -HUP "$pid" && echo "reload-on-change: $file changed; sent SIGHUP to $name ($pid)"
    done
    last=$now
done
