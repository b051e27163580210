"""Alembic migrations: the migrated schema equals the models (SQLite and PostgreSQL), a
database made by create_all before migrations is adopted, downgrade and upgrade again,
and the ``edgefleet db`` commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from fleet.cli.main import main
from fleet.db.engine import make_engine
from fleet.db.migrations import alembic_config, current_revision, head_revision, upgrade


def schema_diff(engine) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, SQLModel.metadata)


def test_migrated_schema_equals_the_models(db_url: str) -> None:
    engine = make_engine(db_url, create=False)
    try:
        assert current_revision(engine) is None
        before, after = upgrade(engine)
        assert (before, after) == (None, head_revision())
        assert schema_diff(engine) == [], "run the migration autogenerate: models and migrations differ"
        assert upgrade(engine) == (after, after)  # idempotent
    finally:
        engine.dispose()


def test_downgrade_to_nothing_and_back(db_url: str) -> None:
    from alembic import command

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_database_from_before_migrations_is_adopted(db_url: str) -> None:
    """Tables of the first release (revision 0001) made by create_all, no alembic_version."""
    from alembic import command

    engine = make_engine(db_url, create=False)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
            conn.exec_driver_sql("DROP TABLE alembic_version")
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_db_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "current", "--data-dir", str(tmp_path)]) == 0
    assert "none (empty)" in capsys.readouterr().out
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert f"to {head_revision()}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert "already at the newest" in capsys.readouterr().out
    assert main(["db", "upgrade", "--database-url", "nosuchdb://x"]) == 1
