"""The device, bundle, certificate and health routes answer what the OpenAPI document says:
real answers of a fleet with a device in a running rollout are validated (JSON Schema
2020-12) against the schema documented for their status, and each of these operations
documents its 401/403 (404 with an id in the path, 409 where one is possible) with examples
whose status is theirs."""

from __future__ import annotations

from typing import Any

import jsonschema
from fleet_support import admin, enroll, make_bundle, upload
from litestar.testing import TestClient

Client = TestClient[Any]

OPERATIONS = {
    ("get", "/api/v1/devices/{device_id}"), ("delete", "/api/v1/devices/{device_id}"),
    ("get", "/api/v1/devices/{device_id}/certificates"),
    ("post", "/api/v1/devices/{device_id}/certificates/revoke"), ("get", "/api/v1/bundles/{bundle_id}"),
    ("get", "/api/v1/bundles/highest"), ("get", "/api/v1/bundles"), ("post", "/api/v1/bundles"),
    ("get", "/api/v1/health/releases"), ("get", "/api/v1/stats"),
    ("post", "/api/v1/devices/{device_id}/approve"), ("put", "/api/v1/devices/{device_id}/labels"),
    ("post", "/api/v1/devices/{device_id}/revoke"), ("post", "/api/v1/devices/{device_id}/rotate"),
    ("post", "/api/v1/devices/rotate"), ("get", "/api/v1/rollouts/{rollout_id}/health"),
    ("get", "/api/v1/devices"),
}


def _check(doc: dict[str, Any], method: str, path: str, status: int, body: Any) -> None:
    op = doc["paths"][path][method]
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**schema, "components": doc["components"]},
                        cls=jsonschema.Draft202012Validator)


def test_answers_hold_to_their_documented_schemas(client: Client, keyring: Any, tmp_path: Any) -> None:
    doc = client.get("/schema/openapi.json").json()
    enroll(client, "d1", site="lab")
    enroll(client, "d2", site="lab")
    up = upload(client, make_bundle(tmp_path, keyring, release=1).path)
    _check(doc, "post", "/api/v1/bundles", 201, up.json())
    again = upload(client, make_bundle(tmp_path, keyring, release=1).path)
    if again.status_code == 200:  # the identical file: same digest
        _check(doc, "post", "/api/v1/bundles", 200, again.json())
    bid = up.json()["id"]
    spec = {"name": "r", "bundle_id": bid, "stages": [{"name": "all"}], "selector": {"site": "lab"}}
    rid = client.post("/api/v1/rollouts", json=spec, headers=admin()).json()["id"]
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=admin()).status_code == 200
    answers = [
        ("get", "/api/v1/devices/{device_id}", "/api/v1/devices/d1", None),
        ("get", "/api/v1/devices", "/api/v1/devices", None),
        ("get", "/api/v1/devices", "/api/v1/devices?limit=1", None),
        ("get", "/api/v1/bundles/{bundle_id}", f"/api/v1/bundles/{bid}", None),
        ("get", "/api/v1/bundles/highest", "/api/v1/bundles/highest?name=detector", None),
        ("get", "/api/v1/bundles", "/api/v1/bundles", None),
        ("get", "/api/v1/health/releases", "/api/v1/health/releases", None),
        ("get", "/api/v1/stats", "/api/v1/stats", None),
        ("get", "/healthz", "/healthz", None),
        ("get", "/api/v1/rollouts/{rollout_id}/health", f"/api/v1/rollouts/{rid}/health?bucket_s=1", None),
        ("get", "/api/v1/devices/{device_id}/certificates", "/api/v1/devices/d1/certificates", None),
        ("put", "/api/v1/devices/{device_id}/labels", "/api/v1/devices/d1/labels", {"labels": {"site": "x"}}),
        ("post", "/api/v1/devices/{device_id}/rotate", "/api/v1/devices/d1/rotate", None),
        ("post", "/api/v1/devices/rotate", "/api/v1/devices/rotate", None),
        ("post", "/api/v1/devices/{device_id}/approve", "/api/v1/devices/d1/approve", {"valid_s": 60}),
        ("post", "/api/v1/devices/{device_id}/revoke", "/api/v1/devices/d1/revoke", None),
        ("post", "/api/v1/devices/{device_id}/certificates/revoke", "/api/v1/devices/d1/certificates/revoke",
         None),
        ("delete", "/api/v1/devices/{device_id}", "/api/v1/devices/d2", None),
    ]
    for method, path, url, body in answers:
        kw: dict[str, Any] = {"headers": admin()}
        if body is not None:
            kw["json"] = body
        r = getattr(client, method)(url, **kw)
        assert r.status_code == 200, (url, r.text)
        _check(doc, method, path, 200, r.json())
    d2 = client.get("/api/v1/devices/d1", headers=admin()).json()
    assert d2["assigned"]["detector"]["bundle_id"] == bid  # an assignment was in what was checked
    missing = client.get("/api/v1/devices/nobody", headers=admin())
    assert missing.status_code == 404
    _check(doc, "get", "/api/v1/devices/{device_id}", 404, missing.json())
    example = doc["paths"]["/api/v1/devices/{device_id}"]["get"]["responses"]["404"]["content"][
        "application/json"]["examples"]
    assert [e["value"] for e in example.values()] == [{
        "status_code": 404, "detail": "device 'edge-9' is not enrolled", "code": "not_found"}]
    assert missing.json() == {"status_code": 404, "detail": "device 'nobody' is not enrolled",
                              "code": "not_found"}


def test_every_operation_documents_its_errors_with_examples(client: Client) -> None:
    doc = client.get("/schema/openapi.json").json()
    for method, path in OPERATIONS:
        op = doc["paths"][path][method]
        codes = {"401", "403"} | ({"404"} if "{" in path else set())
        codes |= {"409"} if (method, path) == ("post", "/api/v1/bundles") else set()
        assert codes <= set(op["responses"]), (method, path, sorted(op["responses"]))
        for code in codes:
            answer = op["responses"][code]["content"]["application/json"]
            assert answer["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
            examples = list(answer.get("examples", {}).values())
            assert examples and all(e["value"]["status_code"] == int(code) for e in examples), (
                method, path, code)
