"""The power-cut test: the real agent process, SIGKILLed at every lifecycle step, many times.

``python -m agent --config FILE run`` follows a real HTTP fleet stand-in (RangeFleet: desired
state, signed envelopes, Range-capable throttled blobs). Each round the fleet desires a new
release whose model blob is padded to PAD bytes, and the agent is killed:

    body 25% / body 60%     mid-download, chosen by polling the partial file in staging
    downloading ... trial   at the named steps of agent.update.testhooks (EDGEFLEET_TEST_PAUSE_AT)
    trial                   while the persisted record says TRIAL (polled)
    random                  at a random moment after the API came up

After every kill, on disk: the record names a complete release (envelope stored, every blob
present and hashing right), every placed blob hashes to its name, every partial is a prefix
of its blob. After every restart: the local API answers at once with a model (never none),
that model's outputs on the golden inputs are those of the release it claims (old or new,
never a mix), and its digest is the one of the active release in the record. Finally the
agent converges: the release is committed and anti-rollback holds it.

A "chaos" round then kills the agent at random moments (0-0.5 s after each start, up to 10
times) so kills also land in the short windows between two writes.

EDGEFLEET_POWERCUT_ROUNDS (default 3, 10 kills each) and EDGEFLEET_POWERCUT_CHAOS (default 1)
make it a longer soak; EDGEFLEET_POWERCUT_SEED fixes the random kill points.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from agent.update.lifecycle import ModelRecord
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs
from shared.bundle.envelope import Envelope
from shared.bundle.keyring import Keyring
from shared.bundle.manifest import Manifest, parse_manifest

from .conftest import Bundles, free_port, read_bundle, verified
from .test_update_fetch import RangeFleet, write_padded_classifier

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = int(os.environ.get("EDGEFLEET_POWERCUT_ROUNDS", "3"))
CHAOS = int(os.environ.get("EDGEFLEET_POWERCUT_CHAOS", "1"))  # rounds of kills at random moments
CHAOS_KILLS = 10  # at most, per chaos round
SEED = int(os.environ.get("EDGEFLEET_POWERCUT_SEED", str(time.time_ns() % 10_000)))
PAD = 2 << 20  # bytes of unused initializer in each new model
RATE = 2_500_000  # bytes/s the stand-in serves blobs at: a download takes ~0.85 s
PLAN: list[tuple[str, Any]] = [
    ("body", 0.25), ("body", 0.60),
    ("hook", "downloading"), ("hook", "verifying"), ("hook", "staged"), ("hook", "smoke_testing"),
    ("hook", "activating.swapped"), ("hook", "activating.recorded"),
    ("trial", None), ("random", 1.5),
]


@dataclass
class Release:
    release: int
    digest: str
    manifest: Manifest
    entry: dict[str, Any]
    golden_in: np.ndarray
    golden_out: np.ndarray


@dataclass
class Run:
    """The agent under test: its files, its process, what was done to it."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    kills: list[tuple[str, str]] = field(default_factory=list)  # (step, record state at the kill)
    restarts: int = 0

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def pause_file(self) -> Path:
        return self.dir / "paused"

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"

    def start(self, pause_at: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_TEST_")}
        if pause_at:
            env.update(EDGEFLEET_TEST_PAUSE_AT=pause_at, EDGEFLEET_TEST_PAUSE_FILE=str(self.pause_file))
        with open(self.log, "ab") as log:
            log.write(f"---- start (pause at {pause_at}) ----\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.dir / "agent.toml"), "run"],
                cwd=ROOT, env=env, stdout=log, stderr=log,
            )

    def kill(self, step: str) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process = None
        rec = self.record()
        self.kills.append((step, str(rec.state) if rec else "none"))

    def record(self) -> ModelRecord | None:
        path = self.state_dir / "models" / "clf.json"
        return msgspec.json.decode(path.read_bytes(), type=ModelRecord) if path.exists() else None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"the agent exited ({self.process.returncode}) waiting for {what}:\n"
                            f"{self.tail()}")
            time.sleep(0.01)
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_release(directory: Path, keyring: Keyring, fleet: RangeFleet, release: int, pad: int) -> Release:
    model = write_padded_classifier(directory / f"m{release}.onnx", seed=release, pad_bytes=pad)
    out = directory / f"r{release}.bundle"
    build_bundle(model, name="clf", version=f"1.{release}", release=release, keyring=keyring, out=out,
                 golden_inputs=golden_inputs())
    vm = verified(out, keyring)
    golden = np.load(io.BytesIO(read_bundle(out)[1][vm.manifest.files["golden"].sha256]))
    entry = fleet.publish(release, out)
    return Release(release, vm.digest, vm.manifest, entry, golden["in.x"], golden["out.probs"])


