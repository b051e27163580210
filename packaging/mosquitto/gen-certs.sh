#!/bin/sh
# Generate a private CA and a broker certificate for edgefleet's Mosquitto.
#
#   packaging/mosquitto/gen-certs.sh OUT_DIR BROKER_NAME [EXTRA_SAN ...]
#
#   OUT_DIR      written: edgefleet-ca.crt, edgefleet-ca.key (keep it offline), broker.crt,
#                broker.key. An existing CA in OUT_DIR is reused, so re-running renews the
#                broker certificate without touching the devices' trust.
#   BROKER_NAME  the DNS name devices connect to (subjectAltName DNS)
#   EXTRA_SAN    more subjectAltNames: DNS:other.name or IP:10.0.0.5
#
# Environment: CA_DAYS (default 3650), BROKER_DAYS (default 825), KEY_ALG (ec, default, or rsa).
# Devices and the fleet verify the broker with edgefleet-ca.crt.
set -eu
if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_DIR BROKER_NAME [DNS:name|IP:addr ...]" >&2
    exit 2
fi
out=$1
name=$2
shift 2
ca_days=${CA_DAYS:-3650}
broker_days=${BROKER_DAYS:-825}
alg=${KEY_ALG:-ec}
command -v openssl >/dev/null 2>&1 || { echo "$0: openssl not found (Debian package openssl)" >&2; exit 1; }

newkey() {
    if [ "$alg" = rsa ]; then
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out "$1" 2>/dev/null
    else
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    fi
    chmod 600 "$1"
}

mkdir -p "$out"
umask 077
if [ ! -f "$out/edgefleet-ca.key" ]; then
    newkey "$out/edgefleet-ca.key"
    openssl req -x509 -new -key "$out/edgefleet-ca.key" -sha256 -days "$ca_days" \
        -subj "/CN=edgefleet MQTT CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$out/edgefleet-ca.crt"
fi

san="DNS:$name"
for extra in "$@"; do
    san="$san,$extra"
done
newkey "$out/broker.key"
ext=$(mktemp)
trap 'rm -f "$ext" "$out/broker.csr"' EXIT
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$san" >"$ext"
openssl req -new -key "$out/broker.key" -subj "/CN=$name" -out "$out/broker.csr"
openssl x509 -req -in "$out/broker.csr" -CA "$out/edgefleet-ca.crt" -CAkey "$out/edgefleet-ca.key" \
    -CAcreateserial -sha256 -days "$broker_days" -extfile "$ext" -out "$out/broker.crt" 2>/dev/null
chmod 644 "$out/edgefleet-ca.crt" "$out/broker.crt"
echo "CA:     $out/edgefleet-ca.crt (devices and the fleet trust this)"
echo "broker: $out/broker.crt, $out/broker.key ($san)"
