"""What the API handlers share, built once by ``create_app`` and kept in ``app.state.ctx``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from fleet.registry.blobs import BlobStore
from fleet.rollout.controller import RolloutController
from fleet.settings import Settings
from shared.bundle.trust import TrustRoot
from shared.errors import MalformedDocumentError

if TYPE_CHECKING:
    from fleet.ingest.ingester import Ingester
    from fleet.rollout.leader import ControllerLoop


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    blobs: BlobStore
    controller: RolloutController
    mqtt_url: str
    ingester: Ingester | None = None
    controller_loop: ControllerLoop | None = None
    _trust: TrustRoot | None = field(default=None, repr=False)
    _trust_stamp: tuple[int, int, int] = field(default=(0, 0, 0), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def trust_root(self) -> TrustRoot:
        """The root uploads are verified against (keys_dir/root.json), loaded again when the
        file changes (`edgefleet keys rotate` replaces it while the fleet runs)."""
        with self._lock:
            keys_dir = self.settings.keys_dir
            path = keys_dir / "root.json" if keys_dir is not None else None
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            if path is None or st is None:
                if self._trust is not None:
                    return self._trust
                raise MalformedDocumentError(
                    f"the fleet has no trust root ({keys_dir}/root.json); start it with --keys DIR"
                )
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._trust is None or stamp != self._trust_stamp:
                self._trust = TrustRoot.load(path.read_bytes())
                self._trust_stamp = stamp
            return self._trust
