"""silero VAD from its PyPI wheel, from model file to serving (issue 21's "done when"):

- unquantized, it builds with no flags beyond the model and one feed of samples (``sr`` a
  0-d array), installs (the warm-up runs its golden inputs) and streams;
- with ``--quantize dynamic --fix-input sr=16000`` it builds to a smaller int8 bundle whose
  outputs match the float model within the recorded bound, installs, and streams 100 chunks
  through the agent's local API exactly as its raw runtime does, state carried in and out;
  the device refuses another ``sr``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from shared.bundle.archive import read_envelope
from shared.bundle.keyring import load_keyring

from .conftest import Device, vad_chunks, vad_stream, voiced_audio

REPO = Path(__file__).resolve().parents[2]
CHUNKS = 100


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "fleet.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vad") / "keys"
    done = cli("keys", "init", str(path))
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def steps(silero_models: Path) -> list[dict[str, np.ndarray]]:
    """100 chunks of speech-like audio streamed through the float model (feeds and outputs)."""
    return vad_stream(silero_models / "silero_vad.onnx", vad_chunks(voiced_audio(3.5))[:CHUNKS])


@pytest.fixture
def device(tmp_path: Path, keys: Path) -> Iterator[Device]:
    dev = Device(tmp_path / "state", keys)
    dev.server.start()
    yield dev
    dev.server.stop()
    dev.host.close()


def stream_through_api(device: Device, chunks: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """What an application does: each chunk with the state the previous answer gave back."""
    host, port = device.server.tcp_address  # type: ignore[misc]
    state = np.zeros((2, 1, 128), np.float32)
    answers = []
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as client:
        for x in chunks:
            buf = io.BytesIO()
            np.savez(buf, input=x, state=state, sr=np.array(16000, np.int64))
            r = client.post("/v1/models/vad/predict", content=buf.getvalue(),
                            headers={"Content-Type": "application/x-npz"})
            assert r.status_code == 200, r.text
            with np.load(io.BytesIO(r.content), allow_pickle=False) as out:
                answer = {k: out[k] for k in out.files}
            state = answer["stateN"]
            answers.append(answer)
    return answers


def raw_stream(model: Path, chunks: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{"output": s["out.output"], "stateN": s["out.stateN"]} for s in vad_stream(model, chunks)]


def assert_same_stream(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(want) == CHUNKS
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in ("output", "stateN"):
            assert g[name].shape == w[name].shape, (i, name)
            np.testing.assert_allclose(g[name], w[name], rtol=1e-5, atol=1e-6, err_msg=f"chunk {i} {name}")


def one_feed(tmp_path: Path, step: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "one-feed.npz"
    np.savez(path, input=step["input"], state=step["state"], sr=step["sr"])  # sr: a 0-d array
    return path


def test_unquantized_vad_builds_from_one_feed_installs_and_streams(
    silero_models: Path, keys: Path, steps: list[dict[str, np.ndarray]], device: Device, tmp_path: Path
) -> None:
    model = silero_models / "silero_vad.onnx"
    built = cli("bundle", "build", str(model), "--name", "vad", "--version", "6.2.3", "--offline",
                "--validation", str(one_feed(tmp_path, steps[20])), "--keys", str(keys),
                "-o", str(tmp_path / "vad.bundle"))
    assert built.returncode == 0, built.stderr
    device.installer.install_file(tmp_path / "vad.bundle")  # warm-up and smoke test on its golden feed
    chunks = [s["input"] for s in steps]
    assert_same_stream(stream_through_api(device, chunks), raw_stream(model, chunks))


@pytest.fixture(scope="module")
def int8_bundle(silero_models: Path, keys: Path, steps: list[dict[str, np.ndarray]],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bundle build --quantize dynamic --fix-input sr=16000`` on 25 streamed feeds."""
    tmp = tmp_path_factory.mktemp("vad-int8")
    samples = tmp / "stream.npz"  # 25 feeds stacked on a new first axis (sr: shape [25])
    every4 = steps[::4]
    np.savez(samples, **{k: np.stack([s[k] for s in every4]) for k in ("input", "state", "sr")})
    out = tmp / "vad-int8.bundle"
    built = cli("bundle", "build", str(silero_models / "silero_vad.onnx"), "--name", "vad",
                "--version", "6.2.3-int8", "--offline", "--validation", str(samples),
                "--quantize", "dynamic", "--fix-input", "sr=16000", "--keys", str(keys), "-o", str(out))
    assert built.returncode == 0, built.stderr
    assert "fixed    sr=16000" in built.stdout and "quant    dynamic int8" in built.stdout
    return out


