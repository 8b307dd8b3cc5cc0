"""Model shapes: batch axes, scalars, constants and state (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_kit.config import ModelConfig, TensorSpec
from serve_kit.errors import UsageError

# ---------------------------------------------------------------------------------------------
# TensorSpec: batch axis and scalars


@pytest.mark.parametrize("text, shape, axis", [
    ("state:FP32:2x-1x128@1", [2, -1, 128], 1),
    ("sr:INT64:scalar", [], None),
    ("sr:INT64:SCALAR", [], None),
    ("x:FP32:3x4@none", [3, 4], None),
    ("x:FP32:-1x4@none", [-1, 4], None),
    ("x:FP32:-1x4", [-1, 4], 0),
    ("x:FP32:-1x4@0", [-1, 4], 0),
    ("x:FP32:3x4", [3, 4], None),  # a fixed first dimension is no batch axis
])
def test_parse_batch_axis(text, shape, axis):
    spec = TensorSpec.parse(text)
    assert (spec.shape, spec.batch_axis) == (shape, axis)
    assert TensorSpec.parse(spec.describe()) == spec


def test_sample_shape_follows_the_axis():
    assert TensorSpec.parse("state:FP32:2x-1x128@1").sample_shape() == [2, 128]
    assert TensorSpec.parse("sr:INT64:scalar").sample_shape() == []
    assert TensorSpec.parse("x:FP32:3x4@none").sample_shape() == [3, 4]


@pytest.mark.parametrize("text, needle", [
    ("state:FP32:2x-1x128@3", "batch_axis 3 is not a dimension"),
    ("state:FP32:2x-1x128@0", "must be -1"),
    ("sr:INT64:scalar@0", "is not a dimension"),
    ("x:FP32:2x@1", "NAME:DATATYPE:SHAPE"),
    ("x:FP32:-1@x", "NAME:DATATYPE:SHAPE"),
])
def test_parse_bad_axis_is_a_usage_error(text, needle):
    with pytest.raises(UsageError) as ei:
        TensorSpec.parse(text)
    assert needle in ei.value.render()
    assert "--input" in ei.value.render()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(-1), st.integers(1, 9)), max_size=4), st.data())
def test_describe_round_trips(shape, data):
    variable = [i for i, d in enumerate(shape) if d == -1]
    axis = data.draw(st.sampled_from([None, *variable]))
    spec = TensorSpec(name="t", datatype="FP32", shape=shape, batch_axis=axis)
    assert TensorSpec.parse(spec.describe()) == spec


def _cfg(mbs, inputs):
    return dict(name="m", backend="onnxruntime", max_batch_size=mbs, inputs=inputs,
                outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 1]}])


def test_unbatched_config_takes_any_axis_and_scalars():
    cfg = ModelConfig(**_cfg(0, [{"name": "state", "datatype": "FP32", "shape": [2, -1, 128], "batch_axis": 1},
                                 {"name": "sr", "datatype": "INT64", "shape": []}]))
    assert cfg.inputs[1].batch_axis is None
    assert ModelConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("spec", [
    {"name": "state", "datatype": "FP32", "shape": [2, -1, 128], "batch_axis": 1},
    {"name": "sr", "datatype": "INT64", "shape": []},
    {"name": "x", "datatype": "FP32", "shape": [-1, 4], "batch_axis": None},
])
def test_batched_config_refuses_other_axes(spec):
    with pytest.raises(ValueError, match="max_batch_size 0"):
        ModelConfig(**_cfg(8, [spec]))


# ---------------------------------------------------------------------------------------------
# A small stateful model shaped like silero-vad: input [N, 8], state [2, N, 4] (batch on axis 1),
# sr a rank-0 INT64 that an `If` branches on; outputs output [N, 1] and stateN [2, N, 4].

import asyncio  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from serve_kit.config import SourceSpec, TargetSpec  # noqa: E402
from serve_kit.errors import DataError, InputError  # noqa: E402
from serve_kit.optimize import calibration as cal  # noqa: E402
from serve_kit.optimize.signature import (Signature, bake_onnx, bind, constant_array, parse_constants,  # noqa: E402
                                          parse_state)

W = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32) * 0.5


def vad_like_onnx(path: Path) -> Path:
    def branch(name, scale):
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
        c = numpy_helper.from_array(np.array(scale, np.float32), f"{name}_c")
        return helper.make_graph([helper.make_node("Mul", ["xw", f"{name}_c"], [f"{name}_y"])], name, [], [out], [c])

    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["xw"]),
        helper.make_node("Equal", ["sr", "k16"], ["is16"]),
        helper.make_node("If", ["is16"], ["h"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
        helper.make_node("Unsqueeze", ["h", "zero"], ["h0"]),
        helper.make_node("Add", ["state", "h0"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["stateN"]),
        helper.make_node("ReduceMean", ["stateN", "axes"], ["m"], keepdims=0),   # [N, 4]
        helper.make_node("ReduceSum", ["m", "one"], ["s"], keepdims=1),          # [N, 1]
        helper.make_node("Sigmoid", ["s"], ["output"]),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array(16000, np.int64), "k16"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "vad_like", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 4]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ], [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def vad_like_numpy(x, state, sr):
    h = x @ W * (1.0 if sr == 16000 else 2.0)
    new = np.tanh(state + h[None])
    return {"output": 1 / (1 + np.exp(-new.mean(0).sum(-1, keepdims=True))), "stateN": new}


def streams(n=40, seqs=1, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    out = {"input": x}
    if seqs > 1:
        out["sequence"] = np.arange(n) % seqs
    return out


STATE_SIG = Signature([TensorSpec.parse("input:FP32:-1x8"), TensorSpec.parse("state:FP32:2x-1x4@1")],
                      [TensorSpec.parse("output:FP32:-1x1"), TensorSpec.parse("stateN:FP32:2x-1x4@1")],
                      {}, {"stateN": "state"})


def _numpy_fn(batch):
    return vad_like_numpy(batch["input"], batch["state"], 16000)


def _sequential(x, seq):
    """The reference loop: each stream on its own, one chunk at a time, from zero state."""
    out = np.zeros((len(x), 1), np.float32)
    for s in np.unique(seq):
        state = np.zeros((2, 1, 4), np.float32)
        for i in np.flatnonzero(seq == s):
            r = vad_like_numpy(x[i:i + 1], state, 16000)
            out[i], state = r["output"][0], r["stateN"]
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_closed_loop_equals_streaming_each_sequence_alone(seq):
    seq = np.array(seq)
    x = np.random.default_rng(len(seq)).standard_normal((len(seq), 8)).astype(np.float32)
    ds = cal.to_dataset({"input": x, "sequence": seq}, STATE_SIG.inputs, "labels", "t", optional={"state"})
    calls = []
    out, fed = STATE_SIG.closed_loop(lambda b: calls.append(b["input"].shape[0]) or _numpy_fn(b), ds)
    np.testing.assert_allclose(out["output"], _sequential(x, seq), rtol=1e-6, atol=1e-6)
    # Steps run the sequences in parallel: as many calls as the longest sequence.
    assert len(calls) == max(np.bincount(seq)) and sum(calls) == len(seq)
    assert fed["state"].shape == (2, len(seq), 4) and out["stateN"].shape == (2, len(seq), 4)


def test_complete_fills_the_state_the_reference_saw():
    ds = cal.to_dataset(streams(10), STATE_SIG.inputs, "labels", "t", optional={"state"})
    done, out = STATE_SIG.complete(_numpy_fn, ds)
    assert done.inputs["state"].shape == (2, 10, 4) and done.axis("state") == 1
    assert not done.inputs["state"][:, 0].any()  # the stream starts from zeros
    np.testing.assert_allclose(done.inputs["state"][:, 1:], out["stateN"][:, :-1])
    # Run open-loop on the completed data, each sample gives the closed-loop answer.
    np.testing.assert_allclose(_numpy_fn(done.slice(0, 10))["output"], out["output"], rtol=1e-6)


def test_state_output_that_does_not_fit_its_input():
    sig = Signature(STATE_SIG.inputs, STATE_SIG.outputs, {}, {"output": "state"})
    ds = cal.to_dataset(streams(3), sig.inputs, "labels", "t", optional={"state"})
    with pytest.raises(InputError, match="cannot feed state input"):
        sig.run(_numpy_fn, ds)


def test_served_max_batch():
    assert STATE_SIG.served_max_batch(64) == 0
    plain = Signature([TensorSpec.parse("x:FP32:-1x8")], [TensorSpec.parse("y:FP32:-1x1")])
    assert plain.served_max_batch(64) == 64
    scalar_in = Signature([TensorSpec.parse("x:FP32:-1x8"), TensorSpec.parse("k:INT64:scalar")],
                          [TensorSpec.parse("y:FP32:-1x1")])
    assert scalar_in.served_max_batch(64) == 0


# -- parsing ---------------------------------------------------------------------------------


def test_parse_constants_and_state():
    assert parse_constants(["sr=16000", "scale=[0.5, 2]", "mode=fast", "on=true"]) == {
        "sr": 16000, "scale": [0.5, 2], "mode": "fast", "on": True}
    assert parse_state(["stateN=state", " h_out = h "]) == {"stateN": "state", "h_out": "h"}
    for bad in (["sr"], ["=3"], ["sr="], ["sr=1", "sr=2"]):
        with pytest.raises(UsageError, match="constant"):
            parse_constants(bad)
    for bad in (["stateN"], ["a=x", "b=x"]):
        with pytest.raises(UsageError):
            parse_state(bad)


def test_constant_dtypes():
    assert constant_array("sr", 16000, None).dtype == np.int64
    assert constant_array("g", 0.5, None).dtype == np.float32
    assert constant_array("sr", 16000, TensorSpec.parse("sr:INT32:scalar")).dtype == np.int32
    with pytest.raises(UsageError, match="shape"):
        constant_array("sr", [1, 2], TensorSpec.parse("sr:INT64:scalar"))


# -- constants: bake (ONNX) and bind (torch) --------------------------------------------------


def test_bake_removes_the_if_and_keeps_the_answer(tmp_path):
    src = vad_like_onnx(tmp_path / "m.onnx")
    baked, details = bake_onnx(src, {"sr": np.array(16000, np.int64)}, tmp_path / "w")
    assert details["if_nodes"] == {"before": 1, "after": 0}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(baked), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input", "state"]
    x, s = streams(3)["input"], np.zeros((2, 3, 4), np.float32)
    got = dict(zip(["output", "stateN"], sess.run(None, {"input": x, "state": s})))
    np.testing.assert_allclose(got["output"], vad_like_numpy(x, s, 16000)["output"], rtol=1e-5)


def test_bind_gives_python_values_to_non_tensor_arguments():
    import torch

    class M(torch.nn.Module):
        def forward(self, x, sr: int, gain: torch.Tensor):
            assert isinstance(sr, int)
            return x * gain + (1.0 if sr == 16000 else 0.0)

    bound = bind(M(), {"sr": np.array(16000), "gain": np.array([2.0], np.float32)}, ["x"])
    out = bound(torch.ones(2, 3))
    assert torch.equal(out, torch.full((2, 3), 3.0))
    scripted = torch.jit.script(M())
    assert torch.equal(bind(scripted, {"sr": np.array(16000), "gain": np.array([2.0], np.float32)}, ["x"])(
        torch.ones(1, 3)), torch.full((1, 3), 3.0))
    traced = torch.jit.trace(bind(scripted, {"sr": np.array(8000), "gain": np.array([1.0], np.float32)}, ["x"]),
                             (torch.ones(1, 3),))
    assert torch.equal(traced(torch.ones(4, 3)), torch.ones(4, 3))


# -- the whole optimize run ------------------------------------------------------------------

from serve_kit.config import DataSpec, LatencySpec, load_model_config  # noqa: E402
from serve_kit.optimize.pipeline import OptimizeJob, run  # noqa: E402

FAST = LatencySpec(batch_sizes=[1], min_seconds=0.02)


def vad_job(tmp_path, model: Path, data: Path, **kw) -> OptimizeJob:
    base = dict(source=SourceSpec(path=str(model)), repository=tmp_path / "repo", data=DataSpec(calibration=str(data)),
                latency=FAST, model_name="vad", targets=[TargetSpec(name="onnx")],
                inputs=[TensorSpec.parse("sr:INT64:scalar")], constants={"sr": 16000}, state={"stateN": "state"})
    base.update(kw)
    return OptimizeJob(**base)


def test_stateful_onnx_with_a_constant_is_optimized_and_served_unbatched(tmp_path):
    model = vad_like_onnx(tmp_path / "vad.onnx")
    data = tmp_path / "stream.npz"
    x = streams(60)["input"]
    np.savez(data, input=x, sr=np.array(16000, np.int64))  # the constant's array is dropped
    report = run(vad_job(tmp_path, model, data))
    assert report["variants"][0]["status"] == "passed", report["variants"][0]
    assert report["constants"] == {"sr": 16000} and report["state"] == {"stateN": "state"}
    assert report["source"]["baked"]["if_nodes"] == {"before": 1, "after": 0}
    assert [s["name"] for s in report["inputs"]] == ["input", "state"]
    assert {o["name"]: o["batch_axis"] for o in report["outputs"]} == {"output": 0, "stateN": 1}
    # One stream cut in two: calibration the first 30 chunks, evaluation the rest, closed-loop.
    assert report["evaluation"]["samples"] == 30
    cfg = load_model_config(tmp_path / "repo" / "vad" / "config.yaml")
    assert cfg.max_batch_size == 0 and cfg.dynamic_batching is None
    assert [(t.name, t.batch_axis) for t in cfg.inputs] == [("input", 0), ("state", 1)]

    # Served as written: stream chunk by chunk through the runtime, state fed back by the client.
    from serve_kit.runtime.models import ModelManager
    from serve_kit.runtime.types import InferRequest

    async def stream():
        outs = []
        state = np.zeros((2, 1, 4), np.float32)
        async with ModelManager(tmp_path / "repo", cores=1) as m:
            for i in range(5):
                r = await m.infer(InferRequest(model="vad", inputs={"input": x[i:i + 1], "state": state}))
                outs.append(r.outputs["output"][0])
                state = r.outputs["stateN"]
        return np.array(outs)

    got = asyncio.run(stream())
    np.testing.assert_allclose(got, _sequential(x[:5], np.zeros(5, int)), rtol=1e-5, atol=1e-6)

    # The stored samples are one whole request that answers as the reference did (smoke tests,
    # warm-up and `serve-kit bench` send it as is).
    from serve_kit.bench.offline import _batch, _samples
    from serve_kit.repository import read_samples
    from serve_kit.runtime.backends import load_backend

    stored, reference = read_samples(tmp_path / "repo" / "vad" / "1" / "samples.npz")
    assert stored["state"].shape == (2, 8, 4) and stored["input"].shape == (8, 8)
    backend = load_backend("onnxruntime", tmp_path / "repo" / "vad" / "1" / "model.onnx",
                           output_names=["output", "stateN"])
    answer = backend.infer(stored)
    np.testing.assert_allclose(answer["output"], reference["output"], rtol=1e-5, atol=1e-6)
    samples, synthetic = _samples(cfg, tmp_path / "repo" / "vad" / "1", False, "vad v1")
    assert not synthetic
    assert {k: v.shape for k, v in _batch(samples, 1, False).items()} == {"input": (8, 8), "state": (2, 8, 4)}


def test_stateful_data_with_sequences_and_initial_state(tmp_path):
    model = vad_like_onnx(tmp_path / "vad.onnx")
    data = tmp_path / "streams.npz"
    s = streams(48, seqs=4)
    init = np.random.default_rng(1).standard_normal((2, 48, 4)).astype(np.float32) * 0.1
    np.savez(data, **s, state=init)
    report = run(vad_job(tmp_path, model, data))
    assert report["variants"][0]["status"] == "passed"
    assert report["calibration"]["sequences"] == 2 and report["evaluation"]["sequences"] == 2


def test_scalar_input_fed_per_call_without_constant(tmp_path):
    """sr stays an input (rank 0, fed whole to every call): served unbatched with sr in its signature."""
    model = vad_like_onnx(tmp_path / "vad.onnx")
    data = tmp_path / "stream.npz"
    np.savez(data, input=streams(20)["input"], sr=np.array(8000, np.int64))
    report = run(vad_job(tmp_path, model, data, constants={}))
    assert report["variants"][0]["status"] == "passed"
    assert [s["name"] for s in report["inputs"]] == ["input", "state", "sr"]
    assert load_model_config(tmp_path / "repo" / "vad" / "config.yaml").max_batch_size == 0

    # Served: a rank-0 input in a request, through the runtime's checks and an HTTP-style JSON body.
    from serve_kit.runtime.models import ModelManager
    from serve_kit.runtime.protocol import decode_infer_request

    x = streams(2)["input"]
    body = json.dumps({"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [2, 8], "data": x.ravel().tolist()},
        {"name": "state", "datatype": "FP32", "shape": [2, 2, 4], "data": [0.0] * 16},
        {"name": "sr", "datatype": "INT64", "shape": [], "data": [8000]}]}).encode()

    async def once():
        async with ModelManager(tmp_path / "repo", cores=1) as m:
            decoded = decode_infer_request(body, None, m.config("vad"), "vad", None)
            return await m.infer(decoded)

    r = asyncio.run(once())
    want = vad_like_numpy(x, np.zeros((2, 2, 4), np.float32), 8000)
    np.testing.assert_allclose(r.outputs["output"], want["output"], rtol=1e-5)


def test_unknown_constant_and_state_names_are_usage_errors(tmp_path):
    model = vad_like_onnx(tmp_path / "vad.onnx")
    data = tmp_path / "stream.npz"
    np.savez(data, input=streams(8)["input"])
    with pytest.raises(UsageError, match="no input of the ONNX model"):
        run(vad_job(tmp_path, model, data, constants={"rate": 16000, "sr": 16000}))
    with pytest.raises(UsageError, match="output 'hN'"):
        run(vad_job(tmp_path, model, data, state={"hN": "state"}))
    # Nothing written: only the run logs (contract 6) are there.
    assert sorted(p.name for p in (tmp_path / "repo" / "vad").iterdir()) == [".runs"]


def test_wrong_batch_axis_gets_the_axis_hint(tmp_path):
    model = vad_like_onnx(tmp_path / "vad.onnx")
    data = tmp_path / "stream.npz"
    np.savez(data, input=streams(8)["input"], state=np.zeros((2, 8, 4), np.float32))
    with pytest.raises(DataError) as ei:
        run(vad_job(tmp_path, model, data, inputs=[TensorSpec.parse("sr:INT64:scalar"),
                                                   TensorSpec(name="state", datatype="FP32", shape=[-1, -1, 4])]))
    assert "'state': 2 along axis 0" in ei.value.message and "@AXIS" in ei.value.hint


class _Vad:
    """A TorchScript module shaped like silero_vad.jit: forward(x, sr: int) with an int sr."""

    @staticmethod
    def save(path: Path) -> Path:
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 1)

            def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
                if sr == 16000:
                    return torch.sigmoid(self.lin(x))
                return torch.sigmoid(self.lin(x * 2))

        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(M().eval()), str(path))
        return path


def test_torchscript_with_int_argument_needs_and_takes_a_constant(tmp_path):
    model = _Vad.save(tmp_path / "vad.jit")
    data = tmp_path / "x.npz"
    np.savez(data, x=streams(32)["input"])
    base = dict(source=SourceSpec(path=str(model)), repository=tmp_path / "repo", data=DataSpec(calibration=str(data)),
                latency=FAST, model_name="vadjit", targets=[TargetSpec(name="torchscript"), TargetSpec(name="onnx")],
                keep_going=True)
    with pytest.raises(UsageError) as ei:
        run(OptimizeJob(**base))
    assert "'sr'" in ei.value.message and "--constant sr=16000" in ei.value.hint
    report = run(OptimizeJob(**base, constants={"sr": 16000}))
    rows = {v["name"]: v for v in report["variants"]}
    assert rows["torchscript"]["status"] == "passed"
    assert rows["onnx"]["status"] in ("passed", "not-applicable", "error")
    assert report["written"]["variant"] in ("torchscript", "onnx")
    cfg = load_model_config(tmp_path / "repo" / "vadjit" / "config.yaml")
    assert [t.name for t in cfg.inputs] == ["x"]


def test_float64_data_for_a_factory_gets_the_float32_hint(tmp_path):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 64)))  # float64
    with pytest.raises(DataError) as ei:
        run(OptimizeJob(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "repo",
                        data=DataSpec(calibration=str(data)), latency=FAST, targets=[TargetSpec(name="onnx")]))
    assert "float64" in ei.value.message and "astype(np.float32)" in ei.value.hint


# -- silero-vad as shipped (the wheel's three files), through the command line ----------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402

SILERO = "silero-vad==6.2.3"
CACHE = Path(os.environ.get("SERVE_KIT_CACHE", Path.home() / ".cache" / "serve-kit"))


@pytest.fixture(scope="module")
def silero_dir():
    """silero_vad/data from the PyPI wheel (cached; the zoo's download is reused when present)."""
    out = CACHE / "shapes" / "silero-vad-6.2.3"
    if not (out / "silero_vad.jit").exists():
        wheels = sorted([*(CACHE / "zoo" / "wheels").glob("silero_vad-6.2.3-*.whl"),
                         *(CACHE / "wheels").glob("silero_vad-6.2.3-*.whl")])
        if not wheels:
            (CACHE / "wheels").mkdir(parents=True, exist_ok=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SILERO, "-d",
                                str(CACHE / "wheels")], capture_output=True, text=True, timeout=300)
            wheels = sorted((CACHE / "wheels").glob("silero_vad-6.2.3-*.whl"))
            if r.returncode or not wheels:
                pytest.skip(f"cannot download {SILERO}: {r.stderr.strip().splitlines()[-1:]}")
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            for name in ("silero_vad.onnx", "silero_vad_16k_op15.onnx", "silero_vad.jit"):
                (out / name).write_bytes(z.read(f"silero_vad/data/{name}"))
    return out


