"""Fleet test fixtures: keys, a database per test (SQLite, and PostgreSQL when
EDGEFLEET_TEST_POSTGRES_URL is set), and the app over real HTTP (Litestar TestClient)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from fleet.app import create_app
from fleet.db.engine import temporary_schema
from fleet.settings import Settings
from shared.bundle.keyring import Keyring, init_keyring

sys.path.insert(0, str(Path(__file__).parent))  # fleet_support, shared by the test modules
from fleet_support import ADMIN, ENROLL

PG_ENV = "EDGEFLEET_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return init_keyring(tmp_path_factory.mktemp("keys") / "keys")


def _pg_schema_url(base: str) -> Iterator[str]:
    with temporary_schema(base, "t") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"set {PG_ENV}=postgresql://postgres@127.0.0.1:5432/test to run on PostgreSQL")
    yield from _pg_schema_url(base)


@pytest.fixture
def settings(tmp_path: Path, db_url: str, keyring: Keyring) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        keys_dir=keyring.directory,
        admin_token=ADMIN,
        enrollment_token=ENROLL,
        run_ingester=False,
        run_controller=False,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(settings)) as c:
        yield c
