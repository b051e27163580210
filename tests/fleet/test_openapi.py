"""The OpenAPI document is complete, and a schemathesis run against the app (bounded
examples, with an admin token and without) finds no server error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fleet_support import ADMIN
from hypothesis import HealthCheck, given, settings
from litestar.testing import TestClient

from fleet.app import create_app
from fleet.settings import Settings
from shared.bundle.keyring import Keyring

Client = TestClient[Any]
EXAMPLES = 20  # per operation; about 20 s for the whole API

EXPECTED = {
    ("post", "/api/v1/devices/enroll"), ("get", "/api/v1/devices/{device_id}/desired"),
    ("get", "/api/v1/devices"), ("get", "/api/v1/devices/{device_id}"),
    ("post", "/api/v1/bundles"), ("get", "/api/v1/bundles"), ("get", "/api/v1/bundles/{bundle_id}"),
    ("get", "/api/v1/bundles/{bundle_id}/envelope"), ("get", "/api/v1/blobs/{sha256}"),
    ("post", "/api/v1/rollouts"), ("get", "/api/v1/rollouts"), ("get", "/api/v1/rollouts/{rollout_id}"),
    ("post", "/api/v1/rollouts/{rollout_id}/start"), ("post", "/api/v1/tokens"), ("get", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{token_id}"), ("get", "/api/v1/stats"), ("get", "/api/v1/health/releases"),
    ("get", "/healthz"), ("get", "/metrics"),
}


def test_document_lists_every_route_with_its_errors(client: Client) -> None:
    doc = client.get("/schema/openapi.json").json()
    have = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert have >= EXPECTED, EXPECTED - have
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/api/v1/devices/enroll"]["post"]["security"] == [{}]
    for path, method in (("/api/v1/bundles", "post"), ("/api/v1/tokens", "post"), ("/api/v1/devices", "get")):
        responses = doc["paths"][path][method]["responses"]
        assert {"401", "403"} <= set(responses), (path, responses.keys())
    blob = doc["paths"]["/api/v1/blobs/{sha256}"]["get"]["responses"]
    assert {"200", "206", "416", "403"} <= set(blob)
    upload = doc["paths"]["/api/v1/bundles"]["post"]["requestBody"]["content"]
    assert "application/octet-stream" in upload


@pytest.fixture
def fuzz_app(tmp_path: Path, keyring: Keyring) -> Any:
    s = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keyring.directory, admin_token=ADMIN, enrollment_token="enroll-" + "y" * 20,
        run_ingester=False, run_controller=False,
        enroll_rate_per_s=0, public_rate_per_s=0, device_rate_per_s=0,
    )
    return create_app(s)


@pytest.mark.long
def test_schemathesis_finds_no_server_error(fuzz_app: Any) -> None:
    # (no lifespan needed: this app runs neither broker, ingester nor controller)
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", fuzz_app)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= len(EXPECTED)
    for operation in operations:

        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            for headers in ({"Authorization": f"Bearer {ADMIN}"}, {}):
                response = case.call(headers=headers)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: "
                        f"{response.text[:300]}"
                    )

        run()
    assert not failures, "\n".join(sorted(set(failures))[:20])
