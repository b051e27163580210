"""Device.models has a declared type (fleet.db.device_models): what the ingester stored before
the type existed reads back unchanged, and an entry off the type reads as empty, logged."""

from __future__ import annotations

import logging

import pytest

from fleet.db.device_models import ReportedModel, read_model, read_models, stored_models

FULL = {
    "release": 3, "version": "1.3", "state": "trial", "waiting": "window 02:00-04:00",
    "held": [2, 3],
    "shadow": {"release": 4, "version": "1.4", "metric": "argmax", "samples": 50, "agreed": 48,
               "errors": 0, "dropped_queue": 1, "dropped_budget": 0, "agreement": 0.96,
               "max_abs_error": None, "cosine_min": None, "candidate_p95_ms": 4.0,
               "current_p95_ms": 3.5, "busy_fraction": 0.1, "received_at": 1.7e9},
    "event_seq": 12, "event_ts": 1.7e9,
}


def test_a_stored_entry_round_trips_to_the_same_json() -> None:
    stored = {"clf": FULL, "old": {"release": 1, "version": "1.1", "state": "committed"}}
    assert stored_models(read_models(stored)) == stored


def test_an_entry_off_the_type_reads_as_empty_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fleet.db.device_models")
    models = read_models({"clf": {"release": "3"}, "ok": {"release": 2}})
    assert models == {"clf": ReportedModel(), "ok": ReportedModel(release=2)}
    assert "'clf' does not match its type" in caplog.text and "$.release" in caplog.text
    assert read_model({"clf": {"release": True}}, "clf") == ReportedModel()  # a bool is no release
    assert read_model({}, "clf") == ReportedModel() and read_models(None) == {}
