"""The dashboard in headless Chromium against the real demo scenario: a fleet process, agent
processes with traffic, a healthy rollout and a faulty one that the fleet rolls back at the
canary. The page is opened while the faulty rollout runs, with a read-scoped token in the URL
fragment, and must show the rollback (its reason sentence), the devices with their releases
and the health chart, without a console error.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package (no
``playwright install``: the system browser is used). Set EDGEFLEET_DOCS_SCREENSHOT=docs/dashboard.png
to refresh the screenshot in the docs.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.demo.processes import wait_until
from fleet.demo.scenario import MODEL, DemoConfig, DemoFleet, healthy_spec, staged_spec

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (Debian package 'chromium')")
    pytest.importorskip("playwright", reason="pip install playwright (the dev extra has it)")
    return CHROMIUM


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoFleet]:
    lines: list[str] = []
    fleet = DemoFleet(DemoConfig(workdir=tmp_path / "demo", agents=3, narrate=lines.append))
    try:
        yield fleet
    finally:
        fleet.stop()


def _faulty_rollout(demo: DemoFleet) -> tuple[dict[str, Any], int]:
    """Roll r1 everywhere, then start (not wait for) the staged faulty r2; its id."""
    v1, v2 = demo.bring_up()
    first = demo.rollout(healthy_spec(v1["id"]))
    assert first["state"] == "succeeded", first
    second = demo.check(demo.http.post("/api/v1/rollouts", json=staged_spec(v2["id"], demo.cfg.bake_seconds)))
    demo.check(demo.http.post(f"/api/v1/rollouts/{second['id']}/start"))
    return v1, int(second["id"])


@pytest.mark.long
def test_dashboard_shows_the_rollback(demo: DemoFleet, chromium: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    t0 = time.monotonic()
    v1, rid = _faulty_rollout(demo)
    token = demo.check(demo.http.post("/api/v1/tokens", json={"name": "dashboard test", "scopes": ["read"]}))
    problems: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def on_console(message: Any) -> None:
                if message.type == "error":
                    problems.append(f"console error: {message.text} at {message.location}")

            page.on("console", on_console)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(f"{demo.fleet_url}/#token={token['token']}")  # through the redirect of /
            assert page.url == f"{demo.fleet_url}/dashboard", "the token must leave the address bar"

            # The faulty rollout, seen running first, turns rolled back with its reason sentence.
            row = page.locator(f'tr.rollout-row[data-rollout-id="{rid}"]')
            expect(row).to_be_visible(timeout=20_000)
            expect(row).to_have_attribute("data-state", "rolled_back", timeout=120_000)
            status = demo.check(demo.http.get(f"/api/v1/rollouts/{rid}"))
            reason = status["reason"]
            assert status["state"] == "rolled_back" and "canary" in reason and "error" in reason, status
            expect(page.locator(f'td.reason[data-rollout-id="{rid}"]')).to_have_text(reason, timeout=10_000)
            expect(page.locator("#rollout-reason")).to_have_text(reason, timeout=10_000)
            expect(page.locator("#rollout-title")).to_contain_text(f"Rollout {rid}")
            expect(page.locator("#history li.ev-gate_failed")).to_have_count(1)
            expect(page.locator("#history li.ev-rolled_back")).to_have_count(1)
            expect(page.locator("#gates tbody tr td .badge.fail")).not_to_have_count(0)
            stage_states = page.locator("#stages .stage .stage-head .badge").all_inner_texts()
            assert stage_states[1:] == ["pending", "pending"], stage_states

            # Devices: every one listed, with the release it reports, once all serve a healthy one.
            healthy = {v1["release"]} | {
                b["release"] for b in demo.check(demo.http.get("/api/v1/bundles"))
                if b.get("reissue_of") == v1["release"]
            }
            wait_until(
                lambda: all(r in healthy for r in demo.serving().values()), timeout=60,
                what=f"every device to serve one of {sorted(healthy)}",
            )

            def page_matches_api() -> bool:
                api = {d["device_id"]: d["models"].get(MODEL, {}).get("release")
                       for d in demo.check(demo.http.get("/api/v1/devices"))}
                shown = {
                    r.get_attribute("data-device-id"): r.locator("td.release").inner_text()
                    for r in page.locator(f'tr.device-row[data-model="{MODEL}"]').all()
                }
                return set(shown) == set(demo.agents) and all(
                    shown[d].split(" ")[0] == f"r{api[d]}" and api[d] in healthy for d in shown
                )

            wait_until(page_matches_api, timeout=30, what="the device table to show the serving releases")
            expect(page.locator("#devices .badge.online")).to_have_count(len(demo.agents))

            # The chart: a line per release with points, and the rollback marked. Wait for the
            # recovery after the rollback to be drawn too (two more buckets).
            def recovered() -> bool:
                health = demo.check(demo.http.get(f"/api/v1/rollouts/{rid}/health?bucket_s=5"))
                back = [m["t"] for m in health["markers"] if m["kind"] == "rolled_back"]
                return bool(back) and sum(b["t"] > back[0] for b in health["buckets"]) >= 2

            wait_until(recovered, timeout=30, what="health reports after the rollback")
            page.wait_for_timeout(3500)  # one more refresh of the page
            lines = page.locator("#chart polyline.series")
            assert lines.count() >= 2, "a line per release (the target and the healthy one)"
            counts = [len((p.get_attribute("points") or "").split()) for p in lines.all()]
            assert max(counts) >= 3, counts
            expect(page.locator("#chart line.marker.rolled_back")).to_have_count(1)

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            docs_copy = os.environ.get("EDGEFLEET_DOCS_SCREENSHOT")
            if docs_copy:
                shutil.copyfile(shot, docs_copy)
        finally:
            browser.close()

    assert not problems, problems
    print(f"dashboard test: {time.monotonic() - t0:.1f}s")
