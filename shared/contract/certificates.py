"""POST /api/v1/devices/{id}/certificate: a device's certificate signing request and the answer.

The device makes its key and a CSR (agent.identity.certificate); the fleet's device CA
checks and signs it (fleet.identity.ca, fleet.api.certificates). docs/deployment.md,
"Devices with certificates".
"""

from __future__ import annotations

import msgspec


class CertificateRequest(msgspec.Struct, forbid_unknown_fields=True):
    csr: str  # PEM, "-----BEGIN CERTIFICATE REQUEST-----"


class CertificateAnswer(msgspec.Struct):
    device_id: str
    serial: str
    certificate: str  # PEM
    ca_certificate: str  # PEM, the device CA (the broker's cafile for devices)
    # the fleet's clock (UNIX seconds): the device moves them onto its own (HTTP Date)
    not_after_ts: float
    renew_after_ts: float
    # the same two times as RFC 3339 text, for people; fleets before them sent none
    not_after: str = ""
    renew_after: str = ""