class Checker:
    """The invariants, on disk after a kill and over the API after a restart."""

    def __init__(self, run: Run, fleet: RangeFleet, releases: dict[str, Release]) -> None:
        self.run = run
        self.fleet = fleet
        self.releases = releases  # by digest
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{run.port}", timeout=10)
        self.served: Counter[int] = Counter()

    def on_disk(self, allowed: set[int]) -> None:
        state = self.run.state_dir
        rec = self.run.record()
        assert rec is not None and rec.active is not None, "a record with an active release"
        assert rec.active.release in allowed, (rec.active, allowed)
        env = (state / "releases" / "clf" / f"{rec.active.release}-{rec.active.digest[:12]}.dsse.json")
        manifest = parse_manifest(Envelope.from_json(env.read_bytes()).payload)
        for ref in manifest.files.values():
            assert sha256_file(state / "blobs" / "sha256" / ref.sha256) == ref.sha256
        for blob in (state / "blobs" / "sha256").iterdir():
            assert sha256_file(blob) == blob.name, f"torn blob {blob.name}"
        for part in (state / "staging").iterdir():
            data = part.read_bytes()
            full = self.fleet.blobs[part.name.removesuffix(".part")]
            assert full[: len(data)] == data, f"partial {part.name} is not a prefix of its blob"

    def serving(self, allowed: set[int]) -> int:
        """Right after a start: a model answers at once, the one the record names."""
        def ready() -> httpx.Response | None:
            try:
                return self.api.get("/readyz")
            except httpx.TransportError:
                return None

        first = self.run.wait(ready, "the local API", timeout=30)
        assert first.status_code == 200, f"serving none after a restart: {first.text}"
        for _ in range(20):
            before, digest = self.run.record(), self.digest()
            r = self.api.post("/v1/models/clf/predict",
                              json={"inputs": {"x": self.any_release().golden_in.tolist()}})
            after, digest_after = self.run.record(), self.digest()
            assert r.status_code == 200, r.text
            assert before is not None and after is not None and before.active and after.active
            if before.active != after.active or before.state != after.state or digest != digest_after:
                continue  # the agent moved on between the reads: look again
            release = r.json()["release"]
            assert release in allowed, (release, allowed)
            if digest != after.active.digest:
                # Only inside activation: swapped in memory, the record not yet written.
                assert after.state == "smoke_testing" and after.target and after.target.digest == digest, (
                    f"serving r{release} while the record says {after.state} r{after.active.release}")
            assert release == self.releases[digest].release
            rel = self.releases[digest]
            tol = rel.manifest.golden_tolerance
            got = np.asarray(r.json()["outputs"]["probs"], dtype=np.float32)
            assert np.allclose(got, rel.golden_out, atol=tol.atol, rtol=tol.rtol), "outputs of another model"
            model = self.run.state_dir / "blobs" / "sha256" / rel.manifest.files["model"].sha256
            assert sha256_file(model) == rel.manifest.files["model"].sha256
            self.served[release] += 1
            return int(release)
        pytest.fail("the record kept changing under the check")

    def digest(self) -> str:
        models = self.api.get("/v1/models").json()["models"]
        return str(next(m["digest"] for m in models if m["name"] == "clf"))

    def any_release(self) -> Release:
        return next(iter(self.releases.values()))


def committed(run: Run, release: int) -> Callable[[], bool]:
    def check() -> bool:
        r = run.record()
        return (r is not None and r.state == "committed" and r.active is not None
                and r.active.release == release)

    return check


@pytest.fixture
def fleet() -> Iterator[RangeFleet]:
    f = RangeFleet().start()
    yield f
    f.stop()


def write_config(run: Run, fleet: RangeFleet, keyring: Keyring) -> None:
    (run.dir / "agent.toml").write_text(f"""
device_id = "dev-1"
state_dir = "{run.state_dir}"
trust_root = "{keyring.root_path}"
[fleet]
url = "{fleet.url}"
enrollment_token = "{fleet.token}"
poll_interval_s = 0.2
[api]
listen = "127.0.0.1:{run.port}"
[update]
trial_seconds = 2.0
trial_max_restarts = 4
disk_margin_mb = 0
download_backoff_s = 0.05
download_backoff_max_s = 0.5
download_stall_window_s = 5.0
retry_failed_s = 0.5
""")


