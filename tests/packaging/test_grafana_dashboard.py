"""packaging/grafana/edgefleet-fleet.json loads: it holds to the dashboard model Grafana
imports (a JSON Schema of the fields Grafana needs, checked with jsonschema), its panels tile
the 24-column grid without overlapping, and every metric and label its queries use is one
the fleet exports (fleet.metrics, what GET /metrics serves)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema

from fleet import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "edgefleet-fleet.json"

DATASOURCE = {"type": "object", "required": ["type", "uid"],
              "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${DS_PROMETHEUS}"}}}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "__inputs"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "time": {"type": "object", "required": ["from", "to"]},
        "__inputs": {"type": "array", "contains": {
            "type": "object", "required": ["name", "type", "pluginId"],
            "properties": {"name": {"const": "DS_PROMETHEUS"}, "type": {"const": "datasource"},
                           "pluginId": {"const": "prometheus"}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["timeseries", "stat", "table", "gauge", "bargauge"]},
                "title": {"type": "string", "minLength": 1},
                "datasource": DATASOURCE,
                "gridPos": {"type": "object", "required": ["x", "y", "w", "h"], "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 23},
                    "y": {"type": "integer", "minimum": 0},
                    "w": {"type": "integer", "minimum": 1, "maximum": 24},
                    "h": {"type": "integer", "minimum": 1}}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr", "datasource"],
                    "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"},
                                   "expr": {"type": "string", "minLength": 1},
                                   "datasource": DATASOURCE}}},
            }}},
    },
}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_the_dashboard_holds_to_grafana_s_model() -> None:
    dash = _dashboard()
    jsonschema.validate(dash, SCHEMA)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']} runs past the grid"
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']} overlaps another"
        cells |= mine
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['title']}: refIds repeat"


def _exported() -> dict[str, set[str]]:
    """Sample name (with its _total, _bucket... suffix) -> its label names, as the fleet exports them."""
    out: dict[str, set[str]] = {}
    for collector, names in metrics.REGISTRY._collector_to_names.items():
        for name in names:
            bucket = {"le"} if name.endswith("_bucket") else set()
            out[name] = set(getattr(collector, "_labelnames", ())) | bucket
    return out


def test_every_query_uses_metrics_and_labels_the_fleet_exports() -> None:
    exported = _exported()
    used = set()
    for p in _dashboard()["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            names = re.findall(r"\b(edgefleet_[a-z0-9_]+)\b", expr)
            assert names, f"{p['title']}: {expr} reads no edgefleet metric"
            for name in names:
                assert name in exported, f"{p['title']}: {name} is not a metric of the fleet"
                used.add(name)
            grouped = {w.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for w in group.split(",")}
            for label in grouped:
                assert any(label in exported[n] for n in names), f"{p['title']}: no {label!r} on {names}"
            for label in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
                assert any(label in exported[n] for n in names), f"{p['title']}: legend label {label!r}"
    # the figures an operator looks at first are all on it
    assert {"edgefleet_devices_online", "edgefleet_rollouts", "edgefleet_rollout_gate_failing",
            "edgefleet_ingest_lag_seconds_bucket", "edgefleet_controller_active"} <= used
