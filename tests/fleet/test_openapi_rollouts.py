"""The rollout endpoints' OpenAPI: real request and response schemas, and every error answer
documented with an example. No operation of the API answers an untyped object, save the
routes listed in UNTYPED_ELSEWHERE (other areas'; the list may only shrink)."""

from __future__ import annotations

from typing import Any

from fleet_support import admin, enroll, make_bundle, upload
from litestar.testing import TestClient

from fleet.rollout.engine import RolloutState

Client = TestClient[Any]

# Routes outside the rollouts' area that still answer {"type": "object"}: typing them is their
# owners' work. A new untyped route fails the test; a route typed since must leave the list.
UNTYPED_ELSEWHERE: set[tuple[str, str]] = set()
ROLLOUT_OPERATIONS = {
    ("post", "/api/v1/rollouts"), ("get", "/api/v1/rollouts"), ("get", "/api/v1/rollouts/{rollout_id}"),
    *{("post", f"/api/v1/rollouts/{{rollout_id}}/{op}")
      for op in ("start", "pause", "resume", "approve", "abort", "rollback")},
}


def _untyped(schema: dict[str, Any] | None) -> bool:
    if schema is None:
        return True
    if "$ref" in schema:
        return False
    if schema.get("type") == "array":
        return _untyped(schema.get("items"))
    if "oneOf" in schema or "anyOf" in schema:
        return any(_untyped(s) for s in schema.get("oneOf", schema.get("anyOf", [])))
    return schema.get("type") == "object" and not schema.get("properties")


def _bodies(op: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    out = [(f"{code} {media}", c.get("schema"))
           for code, r in op.get("responses", {}).items() for media, c in (r.get("content") or {}).items()
           if media == "application/json"]
    body = op.get("requestBody")
    if body:
        out += [(f"request {media}", c.get("schema")) for media, c in body["content"].items()
                if media == "application/json"]
    return out


def test_no_operation_answers_an_untyped_object(client: Client) -> None:
    doc = client.get("/schema/openapi.json").json()
    untyped = {
        (method, path)
        for path, ops in doc["paths"].items() for method, op in ops.items()
        if any(_untyped(schema) for _where, schema in _bodies(op))
    }
    assert untyped <= UNTYPED_ELSEWHERE, sorted(untyped - UNTYPED_ELSEWHERE)
    assert untyped == UNTYPED_ELSEWHERE, f"typed since, leave the list: {sorted(UNTYPED_ELSEWHERE - untyped)}"
    have = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert have >= ROLLOUT_OPERATIONS


def test_rollout_operations_have_their_schemas_and_error_examples(client: Client) -> None:
    doc = client.get("/schema/openapi.json").json()
    schemas = doc["components"]["schemas"]
    create = doc["paths"]["/api/v1/rollouts"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RolloutCreate"}
    spec = schemas["RolloutCreate"]
    assert {"name", "bundle_id", "stages"} <= set(spec["required"])
    assert {"gates", "on_gate_failure", "silent_after_s", "reissue"} <= set(spec["properties"])
    assert "deadline_seconds" in schemas["StageSpec"]["properties"]
    status = schemas["RolloutStatus"]
    assert {"state", "stages", "devices", "reason", "last_evaluation"} <= set(status["required"])
    assert {"events", "gate_history"} <= set(status["properties"]) - set(status["required"])
    state = status["properties"]["state"]
    enum = state.get("enum") or schemas[state["$ref"].rsplit("/", 1)[-1]]["enum"]
    assert set(enum) == {s.value for s in RolloutState}
    for method, path in ROLLOUT_OPERATIONS:
        op = doc["paths"][path][method]
        codes = {"401", "403"} | ({"404"} if "{rollout_id}" in path or method == "post" else set())
        codes |= {"409"} if method == "post" else set()
        assert codes <= set(op["responses"]), (method, path, op["responses"].keys())
        for code in codes:
            answer = op["responses"][code]["content"]["application/json"]
            assert answer["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
            examples = list(answer["examples"].values())
            assert examples and all(e["value"]["status_code"] == int(code) for e in examples), (path, code)
        ok = "201" if path == "/api/v1/rollouts" and method == "post" else "200"
        schema = op["responses"][ok]["content"]["application/json"]["schema"]
        assert schema in ({"$ref": "#/components/schemas/RolloutStatus"},
                          {"type": "array", "items": {"$ref": "#/components/schemas/RolloutStatus"}})


def test_answers_match_the_documented_errors(client: Client, keyring: Any, tmp_path: Any) -> None:
    """The examples are what the API says: 400 naming the field, 404, 409 on a state."""
    enroll(client, "d1", site="lab")
    bundle = upload(client, make_bundle(tmp_path, keyring, release=1).path).json()
    body = {"name": "r", "bundle_id": bundle["id"], "stages": [{"name": "all", "percent": 0}]}
    bad = client.post("/api/v1/rollouts", json=body, headers=admin())
    assert bad.status_code == 400 and bad.json()["detail"] == "stages[0].percent: 0.0 must be in (0, 100]"
    lax = client.post("/api/v1/rollouts", json={**body, "stages": [{"name": "all", "percent": "50"}]},
                      headers=admin())
    assert lax.status_code == 400 and lax.json()["detail"].startswith("stages[0].percent: Expected `float")
    assert client.post("/api/v1/rollouts/7/pause", headers=admin()).json() == {
        "status_code": 404, "detail": "rollout 7 does not exist", "code": "not_found"}
    body["stages"] = [{"name": "all"}]
    created = client.post("/api/v1/rollouts", json=body, headers=admin())
    assert created.status_code == 201 and "events" in created.json()
    rid = created.json()["id"]
    assert "events" not in client.get("/api/v1/rollouts", headers=admin()).json()[0]
    r = client.post(f"/api/v1/rollouts/{rid}/pause", headers=admin())
    assert r.status_code == 409 and r.json()["code"] == "rollout_state"
    assert r.json()["detail"] == "cannot pause a rollout that is created; pause applies to: running"
