"""The shape every list command shares: the collection as JSON with --json, else one line a
row, or a sentence when it is empty."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fleet.cli.output import console, print_json


def show_list(args: argparse.Namespace, items: list[dict[str, Any]],
              row: Callable[[dict[str, Any]], str], empty: str) -> int:
    """``--json`` prints ``items`` whole, else ``row(item)`` a line, or ``empty``."""
    if args.json:
        print_json(items)
        return 0
    out = console()
    if not items:
        out.print(empty)
    for item in items:
        out.print(row(item))
    return 0
