"""The one grammar of a broker URL, read by the agent (config, reporter) and the fleet (settings).

    mqtt://[user[:password]@]host[:port]    plain TCP, port 1883 by default
    mqtts://[user[:password]@]host[:port]   TLS, port 8883 by default

User and password are percent-decoded. Anything else is refused with ``BadMqttUrl``, which
names the URL and what is wrong with it.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import msgspec

from shared.errors import MalformedDocumentError

# scheme -> TLS
SCHEMES = {"mqtt": False, "mqtts": True}
DEFAULT_PORTS = {False: 1883, True: 8883}


class BadMqttUrl(MalformedDocumentError, ValueError):
    """A broker URL off the grammar (a ValueError too: callers that predate it catch that)."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"MQTT URL {url!r} {problem}")
        self.url = url
        self.problem = problem


class MqttUrl(msgspec.Struct, frozen=True):
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """The URL without credentials, for logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise BadMqttUrl(url, "must be a URL mqtt://host[:port] or mqtts://host[:port]")
    tls = SCHEMES[parts.scheme]
    try:
        port = parts.port or DEFAULT_PORTS[tls]
    except ValueError:
        raise BadMqttUrl(url, "has a bad port (1-65535)") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return MqttUrl(parts.hostname, port, tls, user, password)
