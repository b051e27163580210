"""``edgefleet token create|list|revoke``: operator API tokens (needs an admin token)."""

from __future__ import annotations

import argparse
from typing import Any

from fleet.cli.listing import show_list
from fleet.cli.operator import _client
from fleet.cli.output import CliError, console, print_json

SCOPES = ("read", "deploy", "admin")


def _scopes(text: str) -> list[str]:
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCOPES]
    if not wanted or unknown:
        raise CliError(f"--scope {text!r}: a comma list of {', '.join(SCOPES)}")
    return wanted


def create(args: argparse.Namespace) -> int:
    scopes = _scopes(args.scope)
    with _client(args) as client:
        body = {"scopes": scopes, "name": args.name}
        info: dict[str, Any] = client.request("POST", "/api/v1/tokens", json=body)
    if args.json:
        print_json(info)
        return 0
    out = console()
    out.print(f"token {info['id']} ({', '.join(info['scopes'])}) created. It is shown only this once:")
    print(info["token"])  # plain, so it can be piped
    return 0


def list_tokens(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tokens: list[dict[str, Any]] = client.request("GET", "/api/v1/tokens")
    return show_list(args, tokens, _token_row, "no tokens (the bootstrap admin token is not listed)")


def _token_row(t: dict[str, Any]) -> str:
    state = f"revoked {t['revoked_at']}" if t.get("revoked_at") else "active"
    return f"{t['id']:>4}  {','.join(t['scopes']):<18} {state:<30} {t.get('name') or ''}"


def revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info: dict[str, Any] = client.request("DELETE", f"/api/v1/tokens/{args.id}")
    console().print(f"token {info['id']} revoked at {info['revoked_at']}")
    return 0
