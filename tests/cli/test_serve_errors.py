"""``edgefleet serve`` that cannot start says why in one line naming the address or URL at
fault, with no traceback (a traceback only with ``--debug``)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Result


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(cli: Callable[..., Result], tmp_path: Path, *args: str) -> Result:
    return cli("serve", "--data-dir", str(tmp_path / "data"), *args, timeout=60)  # type: ignore[no-any-return]


def test_api_port_in_use_names_the_address(cli: Callable[..., Result], tmp_path: Path,
                                           taken_port: int) -> None:
    r = _serve(cli, tmp_path, "--port", str(taken_port), "--mqtt-port", str(_free()))
    r.assert_clean_error(f"cannot listen for the fleet API on 127.0.0.1:{taken_port}: the address is "
                         "already in use")
    assert "--port" in r.err and "Errno" not in r.err


def test_broker_port_in_use_names_the_address(cli: Callable[..., Result], tmp_path: Path,
                                               taken_port: int) -> None:
    r = _serve(cli, tmp_path, "--port", str(_free()), "--mqtt-port", str(taken_port))
    r.assert_clean_error(f"embedded MQTT broker on 127.0.0.1:{taken_port}: the address is already in use")
    assert "--mqtt-url" in r.err


def test_unsupported_database_url_names_the_supported_ones(cli: Callable[..., Result],
                                                           tmp_path: Path) -> None:
    r = _serve(cli, tmp_path, "--port", str(_free()), "--database-url", "mysql://fleet@db/fleet")
    r.assert_clean_error("database URL scheme 'mysql' is not supported; use one of sqlite, postgresql")


def test_database_down_is_one_sentence_and_debug_shows_the_traceback(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    url = f"postgresql://fleet@127.0.0.1:{_free()}/fleet"  # nothing listens there
    args = ("--port", str(_free()), "--mqtt-port", str(_free()), "--database-url", url)
    r = _serve(cli, tmp_path, *args)
    r.assert_clean_error("cannot use the database postgresql+psycopg://fleet@127.0.0.1:")
    assert "Connection refused" in r.err
    debug = _serve(cli, tmp_path, *args, "--debug")
    assert debug.code != 0 and "Traceback" in debug.err and "StartError" in debug.err
