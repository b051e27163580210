"""Alembic environment: runs on the connection handed in by ``fleet.db.migrations.upgrade``,
or on ``EDGEFLEET_DATABASE_URL`` when the alembic command line is used."""

from __future__ import annotations

import os

from alembic import context
from sqlmodel import SQLModel

from fleet.db import models  # noqa: F401  (registers the tables)
from fleet.db.engine import normalize_url

config = context.config
target_metadata = SQLModel.metadata


def run_with(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_with(connection)
else:
    from sqlalchemy import create_engine

    url = os.environ.get("EDGEFLEET_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set EDGEFLEET_DATABASE_URL to the database to migrate")
    engine = create_engine(normalize_url(url))
    with engine.begin() as conn:
        run_with(conn)