def speech_like(seconds: float = 10.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Voiced bursts (harmonics of a wandering pitch, syllable-rate envelope) in noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.01 * rng.standard_normal(len(t))
    for start in np.arange(0.4, seconds - 1, 1.5):
        dur, f0 = rng.uniform(0.4, 0.9), rng.uniform(100, 220)
        m = (t >= start) & (t < start + dur)
        env = np.sin(np.pi * (t[m] - start) / dur) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t[m]))
        sig[m] += 0.3 * env * sum(np.sin(2 * np.pi * f0 * k * t[m] + rng.uniform(0, 6)) / k for k in range(1, 10))
    return sig.astype(np.float32)


def silero_data(tmp_path: Path) -> tuple[Path, Path]:
    """(ONNX data: 512-sample chunks with the 64 samples of context the ONNX graph takes; TorchScript
    data: the bare chunks, its module keeps the context itself)."""
    chunks = speech_like()[: 312 * 512].reshape(312, 512)
    context = np.concatenate([np.zeros((1, 64), np.float32), chunks[:-1, -64:]])
    onnx_npz, jit_npz = tmp_path / "onnx.npz", tmp_path / "jit.npz"
    np.savez(onnx_npz, input=np.concatenate([context, chunks], axis=1))
    np.savez(jit_npz, x=chunks)
    return onnx_npz, jit_npz


