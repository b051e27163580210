"""How the CLI talks: one-line errors on stderr, tables and JSON on stdout."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.errors import EdgefleetError
from shared.timeutil import parse_time

if TYPE_CHECKING:
    from rich.console import Console

PROG = "edgefleet"


class CliError(EdgefleetError):
    """A refusal of the CLI itself: a bad argument value, a missing file."""

    code = "usage"


def error(message: str) -> None:
    """Print ``edgefleet: error: <message>`` on one line to stderr."""
    text = " ".join(str(message).split())  # never more than one line
    print(f"{PROG}: error: {text}", file=sys.stderr)


def console(*, stderr: bool = False) -> Console:
    """A rich console; piped output gets a wide fixed width so log lines do not wrap."""
    import os

    from rich.console import Console

    out = Console(highlight=False, soft_wrap=False, stderr=stderr)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out = Console(highlight=False, soft_wrap=False, stderr=stderr, width=160)
    return out


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def ago(value: Any, *, now: datetime | None = None) -> str:
    ts = parse_time(value)
    if ts is None:
        return "never" if value in (None, "") else str(value)
    seconds = ((now or datetime.now(UTC)) - ts).total_seconds()
    if seconds < 0:
        return "just now"
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def labels_text(labels: Any) -> str:
    if isinstance(labels, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"
    return str(labels) if labels else "-"


def figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={figure(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(figure(v) for v in value)
    return "-" if value is None else str(value)
