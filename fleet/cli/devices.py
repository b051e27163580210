"""``edgefleet device show|relabel|revoke|delete|rotate|approve`` and
``edgefleet enrollment-token create|list|revoke`` (docs/install.md "Devices: enroll, rotate,
revoke"). ``device list`` is in fleet.cli.operator."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from fleet.cli.listing import show_list
from fleet.cli.operator import _client
from fleet.cli.output import CliError, console, print_json


def _path(device_id: str, action: str = "") -> str:
    return f"/api/v1/devices/{quote(device_id, safe='')}" + (f"/{action}" if action else "")


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"label {pair!r}: write KEY=VALUE")
        labels[key] = value
    return labels


def _print_device(args: argparse.Namespace, device: dict[str, Any], verb: str) -> int:
    if args.json:
        print_json(device)
        return 0
    labels = ", ".join(f"{k}={v}" for k, v in sorted((device.get("labels") or {}).items())) or "-"
    status = device.get("status", "?")
    console().print(f"device {device['device_id']} {verb}: status {status}, labels {labels}")
    return 0


def show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        device: dict[str, Any] = client.request("GET", _path(args.device_id))
    if args.json:
        print_json(device)
        return 0
    out = console()
    out.print(f"device {device['device_id']}: {device.get('status', '?')}")
    for key in ("labels", "online", "last_seen", "enrolled_at", "agent_version", "revoked_at",
                "reenroll_requested_at", "reenroll_approved_until", "rotation_requested_at"):
        value = device.get(key)
        if value not in (None, "", {}):
            out.print(f"  {key}: {value}")
    return 0


def relabel(args: argparse.Namespace) -> int:
    labels = _labels(args.labels)
    with _client(args) as client:
        if args.merge:
            current = client.request("GET", _path(args.device_id)).get("labels") or {}
            labels = {**current, **labels}
        for key in args.remove or []:
            labels.pop(key, None)
        device = client.request("PUT", _path(args.device_id, "labels"), json={"labels": labels})
    return _print_device(args, device, "relabelled")


def revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        device = client.request("POST", _path(args.device_id, "revoke"))
    return _print_device(args, device, "revoked (its fleet and broker credentials no longer work)")


def delete(args: argparse.Namespace) -> int:
    if not args.yes:
        raise CliError(f"deleting {args.device_id} drops its record and assignments; add --yes")
    with _client(args) as client:
        body = client.request("DELETE", _path(args.device_id))
    if args.json:
        print_json(body)
    else:
        console().print(f"device {args.device_id} deleted; its id may enroll again as a new device")
    return 0


def rotate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.all:
            body = client.request("POST", "/api/v1/devices/rotate")
            if args.json:
                print_json(body)
            else:
                console().print(f"{body['requested']} devices asked to rotate their credentials "
                                "(each does on its next pull; old credentials overlap)")
            return 0
        if not args.device_id:
            raise CliError("name a device, or --all")
        device = client.request("POST", _path(args.device_id, "rotate"))
    return _print_device(args, device, "asked to rotate its credentials on its next pull")


def approve(args: argparse.Namespace) -> int:
    with _client(args) as client:
        device = client.request("POST", _path(args.device_id, "approve"), json={"valid_s": args.valid_s})
    verb = f"may re-enroll once with an enrollment token within {args.valid_s:g} s"
    return _print_device(args, device, verb)


# -- enrollment tokens ------------------------------------------------------------------


def token_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.expires_in is not None:
        body["expires_in_s"] = args.expires_in
    if args.max_uses is not None:
        body["max_uses"] = args.max_uses
    with _client(args) as client:
        made: dict[str, Any] = client.request("POST", "/api/v1/enrollment-tokens", json=body)
    if args.json:
        print_json(made)
        return 0
    info = made["info"]
    limits = [f"expires {info['expires_at']}" if info.get("expires_at") else "no expiry",
              f"{info['max_uses']} uses" if info.get("max_uses") else "unlimited uses"]
    console().print(f"enrollment token {info['id']} created ({', '.join(limits)}). Shown only this once:")
    print(made["token"])  # plain, so it can be piped
    return 0


def token_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tokens: list[dict[str, Any]] = client.request("GET", "/api/v1/enrollment-tokens")
    return show_list(args, tokens, _enrollment_token_row,
                     "no enrollment tokens (the one of the fleet's settings is not listed)")


def _enrollment_token_row(t: dict[str, Any]) -> str:
    state = f"revoked {t['revoked_at']}" if t.get("revoked_at") else (
        f"expires {t['expires_at']}" if t.get("expires_at") else "active")
    uses = f"{t['uses']}/{t['max_uses']}" if t.get("max_uses") else f"{t['uses']}/-"
    return f"{t['id']:>4}  uses {uses:<10} {state:<34} {t.get('name') or ''}"


def token_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info: dict[str, Any] = client.request("DELETE", f"/api/v1/enrollment-tokens/{args.id}")
    console().print(f"enrollment token {info['id']} revoked at {info['revoked_at']} "
                    "(enrolled devices are not affected)")
    return 0
