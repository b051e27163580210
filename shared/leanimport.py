"""msgspec imported without typing_extensions, for the agent's start (issue 19).

msgspec (``_utils``) takes ``get_type_hints``, ``Required`` and ``NotRequired`` from
typing_extensions when it is installed (the device venv has it for anyio, httpx's), else
typing's. On Python 3.11+ they are the same: msgspec always asks for
``include_extras=True``, for which typing_extensions returns typing's result as is, and its
``Required``/``NotRequired`` are typing's (tests/agent/test_cli.py checks it on the structs a
start decodes). Its import is ~1.5 ms of a start; ``edgefleet bundle verify`` does the same
(fleet.cli.bundle). The block holds only while msgspec loads, and only when neither module is
loaded yet: whatever imports typing_extensions later (httpx for a fleet-connected agent) gets it.
While it holds, an import of typing_extensions fails in every thread: call it before the process
starts threads that import (the agent's start; the verify command, whose hasher imports nothing).
"""

from __future__ import annotations

import sys


def import_msgspec_without_typing_extensions() -> None:
    if sys.version_info < (3, 11) or "msgspec" in sys.modules or "typing_extensions" in sys.modules:
        return
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]  # its import raises ImportError
    try:
        import msgspec  # noqa: F401
    except ImportError:
        pass  # a msgspec that needs it: imported as usual by the caller
    finally:
        del sys.modules["typing_extensions"]
