"""Trust roots online: the fleet serves its root chain (keys_dir/roots) and names the newest
version in the desired state; a real agent walks its pinned root forward link by link, each
link verified against the root it holds, then installs a bundle only the new root trusts.
A forged or tampered link served by the fleet is refused and the agent keeps its root."""

from __future__ import annotations

import base64
import logging
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from fleet_support import ADMIN, ENROLL, admin, bearer, enroll, serve_fleet
from litestar.testing import TestClient

from agent.config import parse_config
from agent.main import Agent, load_trust_root
from agent.update.lifecycle import UpdateState
from fleet.api import trust as fleet_trust
from fleet.app import create_app
from fleet.bundles.build import build_bundle
from fleet.db.engine import make_engine, session_scope
from fleet.demo.models import golden_inputs, write_classifier
from fleet.rollout.assignments import set_assignment
from fleet.settings import Settings
from shared.bundle.archive import ENVELOPE_NAME
from shared.bundle.keyring import delegate, init_keyring, load_keyring, rotate_root
from shared.bundle.trust import TrustRoot
from shared.errors import SignatureError

from ..waiting import wait_for

DEVICE = "rot-1"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A keyring of this test only (rotating the session one would change other tests)."""
    ring = init_keyring(tmp_path / "keys", root_keys=2, root_threshold=2)
    return ring.directory


@pytest.fixture
def pinned(tmp_path: Path, keys: Path) -> Path:
    """What the device was provisioned with: root v1."""
    path = tmp_path / "device-root.json"
    shutil.copyfile(keys / "root.json", path)
    return path


@pytest.fixture
def settings(tmp_path: Path, db_url: str, keys: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, keys_dir=keys, admin_token=ADMIN,
                    enrollment_token=ENROLL, run_ingester=False, run_controller=False,
                    public_mqtt_url="mqtt://127.0.0.1:9")  # no broker: telemetry just fails to connect


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(settings)) as c:
        yield c


def make_agent(tmp_path: Path, url: str, pinned: Path) -> Agent:
    cfg = parse_config({
        "device_id": DEVICE,
        "state_dir": str(tmp_path / "state"),
        "trust_root": str(pinned),
        "api": {"listen": "127.0.0.1:0"},
        "fleet": {"url": url, "enrollment_token": ENROLL, "poll_interval_s": 0.2},
        "update": {"trial_seconds": 0.3},
    })
    return Agent(cfg)


# -- the fleet's side ---------------------------------------------------------------------


def test_fleet_serves_the_chain_and_names_its_newest_root(client: TestClient[Any], keys: Path) -> None:
    cred = enroll(client, DEVICE)
    url = f"/api/v1/devices/{DEVICE}/desired"
    first = client.get(url, headers=bearer(cred))
    assert first.json()["root_version"] == 1
    rotate_root(keys)
    delegate(keys, name="online", models=["*"])
    # The ETag covers root_version: a device holding the old tag gets the new answer.
    again = client.get(url, headers={**bearer(cred), "If-None-Match": first.headers["etag"]})
    assert again.status_code == 200 and again.json()["root_version"] == 3

    r = client.get("/api/v1/trust/roots", params={"after": 1}, headers=bearer(cred))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["latest"] == 3
    served = [base64.b64decode(b) for b in body["roots"]]
    assert served == [(keys / "roots" / f"{v}.root.json").read_bytes() for v in (2, 3)]  # as signed
    assert [TrustRoot.load(b).version for b in served] == [2, 3]
    assert client.get("/api/v1/trust/roots", params={"after": 3}, headers=bearer(cred)).json() == {
        "latest": 3, "roots": []}
    assert len(client.get("/api/v1/trust/roots", headers=bearer(cred)).json()["roots"]) == 3

    # Device credential only; a bad `after` is a 400, not a 500.
    assert client.get("/api/v1/trust/roots").status_code == 401
    assert client.get("/api/v1/trust/roots", headers=bearer("nope")).status_code == 401
    assert client.get("/api/v1/trust/roots", headers=admin()).status_code == 403
    assert client.get("/api/v1/trust/roots", params={"after": -1}, headers=bearer(cred)).status_code == 400


def test_pages_are_bounded_and_contiguous(keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(3):
        rotate_root(keys)
    monkeypatch.setattr(fleet_trust, "MAX_ROOTS_PER_PAGE", 2)
    page = fleet_trust.roots_page(keys, 0)
    assert page.latest == 4 and len(page.roots) == 2
    (keys / "roots" / "3.root.json").unlink()  # a gap: nothing past it is served
    assert len(fleet_trust.roots_page(keys, 1).roots) == 1
    assert fleet_trust.newest_root_version(keys.parent / "elsewhere") is None


class OldEntry(msgspec.Struct):
    name: str


class OldDesiredState(msgspec.Struct):
    """The agent's DesiredState before root_version existed."""

    device_id: str
    generation: int
    models: list[OldEntry]
    server_time: str | float | None = None


def test_no_chain_no_field_and_old_agents_ignore_it(client: TestClient[Any], settings: Settings,
                                                    keys: Path, tmp_path: Path) -> None:
    cred = enroll(client, DEVICE)
    body = client.get(f"/api/v1/devices/{DEVICE}/desired", headers=bearer(cred)).content

    assert b'"root_version":1' in body
    assert msgspec.json.decode(body, type=OldDesiredState).device_id == DEVICE

    shutil.rmtree(keys / "roots")  # a fleet that holds no chain says nothing
    assert "root_version" not in client.get(f"/api/v1/devices/{DEVICE}/desired", headers=bearer(cred)).json()


