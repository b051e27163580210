"""Alembic migrations of the fleet database.

``upgrade(engine)`` brings a database to the newest revision; ``edgefleet serve`` calls it
on start and ``edgefleet db upgrade`` on demand. A database made before migrations existed
(tables from ``create_all``, no ``alembic_version``) is stamped with the initial revision
first, then upgraded. New revisions: ``alembic -c fleet/db/migrations/alembic.ini revision
--autogenerate -m "what"`` with ``EDGEFLEET_DATABASE_URL`` pointing at a database at head.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
INITIAL_REVISION = "0001"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(HERE / "versions"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade the database to ``revision``; returns (revision before, revision after).

    On PostgreSQL the upgrade holds an advisory lock, so several fleet processes starting
    at once migrate one after the other (the later ones find the work done)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7352100001)")
        before = MigrationContext.configure(conn).get_current_revision()
        if before is None and inspect(conn).has_table("device"):
            log.info("database has tables but no migration history: stamping %s", INITIAL_REVISION)
            command.stamp(alembic_config(conn), INITIAL_REVISION)
        command.upgrade(alembic_config(conn), revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        log.info("database upgraded from %s to %s", before or "empty", after)
    return before, after or ""