@pytest.mark.long
def test_power_cut_at_every_step_serves_a_valid_model_and_converges(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, fleet: RangeFleet
) -> None:
    t0 = time.monotonic()
    rng = random.Random(SEED)
    run = Run(tmp_path / "agent", free_port())
    run.dir.mkdir()
    write_config(run, fleet, keyring)
    releases = {r.digest: r for r in [make_release(tmp_path, keyring, fleet, 1, pad=0)]}
    fleet.desired = [releases[next(iter(releases))].entry]
    checker = Checker(run, fleet, releases)

    # Release 1, installed without interruption.
    run.start()
    run.wait(lambda: (r := run.record()) and r.state == "committed", "r1 committed")
    # It checked the root's and r1's signatures in a child: cryptography never maps into it.
    assert run.process is not None
    assert "cryptography" not in Path(f"/proc/{run.process.pid}/maps").read_text()
    assert "checking in this process" not in run.log.read_text()
    fleet.faults.rate_bps = RATE
    current = 1
    try:
        for k in range(ROUNDS):
            new = make_release(tmp_path, keyring, fleet, current + 1, pad=PAD)
            releases[new.digest] = new
            allowed = {current, new.release}
            sha = new.manifest.files["model"].sha256
            fleet.desired = [new.entry]
            for step, arg in PLAN:
                if run.process is None:
                    run.start(pause_at=arg if step == "hook" else None)
                    run.restarts += 1
                    checker.serving(allowed)
                if step == "body":
                    size = new.manifest.files["model"].size
                    part = run.state_dir / "staging" / f"{sha}.part"
                    run.wait(lambda: part.exists() and part.stat().st_size >= arg * size,  # noqa: B023
                             f"round {k}: {arg:.0%} of the model downloaded")
                    label = f"body{int(arg * 100)}"
                elif step == "hook":
                    run.wait(lambda: f"{arg} {run.process.pid}" in  # noqa: B023
                             (run.pause_file.read_text() if run.pause_file.exists() else ""),
                             f"round {k}: pause at {arg}")
                    label = arg
                elif step == "trial":
                    run.wait(lambda: (r := run.record()) and r.state == "trial", f"round {k}: trial")
                    label = "trial"
                else:
                    time.sleep(rng.uniform(0, arg))
                    label = "random"
                run.kill(label)
                checker.on_disk(allowed)
            # Let it finish: the new release is committed and served.
            run.start()
            run.restarts += 1
            checker.serving(allowed)
            run.wait(committed(run, new.release), f"round {k}: r{new.release} committed")
            assert checker.serving({new.release}) == new.release
            reqs = fleet.blob_requests(sha)
            assert any(r.status == 206 for r in reqs), "the download resumed with Range"
            assert sum(r.sent for r in reqs) < 2 * new.manifest.files["model"].size, "resumed, not refetched"
            current = new.release
        for k in range(CHAOS):
            # Kills at random moments 0-0.5 s after each start: they land anywhere, including
            # the short windows between two writes. Stops before the trial's restart budget ends.
            new = make_release(tmp_path, keyring, fleet, current + 1, pad=PAD)
            releases[new.digest] = new
            allowed = {current, new.release}
            fleet.desired = [new.entry]
            for _ in range(CHAOS_KILLS):
                if run.process is None:
                    run.start()
                    run.restarts += 1
                    checker.serving(allowed)
                time.sleep(rng.uniform(0, 0.5))
                rec = run.record()
                if rec is not None and ((rec.state == "committed" and rec.active.release == new.release)
                                        or (rec.state == "trial" and rec.trial_restarts >= 3)):
                    break
                run.kill("chaos")
                checker.on_disk(allowed)
            if run.process is None:
                run.start()
                run.restarts += 1
                checker.serving(allowed)
            run.wait(committed(run, new.release), f"chaos round {k}: r{new.release} committed")
            assert checker.serving({new.release}) == new.release
            current = new.release
        highest = msgspec.json.decode((run.state_dir / "antirollback.json").read_bytes())
        assert highest["clf"][0] == current
        assert list((run.state_dir / "staging").iterdir()) == []
    finally:
        if run.process is not None:
            run.process.send_signal(signal.SIGTERM)
            try:
                run.process.wait(15)
            except subprocess.TimeoutExpired:
                run.process.kill()
    by_step = Counter(step for step, _ in run.kills)
    by_state = Counter(state for _, state in run.kills)
    summary = (f"power-cut: {len(run.kills)} kills, {run.restarts} restarts, {ROUNDS} rounds + {CHAOS} "
               f"chaos, seed {SEED}, "
               f"{time.monotonic() - t0:.1f} s; by step {dict(by_step)}; record state at kill "
               f"{dict(by_state)}; served by release {dict(checker.served)}")
    print(summary)
    (tmp_path / "summary.txt").write_text(summary)
    assert len(run.kills) >= ROUNDS * len(PLAN)
    _ = bundles
