#!/bin/sh
# Debian packages the packaging and HIL tests need (make deps-system; make test runs it).
# Installs only what is missing, and only as root with apt-get; otherwise it says what is
# missing and the tests skip, naming the package (on CI, EDGEFLEET_TEST_NO_SKIP=1 fails them).
set -eu
missing=
need_tool() {  # need_tool TOOL PACKAGE
    for d in /usr/sbin /sbin /usr/bin /bin; do
        [ -x "$d/$1" ] && return 0
    done
    command -v "$1" >/dev/null 2>&1 && return 0
    case " $missing " in *" $2 "*) ;; *) missing="$missing $2" ;; esac
}
need_py() {  # need_py MODULE PACKAGE: for /usr/bin/python3, which builds the .deb
    /usr/bin/python3 -c "import $1" 2>/dev/null && return 0
    case " $missing " in *" $2 "*) ;; *) missing="$missing $2" ;; esac
}
need_tool mosquitto mosquitto          # broker ACL test, e2e, HIL
need_tool mosquitto_passwd mosquitto
need_tool openssl openssl              # packaging/mosquitto/gen-certs.sh
need_tool systemd-analyze systemd      # unit verify and security score
need_tool dpkg-deb dpkg                # .deb build and inspection
need_tool useradd passwd               # postinst in a throwaway root
need_tool ip iproute2                  # HIL network namespaces
need_tool tc iproute2
need_tool nft nftables                 # HIL packet loss where the kernel has no netem
need_tool ssh openssh-client           # HIL --mode ssh: the harness side
need_tool ssh-keygen openssh-client
need_tool sshd openssh-server          # HIL --mode ssh test: a real device reached over SSH
need_tool qemu-aarch64-static qemu-user-static  # make test-arm64: emulated aarch64 (binfmt_misc)
need_tool debootstrap debootstrap      # make test-arm64: the arm64 Debian root
need_tool readelf binutils             # ELF architecture of every file in a cross-built .deb
need_tool file file
need_tool python3 python3
need_py venv python3-venv
need_py ensurepip python3-venv
need_py pip python3-pip
need_py setuptools python3-setuptools
need_py wheel python3-wheel
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "deps-system: installing$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
else
    echo "deps-system: missing Debian packages:$missing (as root: apt-get install$missing);" \
         "the tests that need them skip" >&2
fi
