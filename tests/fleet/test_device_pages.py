"""GET /api/v1/devices in pages: order, the next link, bounds, and the CLI client walking them."""

from __future__ import annotations

from typing import Any

import httpx
from fleet_support import admin, enroll
from litestar.testing import TestClient

from fleet.cli.client import FleetClient


def test_pages_walk_every_device_once_in_id_order(client: TestClient[Any]) -> None:
    ids = [f"edge-{i:02d}" for i in (5, 1, 4, 2, 3)]
    for device_id in ids:
        enroll(client, device_id)
    seen: list[str] = []
    url: str | None = "/api/v1/devices?limit=2"
    pages = 0
    while url:
        r = client.get(url, headers=admin())
        assert r.status_code == 200, r.text
        seen += [d["device_id"] for d in r.json()]
        pages += 1
        link = r.headers.get("link")
        url = link[1:link.index(">")] if link else None
    assert seen == sorted(ids)
    assert pages == 3  # 2 + 2 + 1: the short last page has no next link
    everything = client.get("/api/v1/devices", headers=admin()).json()
    assert [d["device_id"] for d in everything] == sorted(ids)  # no limit: all of them, as before


def test_limit_out_of_bounds_is_a_clear_400(client: TestClient[Any]) -> None:
    for bad in ("0", "1001", "-3"):
        r = client.get(f"/api/v1/devices?limit={bad}", headers=admin())
        assert r.status_code == 400 and "limit" in r.text, r.text


def test_cli_client_follows_pages(client: TestClient[Any]) -> None:
    for i in range(7):
        enroll(client, f"dev-{i}")

    def handler(request: httpx.Request) -> httpx.Response:
        r = client.get(str(request.url.raw_path, "ascii"), headers=dict(request.headers))
        return httpx.Response(r.status_code, content=r.content, headers={"content-type": "application/json"})

    fc = FleetClient("http://fleet.test", token=admin()["Authorization"].split()[1],
                     transport=httpx.MockTransport(handler))
    try:
        assert [d["device_id"] for d in fc.list_devices(page_size=3)] == [f"dev-{i}" for i in range(7)]
    finally:
        fc.close()
