"""``edgefleet db upgrade|current``: the database schema, managed by Alembic."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.cli.output import CliError, console

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


def _url(args: argparse.Namespace) -> str:
    from fleet.settings import Settings

    settings = Settings.from_env(
        database_url=args.database_url, data_dir=Path(args.data_dir) if args.data_dir else None
    )
    if settings.database_url is None:
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    return settings.resolved_database_url()


def _engine(args: argparse.Namespace) -> tuple[Engine, str]:
    from sqlalchemy.exc import SQLAlchemyError

    from fleet.db.engine import describe, make_engine

    url = _url(args)
    try:
        return make_engine(url, create=False), describe(url)
    except (SQLAlchemyError, ValueError) as exc:
        raise CliError(f"cannot use the database {describe(url)}: {exc}") from None


def upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from fleet.db.migrations import upgrade as do_upgrade

    engine, where = _engine(args)
    try:
        before, after = do_upgrade(engine)
    except SQLAlchemyError as exc:
        raise CliError(f"upgrading {where} failed: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()
    if before == after:
        console().print(f"{where}: already at the newest schema ({after})")
    else:
        console().print(f"{where}: upgraded from {before or 'an empty database'} to {after}")
    return 0


def current(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from fleet.db.migrations import current_revision, head_revision

    engine, where = _engine(args)
    try:
        rev = current_revision(engine)
    except SQLAlchemyError as exc:
        raise CliError(f"reading {where} failed: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()
    head = head_revision()
    note = "newest" if rev == head else f"newest is {head}; run 'edgefleet db upgrade'"
    console().print(f"{where}: schema revision {rev or 'none (empty)'} ({note})")
    return 0
