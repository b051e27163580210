"""Local applications on each device: they call the agent's inference API on real inputs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import httpx
import numpy as np

from fleet.demo.models import field_traffic


@dataclass
class TrafficStats:
    ok: int = 0
    errors: int = 0
    not_ready: int = 0  # 503 before the device has any model
    releases: dict[int, int] = field(default_factory=dict)


class TrafficGenerator(threading.Thread):
    """Sends ``rate`` requests a second to one agent's local API until stopped."""

    def __init__(self, api_url: str, model: str, *, rate: float = 15.0, seed: int = 0):
        super().__init__(daemon=True, name=f"traffic-{api_url}")
        self.api_url = api_url
        self.model = model
        self.rate = rate
        self.stats = TrafficStats()
        self._stop = threading.Event()
        self._rng = np.random.default_rng(seed)

    def run(self) -> None:
        with httpx.Client(base_url=self.api_url, timeout=5.0) as client:
            while not self._stop.wait(1.0 / self.rate):
                x = field_traffic(self._rng)
                try:
                    r = client.post(f"/v1/models/{self.model}/predict", json={"inputs": {"x": x.tolist()}})
                except httpx.HTTPError:
                    self.stats.errors += 1
                    continue
                if r.status_code == 200:
                    self.stats.ok += 1
                    rel = int(r.json().get("release", 0))
                    self.stats.releases[rel] = self.stats.releases.get(rel, 0) + 1
                elif r.status_code == 503:
                    self.stats.not_ready += 1
                else:
                    self.stats.errors += 1

    def stop(self) -> None:
        self._stop.set()
