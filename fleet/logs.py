"""Log setup for fleet processes: text lines (default) or JSON lines (``--log-format json``)."""

from __future__ import annotations

import logging

from shared.logformat import JsonFormatter


def configure(log_format: str = "text", *, role: str = "", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        prefix = f"[{role}] " if role else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Every library logger goes through the root handler, so every line is in the chosen format
    for name in PROPAGATED:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn lines too, as records of the "py.warnings" logger


# Loggers that libraries give handlers of their own (uvicorn's log config, Litestar's)
PROPAGATED = ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar", "amqtt")
# Noise at each start: alembic's plugin set-up and "Context impl" lines (the fleet logs the
# migration it made, "database upgraded from A to B"), the embedded broker's per-connection chatter
QUIETED = ("alembic.runtime.plugins", "alembic.runtime.migration", "amqtt")
