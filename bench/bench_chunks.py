"""Chunked downloads: bytes moved per kind of release, and the wall time of a full download.

    /tmp/venv/bin/python bench/bench_chunks.py [--layers 16 --dim 1024 --full-mb 128 --repeat 3]

Prints one JSON line per figure: {name, ours, baseline, ratio, target, met}. Everything runs
over loopback against the chunk-capable fleet stand-in of the tests (a Python HTTP server,
the same for both paths), with the real agent parts (Installer, Fetcher, BlobStore):

- ``metadata_release_bytes``: a release changing only golden vectors/thresholds/description;
  ours = bytes fetched / model bytes, baseline = 1.0 (a device that re-downloads the model);
- ``fine_tune_bytes``: the last ``--changed`` of ``--layers`` initializers fine-tuned;
  ours = bytes fetched / model bytes, baseline = 1.0; target: the changed share + 2 chunks;
- ``full_download_seconds``: a ``--full-mb`` blob fetched by chunks (4 ranges in flight,
  chunk hashes, the whole-file hash) vs the plain whole-file streaming path, the server in
  its own process; best of ``--repeat`` runs each (the median ratio is printed too);
  target ratio <= 1.10;
- ``build_chunk_hash_seconds``: hashing the chunks at build time vs the whole-file hash alone;
- ``cdc_python_seconds_per_200mb``: a pure-Python gear-hash content-defined chunker on 4 MiB,
  scaled to 200 MB (the reason chunks are fixed-size), vs fixed-size chunk hashing of 200 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from agent.runtime.host import ModelHost  # noqa: E402
from agent.runtime.onnx_backend import OnnxBackend  # noqa: E402
from agent.update.blobs import BlobStore  # noqa: E402
from agent.update.chunked import ChunkIndex, fetch_chunked  # noqa: E402
from agent.update.fetch import DownloadPolicy, Fetcher  # noqa: E402
from agent.update.installer import Installer  # noqa: E402
from agent.update.lifecycle import Target  # noqa: E402
from agent.update.store import StateStore  # noqa: E402
from fleet.bundles.build import build_bundle  # noqa: E402
from shared.bundle.chunks import DEFAULT_CHUNK_SIZE, chunk_count, hash_chunks  # noqa: E402
from shared.bundle.envelope import Envelope  # noqa: E402
from shared.bundle.keyring import init_keyring  # noqa: E402
from shared.bundle.manifest import FileRef, parse_manifest, payload_digest  # noqa: E402
from tests.agent.conftest import read_bundle  # noqa: E402
from tests.agent.test_chunks_support import (  # noqa: E402
    ChunkFleet,
    fine_tune,
    layer_weights,
    write_layered_model,
)

POLICY = DownloadPolicy(attempts=3, backoff_base_s=0.05, backoff_max_s=0.2, min_rate_bps=0, parallel=4)


def row(name: str, ours: float, baseline: float, target: str, met: bool, **extra: object) -> None:
    ratio = ours / baseline if baseline else float("inf")
    print(json.dumps({"name": name, "ours": round(ours, 4), "baseline": round(baseline, 4),
                      "ratio": round(ratio, 4), "target": target, "met": met, **extra}), flush=True)


def publish(fleet: ChunkFleet, bundle_id: int, bundle: Path) -> Target:
    env, blobs = read_bundle(bundle)
    fleet.envelopes[bundle_id] = env
    fleet.blobs.update(blobs)
    e = Envelope.from_json(env)
    return Target(parse_manifest(e.payload).release, payload_digest(e.payload),
                  envelope_url=f"{fleet.url}/api/v1/bundles/{bundle_id}/envelope", blob_url=fleet.blob_url())


def release_rows(tmp: Path, fleet: ChunkFleet, layers: int, dim: int, changed: int) -> None:
    keyring = init_keyring(tmp / "keys", root_keys=1, root_threshold=1)
    weights = layer_weights(layers, dim)
    x = np.random.default_rng(0).standard_normal((2, dim)).astype(np.float32)

    def build(release: int, ws: list[np.ndarray], **kw: object) -> Path:
        model = write_layered_model(tmp / f"m{release}.onnx", ws)
        out = tmp / f"r{release}.bundle"
        build_bundle(model, name="bench", version=f"1.{release}", release=release, keyring=keyring,
                     out=out, golden_inputs={"x": x}, **kw)  # type: ignore[arg-type]
        return out

    b1 = build(1, weights)
    b2 = build(2, weights, atol=1e-3, description="thresholds and golden vectors only")
    b3 = build(3, fine_tune(weights, changed))
    trust = keyring.trust_root()
    model = {r: trust.verify_manifest(read_bundle(b)[0]).manifest.files["model"]
             for r, b in ((1, b1), (2, b2), (3, b3))}
    state = tmp / "state"
    inst = Installer(store=StateStore(state), blobs=BlobStore(state), host=ModelHost(), trust_root=trust,
                     backend=OnnxBackend(), fetcher=Fetcher(httpx.Client(), policy=POLICY), trial_seconds=0)
    for rid, bundle in ((1, b1), (2, b2), (3, b3)):
        fleet.reset()
        rec = inst.apply_target("bench", publish(fleet, rid, bundle))
        assert rec.state == "trial", rec
        inst.check_trials()
        if rid == 2:
            size = model[2].size
            got = fleet.sent(model[2].sha256)
            row("metadata_release_bytes", got / size, 1.0, "< 0.01 of the model", got / size < 0.01,
                model_bytes=size, fetched_model_bytes=got, all_bytes=fleet.sent())
        if rid == 3:
            size = model[3].size
            got = fleet.sent(model[3].sha256)
            share = changed / layers
            chunk = model[3].chunk_size or DEFAULT_CHUNK_SIZE
            bound = share + 2 * chunk / size
            row("fine_tune_bytes", got / size, 1.0, f"<= {bound:.3f} ({changed}/{layers} layers + 2 chunks)",
                got / size <= bound, model_bytes=size, fetched_bytes=got, chunk_size=chunk,
                chunks=len(model[3].chunks or []))


def _serve(path: str, sha: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    fleet = ChunkFleet()
    fleet.blobs[sha] = Path(path).read_bytes()
    out.put(fleet.url)
    fleet.server.serve_forever()


def full_download_row(tmp: Path, mb: int, repeat: int) -> None:
    """The server runs in its own process, as the fleet would: the client's GIL is its own."""
    data = os.urandom(mb << 20)
    path = tmp / "blob"
    path.write_bytes(data)
    sha, chunks = hash_chunks(path, DEFAULT_CHUNK_SIZE)
    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    server = mp.Process(target=_serve, args=(str(path), sha, queue), daemon=True)
    server.start()
    url = f"{queue.get(timeout=30)}/api/v1/blobs/{sha}"
    plain = FileRef(sha256=sha, size=len(data), media_type="application/octet-stream")
    chunked = FileRef(sha256=sha, size=len(data), media_type="application/octet-stream",
                      chunk_size=DEFAULT_CHUNK_SIZE, chunks=chunks)
    times: dict[str, list[float]] = {"chunked": [], "whole": []}
    try:
        for i in range(repeat):
            for kind in ("whole", "chunked") if i % 2 else ("chunked", "whole"):
                store = BlobStore(tmp / f"s-{kind}-{i}")
                f = Fetcher(httpx.Client(), policy=POLICY)
                t0 = time.perf_counter()
                if kind == "chunked":
                    fetch_chunked(f, url, chunked, store, ChunkIndex())
                else:
                    f.fetch_blob(url, plain, store)
                times[kind].append(time.perf_counter() - t0)
                store.path(sha).unlink()
    finally:
        server.terminate()
    ours, base = min(times["chunked"]), min(times["whole"])
    row("full_download_seconds", ours, base, "ratio <= 1.10 (no slower than whole-file)", ours / base <= 1.10,
        blob_mb=mb, chunks=chunk_count(len(data), DEFAULT_CHUNK_SIZE), parallel=POLICY.parallel,
        cpus=os.cpu_count(), median_ratio=round(statistics.median(times["chunked"])
                                                / statistics.median(times["whole"]), 3),
        runs_chunked=[round(t, 3) for t in times["chunked"]],
        runs_whole=[round(t, 3) for t in times["whole"]])


