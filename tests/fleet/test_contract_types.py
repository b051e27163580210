"""Every HTTP document between fleet and agent is one type of shared/contract that both sides
use, and what the real fleet sends holds no field outside its type."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from fleet_support import ENROLL, serve_fleet

import agent.fleet_client as agent_side
import agent.identity.certificate as agent_certificates
import fleet.api.certificates as fleet_certificates
import fleet.api.devices as fleet_devices
import fleet.api.trust as fleet_trust
import fleet.rollout.shadow as fleet_shadow
from fleet.db.engine import make_engine, session_scope
from fleet.db.models import Bundle
from fleet.rollout.assignments import set_assignment
from fleet.settings import Settings
from shared.contract import certificates, desired, enrollment


def test_both_sides_use_the_shared_types() -> None:
    assert agent_side.DesiredState is desired.DesiredState
    assert agent_side.DesiredEntry is desired.DesiredEntry
    assert agent_side.DesiredShadow is desired.DesiredShadow is fleet_shadow.DesiredShadow
    assert fleet_devices.DesiredState is desired.DesiredState
    assert agent_side.EnrollRequest is fleet_devices.EnrollRequest is enrollment.EnrollRequest
    assert agent_side.EnrollResponse is fleet_devices.EnrollResponse is enrollment.EnrollResponse
    assert agent_side.RootsPage is fleet_trust.RootsPage is enrollment.RootsPage
    assert agent_certificates.CertificateAnswer is fleet_certificates.CertificateAnswer
    assert agent_certificates.CertificateRequest is fleet_certificates.CertificateRequest
    assert fleet_certificates.CertificateAnswer is certificates.CertificateAnswer


def _outside(doc: Any, tp: type[msgspec.Struct], at: str = "$") -> list[str]:
    """Paths of the keys of ``doc`` that ``tp`` (and its nested Structs) does not declare."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
    out = [f"{at}.{k}" for k in doc if k not in fields]
    nested = {"models": desired.DesiredEntry, "shadow": desired.DesiredShadow}
    for key, inner in nested.items():
        value = doc.get(key)
        if key in fields and isinstance(value, list):
            for i, item in enumerate(value):
                out += _outside(item, inner, f"{at}.{key}[{i}]")
        elif key in fields and isinstance(value, dict):
            out += _outside(value, inner, f"{at}.{key}")
    return out


@pytest.fixture
def fleet_url(settings: Settings) -> Iterator[str]:
    with serve_fleet(settings) as url:
        yield url


def test_what_the_fleet_sends_is_all_in_the_types(fleet_url: str, settings: Settings, tmp_path: Path) -> None:
    with httpx.Client(timeout=10) as http:
        enrolled = http.post(f"{fleet_url}/api/v1/devices/enroll",
                             json=msgspec.to_builtins(enrollment.EnrollRequest("typed-1", ENROLL)))
        assert enrolled.status_code == 201, enrolled.text
        assert _outside(enrolled.json(), enrollment.EnrollResponse) == []
        engine = make_engine(settings.database_url)
        try:
            with session_scope(engine) as session:
                bundle = Bundle(name="detector", release=3, version="1.0.3", digest=f"{3:064x}",
                                envelope=b"{}", created="2026-01-01T00:00:00Z",
                                expires="2036-01-01T00:00:00Z", files={})
                session.add(bundle)
                session.flush()
                assert bundle.id is not None
                set_assignment(session, "typed-1", "detector", bundle.id, None)
        finally:
            engine.dispose()
        auth = {"Authorization": f"Bearer {enrolled.json()['credential']}"}
        answer = http.get(f"{fleet_url}/api/v1/devices/typed-1/desired", headers=auth)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
        doc = answer.json()
        assert [m["release"] for m in doc["models"]] == [3]
        assert _outside(doc, desired.DesiredState) == []
        client = agent_side.FleetClient(url=fleet_url, device_id="typed-1", enrollment_token=ENROLL,
                                        labels={}, state_dir=tmp_path, client=http)
        assert client.parse_desired(answer.content).models[0].digest == f"{3:064x}"