# -- a real agent against the real fleet -------------------------------------------------------


def _upload_and_assign(url: str, settings: Settings, bundle: Path) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/api/v1/bundles", content=bundle.read_bytes(),
                      headers={**admin(), "Content-Type": "application/octet-stream"})
        assert r.status_code in (200, 201), r.text
        bundle_id = int(r.json()["id"])
        r = http.post("/api/v1/devices/enroll", json={"device_id": DEVICE, "token": ENROLL})
        assert r.status_code == 201, r.text
        # the agent enrolls again with the token alone: an operator approves it beforehand
        r = http.post(f"/api/v1/devices/{DEVICE}/approve", json={"valid_s": 600}, headers=admin())
        assert r.status_code == 200, r.text
    engine = make_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            set_assignment(session, DEVICE, "clf", bundle_id, None)
    finally:
        engine.dispose()


def test_agent_follows_rotation_online_then_installs_bundle_of_new_key(
    settings: Settings, keys: Path, pinned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rotate_root(keys)  # v2: new root keys
    delegate(keys, name="online", models=["*"])  # v3: a new online signing key
    model = tmp_path / "clf.onnx"
    write_classifier(model)
    bundle = tmp_path / "clf.bundle"
    build_bundle(model, name="clf", version="1.1", release=1, keyring=load_keyring(keys), out=bundle,
                 golden_inputs=golden_inputs())
    with tarfile.open(bundle) as tar:
        envelope = tar.extractfile(ENVELOPE_NAME).read()  # type: ignore[union-attr]
    with pytest.raises(SignatureError):  # the device's root v1 does not know the new key
        TrustRoot.load(pinned.read_bytes()).verify_manifest(envelope)

    monkeypatch.setattr(fleet_trust, "MAX_ROOTS_PER_PAGE", 1)  # the agent must page: v2, then v3
    with serve_fleet(settings) as url:
        _upload_and_assign(url, settings, bundle)
        agent = make_agent(tmp_path, url, pinned)
        agent.start()
        try:
            rec = wait_for(lambda: (r := agent.store.load("clf")) and r.state == UpdateState.COMMITTED and r,
                           what="the bundle of the new key to commit")
            assert rec.active.release == 1
            assert agent.trust_root.version == 3 and agent.installer.trust.version == 3
        finally:
            agent.stop()
    # Persisted like `trust update` does: a restart (or the CLI) walks v1 -> v3 from disk.
    stored = sorted(p.name for p in (tmp_path / "state" / "trust").glob("*.root.json"))
    assert stored == ["2.root.json", "3.root.json"]
    link = (tmp_path / "state" / "trust" / "3.root.json").read_bytes()
    assert link == (keys / "roots" / "3.root.json").read_bytes()


def _rogue_v2(tmp_path: Path) -> bytes:
    rogue = init_keyring(tmp_path / "rogue", root_keys=1, root_threshold=1)
    rotate_root(rogue.directory)  # a v2 signed by the rogue's own v1 and v2 keys
    return (rogue.directory / "roots" / "2.root.json").read_bytes()


def _tampered(data: bytes) -> bytes:
    doc = msgspec.json.decode(data)
    original = base64.b64decode(doc["payload"])
    payload = original.replace(b'"threshold":2', b'"threshold":1', 1)
    assert payload != original
    doc["payload"] = base64.b64encode(payload).decode()
    return msgspec.json.encode(doc)


@pytest.mark.parametrize("attack", ["rogue_v2", "tampered_v2", "tampered_v3"])
def test_forged_root_served_by_the_fleet_is_refused(
    attack: str, settings: Settings, keys: Path, pinned: Path, tmp_path: Path,
) -> None:
    rotate_root(keys)
    rotate_root(keys)
    v2, v3 = (keys / "roots" / "2.root.json"), (keys / "roots" / "3.root.json")
    if attack == "rogue_v2":
        v2.write_bytes(_rogue_v2(tmp_path))
    elif attack == "tampered_v2":
        v2.write_bytes(_tampered(v2.read_bytes()))
    else:
        v3.write_bytes(_tampered(v3.read_bytes()))
    keeps = 1  # a page with a bad envelope is refused whole (TrustStore.update checks each first)
    refusals: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda r: refusals.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("agent").addHandler(handler)
    with serve_fleet(settings) as url:
        agent = make_agent(tmp_path, url, pinned)
        agent.start()
        try:
            message = wait_for(lambda: next((m for m in refusals if "REFUSED trust root" in m), None),
                               what="the refusal")
            assert f"keeping trust root v{keeps}" in message
            assert agent.trust_root.version == keeps and agent.installer.trust.version == keeps
        finally:
            agent.stop()
            logging.getLogger("agent").removeHandler(handler)
    trust_dir = tmp_path / "state" / "trust"
    stored = sorted(p.name for p in trust_dir.glob("*.root.json")) if trust_dir.exists() else []
    assert stored == [f"{v}.root.json" for v in range(2, keeps + 1)]
    # The next start walks the same verified chain: nothing forged was kept.
    assert load_trust_root(pinned, tmp_path / "state").version == keeps


def test_fleet_verifies_uploads_against_the_root_as_rotated_while_it_runs(
    client: TestClient[Any], keys: Path
) -> None:
    """`keys rotate` replaces root.json under a running fleet: the next upload check uses it."""
    ctx = client.app.state.ctx
    assert ctx.trust_root().version == 1
    rotate_root(keys)
    delegate(keys, name="online", models=["*"])
    assert ctx.trust_root().version == 3
    assert ctx.trust_root() is ctx.trust_root()  # unchanged file: the loaded root is kept