def build_rows(tmp: Path) -> None:
    path = tmp / "blob"
    size = path.stat().st_size
    t0 = time.perf_counter()
    hash_chunks(path, DEFAULT_CHUNK_SIZE)
    chunked = time.perf_counter() - t0
    t0 = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    whole = time.perf_counter() - t0
    row("build_chunk_hash_seconds", chunked, whole, "ratio <= 2.5 (one more hash pass, at build time only)",
        chunked / whole <= 2.5, file_mb=size >> 20)

    # Pure-Python gear-hash CDC (the inner loop of FastCDC) on 4 MiB, scaled to 200 MB.
    sample = os.urandom(4 << 20)
    gear = [int.from_bytes(hashlib.sha256(bytes([i])).digest()[:8], "little") for i in range(256)]
    mask, h, cuts = (1 << 20) - 1, 0, 0
    t0 = time.perf_counter()
    for b in sample:
        h = ((h << 1) + gear[b]) & 0xFFFFFFFFFFFFFFFF
        if not h & mask:
            cuts += 1
    cdc = (time.perf_counter() - t0) * (200 << 20) / len(sample)
    fixed = chunked * (200 << 20) / size
    row("cdc_python_seconds_per_200mb", fixed, cdc, "fixed-size chunking much cheaper than CDC",
        fixed < cdc / 10, note="ours = fixed-size chunk hashing; baseline = pure-Python gear-hash CDC")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=1024)  # 4 MiB per layer: a 64 MiB model
    p.add_argument("--changed", type=int, default=2)
    p.add_argument("--full-mb", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    fleet = ChunkFleet().start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-chunks-") as tmp:
            release_rows(Path(tmp), fleet, args.layers, args.dim, args.changed)
            full_download_row(Path(tmp), args.full_mb, args.repeat)
            build_rows(Path(tmp))
    finally:
        fleet.stop()


if __name__ == "__main__":
    main()
