"""The certificate broker config keeps in step with the password one: the same limits,
persistence and logging (only the device listener differs). The broker itself runs it in
tests/e2e/test_device_certificates.py."""

from __future__ import annotations

from pathlib import Path

MOSQUITTO = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto"


def _settings(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _global(text: str) -> list[str]:
    """Everything after the listeners (from 'persistence' on)."""
    lines = _settings(text)
    return lines[next(i for i, ln in enumerate(lines) if ln.startswith("persistence ")):]


def _listener(text: str, port: str) -> list[str]:
    lines = _settings(text)
    start = lines.index(f"listener {port}")
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith(("listener ", "persistence "))), len(lines))
    return lines[start:end]


def test_same_limits_and_fleet_listener_as_the_password_config() -> None:
    certs = (MOSQUITTO / "edgefleet-certificates.conf").read_text()
    passwords = (MOSQUITTO / "edgefleet-production.conf").read_text()
    assert _global(certs) == _global(passwords)
    assert _listener(certs, "8884") == _listener(passwords, "8884")
    devices = _listener(certs, "8883")
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", "acl_file /etc/mosquitto/edgefleet.acl"):
        assert line in devices, line
    assert not any(ln.startswith("password_file") for ln in devices)  # no device password here
    assert any(ln.startswith("crlfile ") for ln in devices)
