"""Attach the bundle's baseline to each release the host loads, so its Metrics score drift.

The installer keeps every file of an active or previous release in the blob store,
``baseline`` included (optional in a bundle). ``BaselineAttacher`` is given to
``ModelHost(on_load=...)``: called with each LoadedModel before it becomes active, it reads
the verified baseline blob and sets ``loaded.metrics.drift``. A release without a baseline,
or with one that does not parse, serves as before and reports no drift (logged once).
"""

from __future__ import annotations

import logging

from agent.runtime.host import LoadedModel
from agent.runtime.metrics import DriftTracker, parse_baseline
from agent.update.blobs import BlobStore

log = logging.getLogger(__name__)


class BaselineAttacher:
    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs

    def __call__(self, loaded: LoadedModel) -> None:
        if loaded.metrics.drift is not None:
            return
        ref = loaded.manifest.files.get("baseline")
        name = f"{loaded.name} r{loaded.release}"
        if ref is None:
            log.info("%s has no baseline; no drift scores", name)
            return
        try:
            data = self.blobs.path(ref.sha256).read_bytes()
            tracker = DriftTracker(parse_baseline(data))
        except (OSError, ValueError) as exc:
            log.warning("%s: baseline unusable (%s); no drift scores", name, exc)
            return
        missing = sorted({s.name for s in loaded.manifest.inputs} - set(tracker.inputs))
        if missing:
            log.info("%s: the baseline has no usable statistics for input(s) %s", name, missing)
        loaded.metrics.drift = tracker
