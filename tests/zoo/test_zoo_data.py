"""The zoo's data are real: each model, as shipped and run directly (no serve-kit), scores well on
them with its task metric. This is what makes the optimize cases' gates and metric deltas mean
something; it runs without any of serve-kit's optimize code."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from zoo import data, metrics, models, wheels


def test_wheels_are_pinned_and_cached():
    for dist, w in wheels.WHEELS.items():
        path = wheels.wheel_file(dist)
        assert path.parent == wheels.cache_root() / "wheels" / f"{w.dist}-{w.version}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == w.sha256
    for name in wheels.ASSETS:
        assert wheels.asset(name).stat().st_size > 0


def test_data_are_cached_by_content(tmp_path, monkeypatch):
    calls = []

    def build(n):
        calls.append(n)
        return {"x": np.arange(n)}

    monkeypatch.setenv("SERVE_KIT_ZOO_CACHE", str(tmp_path))
    a = data.cached("t", {"n": 3}, build)
    assert data.cached("t", {"n": 3}, build) == a and calls == [3]
    assert data.cached("t", {"n": 4}, build) != a and calls == [3, 4]
    assert a.parent == tmp_path / "data"


def _closed_loop_onnx(path, d):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seq = d["sequence"]
    n = int(seq.max()) + 1
    length = len(seq) // n
    assert (np.bincount(seq) == length).all() and (np.diff(seq) >= 0).all()  # streams of equal length, in order
    x = d["input"].reshape(n, length, -1)
    state = d["state"][:, ::length]  # each stream's first chunk: its initial state
    probs = []
    for i in range(length):
        p, state = sess.run(None, {"input": x[:, i], "state": state, "sr": np.array(16000, np.int64)})
        probs.append(p)
    return np.stack(probs, 1).reshape(-1, 1)


@pytest.mark.parametrize("name", ["silero-onnx", "silero-op15"])
def test_vad_reference_accuracy(name):
    d = data.load(data.vad())
    assert d["input"].shape[1] == data.CONTEXT + data.CHUNK and d["state"].shape[0] == 2
    assert 0.3 < d["labels"].mean() < 0.85  # speech and silence both present
    acc = metrics.vad_accuracy({"output": _closed_loop_onnx(wheels.asset(name), d)}, d["labels"])
    assert acc > 88, acc
    # A model that says "speech" everywhere would score the speech share only.
    assert acc > 100 * max(d["labels"].mean(), 1 - d["labels"].mean()) + 5


def test_vad_torchscript_reference_accuracy():
    import torch

    d = data.load(data.vad(context=False))
    assert d["x"].shape[1] == data.CHUNK and "state" not in d and "sequence" not in d
    model = torch.jit.load(str(wheels.asset("silero-jit")))
    x = torch.from_numpy(d["x"])
    with torch.no_grad():
        probs = [model(x[i:i + 1], 16000).numpy() for i in range(len(x))]
    acc = metrics.vad_accuracy({"output": np.concatenate(probs)}, d["labels"])
    assert acc > 88, acc


def test_ocr_recognizer_reads_the_rendered_text():
    import onnxruntime as ort

    d = data.load(data.text_crops())
    assert d["x"].shape[1:] == (3, 48, 320) and d["x"].dtype == np.float32
    chars = data.ctc_characters()
    sess = ort.InferenceSession(str(wheels.asset("ocr-rec")), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"x": d["x"]})[0]
    assert probs.shape[-1] == len(chars)
    acc = metrics.ocr_char_accuracy({"fetch_name_0": probs}, d["labels"])
    assert acc > 90, acc
    text = "".join(chars[c] for c in metrics.ctc_greedy(probs[:1])[0])
    assert text == "".join(chars[c] for c in d["labels"][0] if c >= 0)
    # The metric is not blind: scrambled labels score low.
    assert metrics.ocr_char_accuracy({"fetch_name_0": probs}, d["labels"][::-1]) < 50


def test_ocr_detector_finds_the_text_boxes():
    import onnxruntime as ort

    d = data.load(data.text_pages())
    assert d["x"].shape[1:] == (3, 320, 320) and d["labels"].shape[1:] == (320, 320)
    sess = ort.InferenceSession(str(wheels.asset("ocr-det")), providers=["CPUExecutionProvider"])
    prob = sess.run(None, {"x": d["x"]})[0]
    f1 = metrics.det_pixel_f1({"fetch_name_0": prob}, d["labels"])
    assert f1 > 55, f1
    assert metrics.det_pixel_f1({"fetch_name_0": prob}, np.roll(d["labels"], 160, axis=1)) < f1 / 2


@pytest.mark.parametrize("name,size", [("pnet", 12), ("rnet", 24), ("onet", 48)])
def test_mtcnn_tells_faces_from_non_faces(name, size):
    import torch

    d = data.load(data.faces(size, part=1))
    assert d["input"].shape[1:] == (3, size, size) and 0.3 < d["labels"].mean() < 0.7
    other = data.load(data.faces(size, part=0))
    a, b = d["input"][d["labels"] == 1], other["input"][other["labels"] == 1]
    assert not (a[:, None] == b[None]).all(axis=(2, 3, 4)).any()  # no face in both parts
    net = models.load(name)
    with torch.no_grad():
        prob = net(torch.from_numpy(d["input"]))[-1].numpy()
    acc = metrics.face_accuracy({"prob": prob}, d["labels"])
    assert acc > 95, acc


def test_metrics_edge_cases():
    assert metrics.edit_distance([1, 2, 3], [1, 3]) == 1 and metrics.edit_distance([], [4, 5]) == 2
    p = np.zeros((1, 5, 4), np.float32)
    p[0, np.arange(5), [1, 1, 0, 1, 2]] = 1  # "a a <blank> a b" -> a a b
    assert metrics.ctc_greedy(p) == [[1, 1, 2]]
    assert metrics.vad_accuracy({"output": np.array([[0.9], [0.1]])}, np.array([1, 0])) == 100.0
    assert metrics.face_accuracy({"prob": np.array([[0.2, 0.8], [0.6, 0.4]])}, np.array([1, 1])) == 50.0
