"""Chunked downloads against a real HTTP server: only changed chunks move.

Each test counts the bytes the server sent. The models are built for the test: several
large initializers, of which a "fine-tune" changes the last ones (values, not sizes).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.update.blobs import BlobStore
from agent.update.chunked import ChunkIndex, fetch_chunked
from agent.update.fetch import DownloadPolicy, Fetcher
from agent.update.lifecycle import Target, UpdateState
from agent.update.window import UpdateWindow
from fleet.bundles.build import build_bundle
from shared.bundle.envelope import Envelope
from shared.bundle.keyring import Keyring
from shared.bundle.manifest import parse_manifest, payload_digest

from .conftest import Rig, make_rig, read_bundle, verified
from .test_chunks_support import ChunkFleet, fine_tune, layer_weights, write_layered_model

S = UpdateState
CHUNK = 64 * 1024
LAYERS, DIM = 8, 256  # 8 initializers of 256 KiB: a 2 MiB model in 32 chunks
FAST = DownloadPolicy(attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, stall_window_s=2.0,
                      min_rate_bps=0, parallel=4)


@pytest.fixture
def fleet() -> Iterator[ChunkFleet]:
    f = ChunkFleet().start()
    yield f
    f.stop()


def fetcher(policy: DownloadPolicy = FAST, **kw: Any) -> Fetcher:
    return Fetcher(httpx.Client(), policy=policy, **kw)


def build(tmp: Path, keyring: Keyring, release: int, weights: list[np.ndarray], *,
          chunk_size: int | None = CHUNK, **kw: Any) -> Path:
    model = write_layered_model(tmp / f"layered-{release}.onnx", weights)
    out = tmp / f"layered-r{release}.bundle"
    x = np.random.default_rng(0).standard_normal((2, DIM)).astype(np.float32)
    build_bundle(model, name="lay", version=f"1.{release}", release=release, keyring=keyring, out=out,
                 golden_inputs={"x": x}, chunk_size=chunk_size, chunk_min_bytes=0, **kw)
    return out


def publish(fleet: ChunkFleet, bundle_id: int, bundle: Path) -> Target:
    env, blobs = read_bundle(bundle)
    fleet.envelopes[bundle_id] = env
    fleet.blobs.update(blobs)
    e = Envelope.from_json(env)
    return Target(parse_manifest(e.payload).release, payload_digest(e.payload),
                  envelope_url=f"{fleet.url}/api/v1/bundles/{bundle_id}/envelope",
                  blob_url=fleet.blob_url())


def model_ref(bundle: Path, keyring: Keyring) -> Any:
    return verified(bundle, keyring).manifest.files["model"]


def rig_with(tmp: Path, keyring: Keyring, f: Fetcher) -> Rig:
    return make_rig(tmp / "state", keyring, fetcher=f, trial_seconds=0.0, retry_failed_s=0.0)


@pytest.fixture(scope="module")
def weights() -> list[np.ndarray]:
    return layer_weights(LAYERS, DIM)


def test_manifest_lists_chunks_and_the_first_install_fetches_each_once(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    ref = model_ref(b1, keyring)
    assert ref.chunk_size == CHUNK and len(ref.chunks) == -(-ref.size // CHUNK) > 8
    f = fetcher()
    rig = rig_with(tmp_path, keyring, f)
    rec = rig.installer.apply_target("lay", publish(fleet, 1, b1))
    assert rec.state == S.TRIAL
    hits = fleet.requests(ref.sha256)
    assert all(h.status == 206 for h in hits) and len(hits) <= FAST.parallel, "a few long ranges"
    assert sorted(fleet.chunks_fetched(ref.sha256, CHUNK, ref.size)) == list(range(len(ref.chunks)))
    assert fleet.sent(ref.sha256) == ref.size, "every byte of the model once, none twice"
    assert f.stats.reused == 0 and f.stats.fallbacks == 0


def test_release_changing_only_metadata_and_golden_fetches_no_model_byte(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    b2 = build(tmp_path, keyring, 2, weights, atol=1e-3, description="thresholds and golden only")
    ref = model_ref(b1, keyring)
    assert model_ref(b2, keyring).sha256 == ref.sha256
    rig = rig_with(tmp_path, keyring, fetcher())
    rig.installer.apply_target("lay", publish(fleet, 1, b1))
    rig.installer.check_trials()
    fleet.reset()
    rec = rig.installer.apply_target("lay", publish(fleet, 2, b2))
    assert rec.state == S.TRIAL and rec.active is not None and rec.active.release == 2
    assert fleet.requests(ref.sha256) == [], "the model blob is content-addressed: 0 bytes"
    assert fleet.sent() < 0.01 * ref.size  # only the golden and baseline files moved


def test_fine_tuned_release_fetches_only_the_changed_chunks(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    b2 = build(tmp_path, keyring, 2, fine_tune(weights, changed=2))
    r1, r2 = model_ref(b1, keyring), model_ref(b2, keyring)
    assert r1.size == r2.size, "a fine-tune changes values, not sizes: offsets stay put"
    changed = sum(a != b for a, b in zip(r1.chunks, r2.chunks, strict=True))
    f = fetcher()
    rig = rig_with(tmp_path, keyring, f)
    rig.installer.apply_target("lay", publish(fleet, 1, b1))
    rig.installer.check_trials()
    fleet.reset()
    rec = rig.installer.apply_target("lay", publish(fleet, 2, b2))
    assert rec.state == S.TRIAL and rig.host.get("lay").release == 2  # type: ignore[union-attr]
    fetched = fleet.sent(r2.sha256)
    ratio = fetched / r2.size
    # 2 of 8 layers changed: a quarter of the weights plus at most a chunk at each edge.
    assert fetched <= changed * CHUNK and changed <= (2 * DIM * DIM * 4) // CHUNK + 2
    assert 0.2 < ratio < 0.32, f"fetched {ratio:.3f} of the model"
    assert f.stats.reused == r2.size - fetched


def test_chunks_are_reused_from_any_installed_release(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    """r3 shares its first half with r1 (now `previous`) and its tail with r2 (active)."""
    w2 = fine_tune(weights, changed=4)
    w3 = weights[:4] + w2[4:]
    b1, b2, b3 = (build(tmp_path, keyring, r, w) for r, w in ((1, weights), (2, w2), (3, w3)))
    rig = rig_with(tmp_path, keyring, fetcher())
    for rid, b in ((1, b1), (2, b2)):
        rig.installer.apply_target("lay", publish(fleet, rid, b))
        rig.installer.check_trials()
    fleet.reset()
    ref3 = model_ref(b3, keyring)
    rec = rig.installer.apply_target("lay", publish(fleet, 3, b3))
    assert rec.state == S.TRIAL
    # Only the chunks that straddle the layer-4 boundary (bytes of both releases) move.
    assert fleet.sent(ref3.sha256) <= 2 * CHUNK


def test_resume_at_chunk_granularity_after_a_failed_pass(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    ref = model_ref(b1, keyring)
    fleet.faults.fail_after_bytes = 700_000  # the link goes down mid-chunk, mid-request
    policy = DownloadPolicy(attempts=1, stall_window_s=2.0, min_rate_bps=0, parallel=4)
    first = fetcher(policy)
    rig = rig_with(tmp_path, keyring, first)
    rec = rig.installer.apply_target("lay", publish(fleet, 1, b1))
    assert rec.state == S.FAILED and rec.reason == "download"
    sent_before = fleet.sent(ref.sha256)
    assert 0 < sent_before < ref.size
    # What the device received (the server's count also holds bytes still in socket buffers).
    received = first.stats.network
    assert 0 < received <= sent_before
    # A new process (nothing in memory): the partial's chunks are re-hashed and kept.
    fleet.faults.fail_after_bytes = None
    fleet.reset()
    f = fetcher()
    fresh = rig_with(tmp_path, keyring, f)
    fresh.installer.recover()
    rec = fresh.installer.apply_target("lay", publish(fleet, 1, b1))
    assert rec.state == S.TRIAL
    # Every chunk received whole in the first pass is kept; each cut request loses at most
    # the one chunk it was in.
    assert f.stats.resumed >= received - policy.parallel * CHUNK
    assert received + fleet.sent(ref.sha256) <= ref.size + policy.parallel * CHUNK
    assert fleet.sent(ref.sha256) == ref.size - f.stats.resumed


def test_torn_partial_after_a_power_cut_keeps_only_chunks_that_hash_right(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    _env, blobs = read_bundle(b1)
    ref = model_ref(b1, keyring)
    data = blobs[ref.sha256]
    store = BlobStore(tmp_path / "state")
    store.ensure_dirs()
    torn = bytearray(data[: 5 * CHUNK + 1000])  # 5 whole chunks and a torn sixth
    torn[2 * CHUNK + 7] ^= 0xFF  # and a bit flipped in the third
    store.staging_path(ref.sha256).write_bytes(bytes(torn))
    publish(fleet, 1, b1)
    f = fetcher()
    fetch_chunked(f, fleet.blob_url().replace("{sha256}", ref.sha256), ref, store, ChunkIndex())
    assert hashlib.sha256(store.path(ref.sha256).read_bytes()).hexdigest() == ref.sha256
    got = fleet.chunks_fetched(ref.sha256, CHUNK, ref.size)
    assert sorted(got) == [2, *range(5, len(ref.chunks))], "kept: chunks 0, 1, 3, 4"
    assert f.stats.resumed == 4 * CHUNK


def test_a_corrupted_chunk_is_fetched_again(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    ref = model_ref(b1, keyring)
    fleet.faults.corrupt_at = {3 * CHUNK + 100: 1}
    rig = rig_with(tmp_path, keyring, fetcher())
    rec = rig.installer.apply_target("lay", publish(fleet, 1, b1))
    assert rec.state == S.TRIAL
    assert fleet.chunks_fetched(ref.sha256, CHUNK, ref.size).count(3) == 2, "chunk 3 fetched again"
    assert fleet.sent(ref.sha256) <= ref.size + CHUNK


def test_a_chunk_corrupted_every_time_fails_with_hash_and_keeps_the_old_model(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    b2 = build(tmp_path, keyring, 2, fine_tune(weights, changed=2))
    ref2 = model_ref(b2, keyring)
    rig = rig_with(tmp_path, keyring, fetcher())
    rig.installer.apply_target("lay", publish(fleet, 1, b1))
    rig.installer.check_trials()
    changed_at = next(i for i, (a, b) in enumerate(zip(model_ref(b1, keyring).chunks, ref2.chunks,
                                                        strict=True)) if a != b)
    fleet.faults.corrupt_at = {changed_at * CHUNK + 5: 100}
    rec = rig.installer.apply_target("lay", publish(fleet, 2, b2))
    assert rec.state == S.FAILED and rec.reason == "hash"
    assert rec.active is not None and rec.active.release == 1
    assert rig.host.get("lay").release == 1  # type: ignore[union-attr]
    assert not rig.installer.blobs.path(ref2.sha256).exists(), "nothing unverified is placed"
    assert not rig.installer.blobs.staging_path(ref2.sha256).exists()


def test_server_ignoring_range_falls_back_to_the_whole_file(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    ref = model_ref(b1, keyring)
    fleet.faults.ignore_range = True
    f = fetcher()
    rig = rig_with(tmp_path, keyring, f)
    rec = rig.installer.apply_target("lay", publish(fleet, 1, b1))
    assert rec.state == S.TRIAL and f.stats.fallbacks == 1
    hits = fleet.requests(ref.sha256)
    assert [(h.range is not None, h.status) for h in hits] == [(True, 200), (False, 200)]


def test_old_manifest_without_chunks_still_installs_from_fleet_and_file(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights, chunk_size=None)
    env, _ = read_bundle(b1)
    assert b"chunk" not in Envelope.from_json(env).payload, "encoded exactly as before chunks"
    ref = model_ref(b1, keyring)
    rig = rig_with(tmp_path, keyring, fetcher())
    rec = rig.installer.apply_target("lay", publish(fleet, 1, b1))
    assert rec.state == S.TRIAL
    assert [(h.range, h.status) for h in fleet.requests(ref.sha256)] == [(None, 200)]
    other = make_rig(tmp_path / "offline", keyring)
    assert other.installer.install_file(b1).state == S.COMMITTED


def test_chunked_bundle_installs_offline_as_whole_blobs(
    tmp_path: Path, keyring: Keyring, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    rig = make_rig(tmp_path / "s", keyring)
    assert rig.installer.install_file(b1).state == S.COMMITTED
    assert rig.host.get("lay").release == 1  # type: ignore[union-attr]


def test_rate_limit_bounds_all_chunks_together(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    ref = model_ref(b1, keyring)
    publish(fleet, 1, b1)
    limit = 4 * 1024 * 1024  # 2 MiB model at 4 MiB/s, 4 chunks in flight: about 0.5 s
    f = fetcher(DownloadPolicy(attempts=2, stall_window_s=2.0, min_rate_bps=0, parallel=4,
                               rate_limit_bps=limit))
    store = BlobStore(tmp_path / "s")
    t0 = time.monotonic()
    fetch_chunked(f, fleet.blob_url().replace("{sha256}", ref.sha256), ref, store, ChunkIndex())
    took = time.monotonic() - t0
    burst = max(65536, limit / 4)
    assert took >= (ref.size - burst) / limit * 0.9, f"{took:.2f} s"
    assert store.path(ref.sha256).exists()


def test_metered_link_waits_for_its_window_then_downloads(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    now = [datetime(2025, 1, 1, 14, 0)]
    policy = DownloadPolicy(attempts=2, min_rate_bps=0, window=UpdateWindow.parse("02:00-05:00"))
    rig = rig_with(tmp_path, keyring, fetcher(policy, local_now=lambda: now[0]))
    target = publish(fleet, 1, b1)
    rec = rig.installer.apply_target("lay", target)
    assert rec.state == S.IDLE and rec.message == (
        "r1 waiting for the update window 02:00-05:00 local time (metered link)")
    assert rig.installer.store.load("lay").message == rec.message  # type: ignore[union-attr]
    assert fleet.hits == [] and "download_started" not in rig.kinds()
    now[0] = datetime(2025, 1, 2, 2, 30)
    assert rig.installer.apply_target("lay", target).state == S.TRIAL


def test_window_closing_mid_download_keeps_the_record_and_partial(
    tmp_path: Path, keyring: Keyring, fleet: ChunkFleet, weights: list[np.ndarray]
) -> None:
    b1 = build(tmp_path, keyring, 1, weights)
    ref = model_ref(b1, keyring)
    now = [datetime(2025, 1, 1, 4, 59)]

    def close_after_some(sha: str, rng: str | None) -> None:
        if sha == ref.sha256:  # the window closes while the first range is served
            now[0] = datetime(2025, 1, 1, 5, 0)

    fleet.faults.on_request = close_after_some
    policy = DownloadPolicy(attempts=2, min_rate_bps=0, parallel=1,
                            window=UpdateWindow.parse("02:00-05:00"))
    rig = rig_with(tmp_path, keyring, fetcher(policy, local_now=lambda: now[0]))
    target = publish(fleet, 1, b1)
    rec = rig.installer.apply_target("lay", target)
    assert rec.state == S.DOWNLOADING and "update window" in rec.message
    assert rig.installer.blobs.partial_size(ref.sha256) > 0
    first = set(fleet.chunks_fetched(ref.sha256, CHUNK, ref.size))
    assert 0 < len(first) < len(ref.chunks)
    fleet.faults.on_request = None
    fleet.reset()
    now[0] = datetime(2025, 1, 2, 2, 0)
    assert rig.installer.apply_target("lay", target).state == S.TRIAL
    second = set(fleet.chunks_fetched(ref.sha256, CHUNK, ref.size))
    assert not first & second and len(first | second) == len(ref.chunks), "done chunks are kept"
