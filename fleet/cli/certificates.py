"""``edgefleet device certificates DEVICE`` and ``edgefleet device revoke-certificates
DEVICE`` (docs/deployment.md "Devices with certificates")."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from fleet.cli.operator import _client
from fleet.cli.output import console, print_json


def _path(device_id: str, action: str) -> str:
    return f"/api/v1/devices/{quote(device_id, safe='')}/{action}"


def certificates(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows: list[dict[str, Any]] = client.request("GET", _path(args.device_id, "certificates"))
    if args.json:
        print_json(rows)
        return 0
    out = console()
    if not rows:
        out.print(f"device {args.device_id} holds no certificate (it logs in with a password)")
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row.get("revoked_at") else "valid"
        out.print(f"{row['serial']:<40}  expires {row['not_after']}  {state}")
    return 0


def revoke_certificates(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body: dict[str, Any] = client.request("POST", _path(args.device_id, "certificates/revoke"))
    if args.json:
        print_json(body)
        return 0
    out = console()
    revoked = body.get("revoked") or []
    out.print(f"device {args.device_id}: {len(revoked)} certificate(s) revoked; CRL {body['crl_file']}")
    out.print(f"  broker reloaded: {'yes' if body.get('broker_reloaded') else 'no'}; "
              f"live session ended: {'yes' if body.get('disconnected') else 'no'}")
    if revoked:
        out.print("  the device is asked to rotate: it makes a new key and gets a new certificate "
                  "(to cut it off, 'edgefleet device revoke')")
    return 0
