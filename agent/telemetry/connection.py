"""How the agent reaches its broker: URL, MQTT protocol version, TLS, and readable failures.

- ``mqtt://host[:1883]`` is plain TCP, ``mqtts://host[:8883]`` TLS; user info in the URL
  (``mqtt://user:pass@host``) is a fallback for devices without a fleet credential;
- protocol ``auto`` tries MQTT 5 and falls back to 3.1.1 when the broker answers the
  CONNECT with "unsupported protocol version" (a 3.1.1-only broker such as amqtt);
  ``5`` and ``3.1.1`` pin the version;
- TLS verifies the broker's chain against ``ca_file`` (the system CAs without one) and its
  host name; ``insecure`` skips only the host name check, never the chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

from shared.mqtturl import MqttUrl
from shared.mqtturl import parse_mqtt_url as parse_mqtt_url  # re-exported: the reporter, tests

if TYPE_CHECKING:  # ssl (~4.5 MB) loads when TLS or a connection error needs it, not with the
    import ssl  # config, which imports this module for PROTOCOLS

PROTOCOLS = ("auto", "5", "3.1.1")
# The CONNACK reason paho reports for a refused protocol version (MQTT 5 0x84; a 3.1.1
# broker's return code 1 is mapped to the same reason code).
UNSUPPORTED_PROTOCOL_VERSION = 0x84


# the broker's address and login, as shared.mqtturl reads it (one grammar with the fleet's)
BrokerAddress = MqttUrl


class TlsOptions(msgspec.Struct, frozen=True):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip the host name check only

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 or newer, chain and (unless insecure) host name checked."""
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        if self.insecure:
            ctx.check_hostname = False
        return ctx


def describe_connect_error(exc: BaseException | None, address: BrokerAddress,
                           tls: TlsOptions | None) -> str:
    """One line that says what went wrong and what to check."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = f"mqtt.ca_file {tls.ca_file}" if tls and tls.ca_file else "the system CA store"
        return (f"TLS: the certificate of {address.url} was refused ({exc.verify_message}); "
                f"it must be signed by a CA in {ca} and name host {address.host!r}")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {address.url} failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"{address.url} refused the TCP connection (broker down or wrong port)"
    if isinstance(exc, OSError):
        return f"cannot reach {address.url}: {exc.strerror or exc}"
    return f"cannot connect to {address.url}: {exc}"


class _TlsSettings(Protocol):  # read-only: an [mqtt] config section is a frozen Struct
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def cert_file(self) -> Path | None: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def tls_insecure(self) -> bool: ...


def mqtt_tls(config: _TlsSettings) -> TlsOptions:
    """The TLS options of an ``[mqtt]`` config section (used only with an mqtts:// URL)."""
    return TlsOptions(ca_file=config.ca_file, cert_file=config.cert_file,
                      key_file=config.key_file, insecure=config.tls_insecure)