@pytest.mark.slow
@pytest.mark.parametrize("file, targets", [
    ("silero_vad.onnx", ["onnx", "onnx-int8-static"]),
    ("silero_vad_16k_op15.onnx", ["onnx", "onnx-int8-static"]),
    ("silero_vad.jit", ["torchscript", "onnx"]),
])
def test_silero_vad_as_shipped(tmp_path, silero_dir, cli_env, file, targets):
    onnx_npz, jit_npz = silero_data(tmp_path)
    repo = tmp_path / "repo"
    args = ["--json", "optimize", str(silero_dir / file), "-r", str(repo), "--name", "vad", "--constant", "sr=16000",
            "--batch-sizes", "1", "--keep-going", *[a for t in targets for a in ("-t", t)]]
    if file.endswith(".onnx"):
        args += ["--input", "sr:INT64:scalar", "--state", "stateN=state", "--calibration-data", str(onnx_npz)]
    else:
        args += ["--calibration-data", str(jit_npz)]
    r = subprocess.run([sys.executable, "-m", "serve_kit", *args], env=cli_env, capture_output=True, text=True,
                       timeout=600)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((repo / "vad" / "1" / "optimize-report.json").read_text()
                        if (repo / "vad" / "1" / "optimize-report.json").exists()
                        else (repo / "vad" / "optimize-report.json").read_text())
    rows = {v["name"]: v for v in report["variants"]}
    # `source` is the row --when-slower adds when no variant is stably faster than the original.
    assert set(targets) <= set(rows) <= {*targets, "source"}
    assert all(v["status"] in ("passed", "failed", "not-applicable", "unavailable", "error") for v in rows.values())
    assert rows[targets[0]]["status"] == "passed"
    assert report["constants"] == {"sr": 16000}
    cfg = load_model_config(repo / "vad" / "config.yaml")
    assert "sr" not in [t.name for t in cfg.inputs]
    if file.endswith(".onnx"):
        assert report["source"]["baked"]["if_nodes"]["after"] < report["source"]["baked"]["if_nodes"]["before"]
        assert cfg.max_batch_size == 0 and {t.name: t.batch_axis for t in cfg.inputs} == {"input": 0, "state": 1}
        errors = (rows["onnx-int8-static"].get("validation") or {}).get("errors") or {}
        if rows["onnx-int8-static"]["status"] == "passed" and errors:
            # Closed-loop over the stream, a quantized state that drifts cannot pass.
            assert min(c["cosine_mean"] for c in errors.values() if c.get("cosine_mean") is not None) >= 0.99


