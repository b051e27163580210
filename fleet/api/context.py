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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def trust_root(self) -> TrustRoot:
        """The root uploads are verified against (keys_dir/root.json), loaded once."""
        with self._lock:
            if self._trust is None:
                keys_dir = self.settings.keys_dir
                if keys_dir is None or not (keys_dir / "root.json").is_file():
                    raise MalformedDocumentError(
                        f"the fleet has no trust root ({keys_dir}/root.json); start it with --keys DIR"
                    )
                self._trust = TrustRoot.load((keys_dir / "root.json").read_bytes())
            return self._trust
