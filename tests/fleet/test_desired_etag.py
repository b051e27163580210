"""Conditional desired-state polls over real HTTP (uvicorn on a loopback port): the fleet
answers with an ETag and a bodiless 304 to a matching If-None-Match; the agent's
FleetClient sends the ETag it holds and keeps its state on a 304."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fleet_support import ENROLL, serve_fleet

from agent.fleet_client import FleetClient
from fleet.api.devices import etag_matches
from fleet.db.engine import make_engine, session_scope
from fleet.db.models import Bundle
from fleet.rollout.assignments import set_assignment
from fleet.settings import Settings


@pytest.fixture
def fleet_url(settings: Settings) -> Iterator[str]:
    with serve_fleet(settings) as url:
        yield url


def _assign(settings: Settings, device_id: str, release: int) -> None:
    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            bundle = Bundle(name="detector", release=release, version=f"1.0.{release}",
                            digest=f"{release:064x}", envelope=b"{}", created="2026-01-01T00:00:00Z",
                            expires="2036-01-01T00:00:00Z", files={})
            session.add(bundle)
            session.flush()
            assert bundle.id is not None
            set_assignment(session, device_id, "detector", bundle.id, None)
    finally:
        engine.dispose()


def test_poll_is_conditional_and_a_change_gets_through(fleet_url: str, settings: Settings,
                                                        tmp_path: Path) -> None:
    seen: list[tuple[int, int, str | None]] = []  # (status, body bytes, If-None-Match sent)

    def record(response: httpx.Response) -> None:
        response.read()
        seen.append((response.status_code, len(response.content),
                     response.request.headers.get("if-none-match")))

    http = httpx.Client(timeout=10, event_hooks={"response": [record]})
    client = FleetClient(url=fleet_url, device_id="etag-1", enrollment_token=ENROLL, labels={},
                         state_dir=tmp_path, client=http)
    try:
        first = client.desired()
        assert first.models == [] and first.generation == 0
        assert seen[-1][0] == 200 and seen[-1][2] is None
        again = client.desired()  # server_time differs, the ETag does not
        assert again == first
        assert seen[-1][:2] == (304, 0) and seen[-1][2] is not None
        etag = seen[-1][2]

        _assign(settings, "etag-1", 1)
        changed = client.desired()
        assert [(m.name, m.release) for m in changed.models] == [("detector", 1)]
        assert changed.generation == 1
        assert seen[-1][0] == 200 and seen[-1][2] == etag  # sent the old tag, got the new state
        assert client.desired() == changed
        assert seen[-1][:2] == (304, 0) and seen[-1][2] != etag

        # The header as RFC 9110 has it: weak comparison, lists, "*"; a stale tag gets the body.
        url = f"{fleet_url}/api/v1/devices/etag-1/desired"
        auth = client.auth_headers()
        current = http.get(url, headers=auth).headers["etag"]
        for header, status in ((current, 304), (f"W/{current}", 304), (f'"nope", {current}', 304),
                               ("*", 304), (etag, 200), ('"nope"', 200)):
            r = http.get(url, headers={**auth, "If-None-Match": header})
            assert (header, r.status_code) == (header, status)
            assert r.headers["etag"] == current
        # Without the credential a matching tag reveals nothing.
        assert http.get(url, headers={"If-None-Match": current}).status_code == 401
    finally:
        http.close()


@pytest.mark.parametrize(
    ("header", "match"),
    [(None, False), ("", False), ('"a"', True), ('W/"a"', True), ('"b", "a"', True), ("*", True),
     ('"b"', False), ("a", False)],
)
def test_etag_matches(header: str | None, match: bool) -> None:
    assert etag_matches(header, '"a"') is match