def test_torchscript_int_argument_fed_per_call_is_served(tmp_path):
    """Without --constant, a rank-0 input for an `int` forward() argument: the TorchScript backend
    passes it as a Python int, and the model is served unbatched with `sr` in its signature."""
    model = _Vad.save(tmp_path / "vad.jit")
    data = tmp_path / "x.npz"
    np.savez(data, x=streams(16)["input"], sr=np.array(8000, np.int64))
    report = run(OptimizeJob(source=SourceSpec(path=str(model)), repository=tmp_path / "repo",
                             data=DataSpec(calibration=str(data)), latency=FAST, model_name="vadjit",
                             inputs=[TensorSpec.parse("x:FP32:-1x8"), TensorSpec.parse("sr:INT64:scalar")],
                             targets=[TargetSpec(name="torchscript")]))
    assert report["variants"][0]["status"] == "passed"
    cfg = load_model_config(tmp_path / "repo" / "vadjit" / "config.yaml")
    assert cfg.max_batch_size == 0 and [t.name for t in cfg.inputs] == ["x", "sr"]
    from serve_kit.runtime.backends import load_backend

    backend = load_backend("torchscript", tmp_path / "repo" / "vadjit" / "1" / "model.pt", output_names=["output_0"],
                           options={"input_names": ["x", "sr"]})
    x = streams(3)["input"]
    a = backend.infer({"x": x, "sr": np.array(8000, np.int64)})
    b = backend.infer({"x": x, "sr": np.array(16000, np.int64)})
    assert not np.allclose(a["output_0"], b["output_0"])