def test_int8_vad_specialised_on_sr_is_smaller_within_bound_and_streams(
    silero_models: Path, int8_bundle: Path, steps: list[dict[str, np.ndarray]], device: Device
) -> None:
    model = silero_models / "silero_vad.onnx"
    out = int8_bundle
    every4 = steps[::4]
    record = device.installer.install_file(out)
    loaded = device.host.get("vad")
    assert loaded is not None, record
    m = loaded.manifest
    assert m.fixed_inputs == {"sr": 16000}
    assert m.quantization.mode == "dynamic" and m.quantization.weight_dtype == "int8"
    figures = m.quantization.agreement
    assert figures["samples"] == len(every4)
    assert figures["rel_l2_error"] <= 0.05  # the default --max-error, met by every output
    assert figures["output.output.rel_l2_error"] <= 0.05 and figures["output.stateN.rel_l2_error"] <= 0.05
    assert figures["size_ratio"] < 0.5
    int8_file = device.model_file("vad")
    assert int8_file.stat().st_size < 0.5 * model.stat().st_size

    chunks = [s["input"] for s in steps]
    served = stream_through_api(device, chunks)
    assert_same_stream(served, raw_stream(int8_file, chunks))  # chunk for chunk, its own runtime
    # ... and close to the float model over the whole stream. The recorded bound is per call
    # (each validation feed carries the float model's state); streamed, the int8 model carries
    # its own state and the error compounds a little (0.10 measured over these 100 chunks).
    f = np.concatenate([s["out.output"].ravel() for s in steps])
    q = np.concatenate([a["output"].ravel() for a in served])
    assert np.linalg.norm(q - f) / np.linalg.norm(f) <= 0.15
    assert np.abs(q - f).max() < 0.05

    host, port = device.server.tcp_address  # type: ignore[misc]
    r = httpx.post(f"http://{host}:{port}/v1/models/vad/predict", timeout=10, json={"inputs": {
        "input": chunks[0].tolist(), "state": np.zeros((2, 1, 128)).tolist(), "sr": 8000}})
    assert r.status_code == 400, r.text
    assert "sr" in r.json()["detail"] and "16000" in r.json()["detail"]


def test_int8_vad_streams_through_the_agents_predict_command(
    int8_bundle: Path, keys: Path, steps: list[dict[str, np.ndarray]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``edgefleet-agent install`` then ``predict`` chunk by chunk, the state carried in the
    .npz files; the same as the raw runtime on the bundled int8 model."""
    from agent.cli import main

    trust = load_keyring(keys).root_path
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "state"\ntrust_root = "{trust}"\n')
    assert main(["--config", str(cfg), "install", str(int8_bundle)]) == 0
    chunks = [s["input"] for s in steps[:5]]
    state = np.zeros((2, 1, 128), np.float32)
    got = []
    for i, x in enumerate(chunks):
        src, dest = tmp_path / f"in{i}.npz", tmp_path / f"out{i}.npz"
        np.savez(src, input=x, state=state, sr=np.array(16000, np.int64))
        assert main(["--config", str(cfg), "predict", "vad", "-i", str(src), "-o", str(dest)]) == 0
        with np.load(dest) as out:
            got.append({k: out[k] for k in out.files})
        state = got[-1]["stateN"]
    manifest = load_keyring(keys).trust_root().verify_manifest(read_envelope(int8_bundle)).manifest
    model_blob = next((tmp_path / "state").rglob(manifest.files["model"].sha256))  # as installed
    want = raw_stream(model_blob, chunks)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["output"], w["output"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g["stateN"], w["stateN"], rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "bad.npz", input=chunks[0], state=state, sr=np.array(8000, np.int64))
    capsys.readouterr()
    bad = ["predict", "vad", "-i", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "x.npz")]
    assert main(["--config", str(cfg), *bad]) != 0
    assert "built for sr = 16000 only" in capsys.readouterr().err


def test_int8_specialised_graph_has_no_top_level_branch_on_sr(silero_models: Path, tmp_path: Path) -> None:
    from fleet.bundles.specialise import specialise

    out = tmp_path / "fixed.onnx"
    folded = specialise(silero_models / "silero_vad.onnx", out, {"sr": np.array(16000, np.int64)})
    assert folded["if_folded"] >= 2  # the sr branch, and the decoder's branch on the state's dims
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", "state", "sr"]
    assert sorted(o.op_type for o in __import__("onnx").load(str(out)).graph.node).count("LSTM") == 1


def test_warm_up_and_batching_probe_run_on_the_golden_rows(
    keys: Path, device: Device, tmp_path: Path
) -> None:
    """A model that fails on inputs made from its signature (a reflect Pad of 2 on a dynamic
    axis set to 1, as silero's STFT and YOLO's Concat do) installs (warm-up on its golden
    inputs) and batches (the probe's rows come from the golden inputs too)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fleet.bundles.build import build_bundle

    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")], "reflect",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "m"])],
        [numpy_helper.from_array(np.array([0, 2, 0, 2], np.int64), "pads")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "pad.onnx"))
    golden = {"x": np.random.default_rng(0).random((1, 8), dtype=np.float32)}
    build_bundle(tmp_path / "pad.onnx", name="pad", version="1", release=1, keyring=load_keyring(keys),
                 out=tmp_path / "pad.bundle", golden_inputs=golden)
    device.installer.install_file(tmp_path / "pad.bundle")
    scheduler = device.host.scheduler("pad")
    assert scheduler is not None
    assert scheduler.unbatched_reason is None, scheduler.unbatched_reason
    assert scheduler.max_rows > 1