def test_module_level_runner_and_calibration_set():
    from serve_kit.optimize import signature

    ds = cal.to_dataset(streams(12, seqs=3), STATE_SIG.inputs, "labels", "t", optional={"state"})
    run_all = signature.runner(_numpy_fn, STATE_SIG)
    np.testing.assert_allclose(run_all(ds)["output"], _sequential(ds.inputs["input"], ds.sequence), rtol=1e-6)
    calib = signature.calibration_set(STATE_SIG, _numpy_fn, ds)
    assert calib.inputs["state"].shape == (2, 12, 4) and calib.axis("state") == 1


def test_recipe_takes_constants_and_state():
    from serve_kit.config import Recipe

    r = Recipe.model_validate({"name": "vad", "model": {"path": "silero_vad.onnx"}, "constants": {"sr": 16000},
                               "state": {"stateN": "state"},
                               "inputs": [{"name": "state", "datatype": "FP32", "shape": [2, -1, 128], "batch_axis": 1}]})
    assert r.constants == {"sr": 16000} and r.state == {"stateN": "state"} and r.inputs[0].batch_axis == 1


def test_cli_refuses_bad_shape_options_before_any_work(tmp_path, cli_env):
    for args, needle in ((["--constant", "sr"], "constant is not NAME=VALUE"),
                         (["--state", "stateN"], "state is not OUTPUT=INPUT"),
                         (["--input", "state:FP32:2x-1x128@0"], "must be -1")):
        r = subprocess.run([sys.executable, "-m", "serve_kit", "optimize", str(tmp_path / "none.onnx"), *args],
                           env=cli_env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_model_that_keeps_state_inside_is_found_and_served_one_request_at_a_time():
    """Two identical calls that answer differently: the state lives inside the model (silero-vad's
    TorchScript file). It is reported, and such a model is never batched across requests."""
    import torch

    from serve_kit.optimize.signature import hidden_state

    class Accumulates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("acc", torch.zeros(1))

        def forward(self, x):
            self.acc += x.sum()
            return x * self.acc

    class Pure(torch.nn.Module):
        def forward(self, x):
            return x * 2

    x = np.ones((4, 3), np.float32)
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1, 3])
    ds = cal.Dataset({"x": x}, None, origin="test")
    for module, keeps in ((Accumulates(), True), (Pure(), False)):
        sig = Signature([spec], [TensorSpec(name="y", datatype="FP32", shape=[-1, 3])])

        def fn(batch, m=module):
            with torch.no_grad():
                return {"y": m(torch.from_numpy(batch["x"])).numpy()}

        evidence = hidden_state(fn, sig, ds)
        assert bool(evidence) is keeps, evidence
        sig.hidden_state = evidence
        assert sig.served_max_batch(8) == (0 if keeps else 8)
        assert ("hidden_state" in sig.describe()) is keeps
