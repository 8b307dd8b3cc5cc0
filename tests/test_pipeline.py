"""The optimize pipeline end to end (library level): sources, gates, diagnosis, selection, writes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import sk_models
from serve_kit.config import DataSpec, GateConfig, LatencySpec, SourceSpec, TargetSpec, TensorSpec
from serve_kit.errors import DataError, InputError, ModelLoadError, UsageError
from serve_kit.optimize.pipeline import OptimizeJob, run
from serve_kit.repository import Repository

FAST = LatencySpec(batch_sizes=[1, 4], min_seconds=0.05)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return sk_models.digits_npz(tmp_path_factory.mktemp("data") / "digits.npz")


def job(tmp_path, npz, **kw) -> OptimizeJob:
    base = dict(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "repo",
                data=DataSpec(calibration=npz), metric="top1", latency=FAST, model_name="mlp",
                targets=[TargetSpec(name="onnx"), TargetSpec(name="onnx-int8-static")],
                # On this shared machine a variant may not beat eager torch in every round: tests of
                # gates and writes must not depend on that (the --when-slower tests set their own).
                min_speedup=1e-3)
    base.update(kw)
    return OptimizeJob(**base)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_the_fastest_passing_variant_with_a_complete_manifest(tmp_path, npz):
    report = run(job(tmp_path, npz))
    assert [v["status"] for v in report["variants"]] == ["passed", "passed"]
    assert report["written"]["version"] == 1
    chosen = report["selected"]
    geo = {v["name"]: np.sqrt(v["latency"]["1"]["p50_ms"] * v["latency"]["4"]["p50_ms"]) for v in report["variants"]}
    assert chosen == min(geo, key=geo.get)

    repo = Repository(tmp_path / "repo")
    info = repo.version("mlp")
    assert repo.verify_version(info) == []
    m = info.manifest
    assert m["variant"] == chosen and m["backend"] == "onnxruntime" and m["model_file"] == "model.onnx"
    assert m["source"]["kind"] == "torch" and len(m["source"]["sha256"]) == 64
    assert m["calibration"]["synthetic"] is False and len(m["calibration"]["sha256"]) == 64
    assert m["calibration"]["sha256"] != m["evaluation"]["sha256"]
    assert {"torch", "onnx", "onnxruntime", "serve-kit"} <= set(m["tools"])
    assert m["validation"]["passed"] and m["validation"]["metric"] > 90
    cfg = repo.config("mlp")
    assert cfg.inputs[0].describe() == "x:FP32:-1x64" and cfg.outputs[0].describe() == "output_0:FP32:-1x10"

    # samples.npz holds real evaluation inputs with the reference's outputs for them
    with np.load(info.path / "samples.npz") as z:
        x, ref = z["input.x"], z["reference.output_0"]
    expected = sk_models.mlp()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-5)
    # the run's report is kept inside the version (hashed with it) and in the run log
    kept = json.loads((info.path / "optimize-report.json").read_text())
    assert kept["written"]["version"] == 1 and kept["report_path"] == str(info.path / "optimize-report.json")
    assert report["report_path"] == kept["report_path"] and kept["exit_code"] == 0
    runs = list((tmp_path / "repo" / "mlp" / ".runs").glob("*.json"))
    assert [str(p) for p in runs] == [report["run_report_path"]]
    assert json.loads(runs[0].read_text())["written"]["version"] == 1
    assert not (tmp_path / "repo" / "mlp" / "optimize-report.json").exists()  # no shared file any more


def test_a_strict_gate_fails_closed_and_leaves_earlier_versions_untouched(tmp_path, npz):
    run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")]))
    before = snapshot(tmp_path / "repo" / "mlp" / "1")
    config_before = (tmp_path / "repo" / "mlp" / "config.yaml").read_bytes()

    strict = job(tmp_path, npz, gates={"int8": GateConfig(min_cosine=0.999999999)},
                 targets=[TargetSpec(name="onnx"), TargetSpec(name="onnx-int8-static", config={"diagnose": False})])
    report = run(strict)
    assert report["gate_failed"] == ["onnx-int8-static"]
    assert report["written"] is None and "keep-going" in report["not_written_because"]
    assert Repository(tmp_path / "repo").version_numbers("mlp") == [1]
    assert snapshot(tmp_path / "repo" / "mlp" / "1") == before
    assert (tmp_path / "repo" / "mlp" / "config.yaml").read_bytes() == config_before
    failed = report["variants"][1]
    assert failed["gate_origin"] == "user" and not failed["validation"]["passed"]
    assert any(not c["passed"] and c["check"] == "output_0.cosine_mean" for c in failed["validation"]["checks"])

    # --keep-going writes the variant that passed, never the one that failed
    strict.keep_going = True
    report = run(strict)
    assert report["written"]["variant"] == "onnx" and report["written"]["version"] == 2


def test_metric_drop_gate(tmp_path, npz):
    # A metric drop of at most -1 points means "must improve by a point": impossible for FP32.
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx", gate=GateConfig(max_metric_drop=0.0))]))
    assert report["variants"][0]["status"] == "passed"
    v = report["variants"][0]["validation"]
    assert v["metric_delta"] == pytest.approx(0.0, abs=1e-9)
    assert any(c["check"] == "metric_drop" for c in v["checks"])


def test_int8_diagnosis_keeps_the_sensitive_layers_in_float(tmp_path, npz):
    report = run(job(tmp_path, npz, source=SourceSpec(factory="sk_models:outlier_mlp"),
                     targets=[TargetSpec(name="onnx-int8-static")], gates={"int8": GateConfig(min_cosine=0.999)}))
    v = report["variants"][0]
    assert v["status"] == "passed" and v["attempts"] >= 2
    assert v["history"][0]["failures"]  # the first attempt really missed
    kept = v["details"]["nodes_kept_in_float"]
    assert kept and v["details"]["ops"].get("QuantizeLinear")  # still a quantized model...
    # ...whose first layer (fine to quantize) stayed quantized
    import onnx

    repo = Repository(tmp_path / "repo")
    graph = onnx.load(str(repo.version("mlp").model_file)).graph
    quantized_weights = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert any(w.startswith("fc0.weight") for w in quantized_weights)
    assert not any(w.startswith("fc2.weight") for w in quantized_weights)


def test_int8_without_diagnosis_just_fails(tmp_path, npz):
    report = run(job(tmp_path, npz, source=SourceSpec(factory="sk_models:outlier_mlp"),
                     targets=[TargetSpec(name="onnx-int8-static", config={"diagnose": False})],
                     gates={"int8": GateConfig(min_cosine=0.999)}))
    assert report["variants"][0]["status"] == "failed" and report["variants"][0]["attempts"] == 1
    assert report["written"] is None


def test_synthetic_data_refused_unless_asked_and_then_recorded(tmp_path):
    spec = [TensorSpec(name="x", datatype="FP32", shape=[-1, 64])]
    with pytest.raises(DataError, match="real data") as e:
        run(OptimizeJob(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "r", inputs=spec))
    assert "--allow-synthetic-calibration" in e.value.hint
    report = run(OptimizeJob(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "r", inputs=spec,
                             allow_synthetic=True, targets=[TargetSpec(name="onnx")], latency=FAST))
    man = Repository(tmp_path / "r").version("model").manifest
    assert man["calibration"]["synthetic"] is True and man["evaluation"]["synthetic"] is True
    assert "SYNTHETIC" in man["calibration"]["notes"][0]
    assert report["evaluation"]["synthetic"] is True


def test_signature_is_inferred_from_forward_and_data(tmp_path, npz):
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")]))
    assert report["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 64], "batch_axis": 0}


@pytest.mark.parametrize("kind", ["onnx", "torchscript", "pt2", "safetensors", "state_dict"])
def test_every_source_kind(tmp_path, npz, kind):
    model = sk_models.mlp()
    x = torch.zeros(2, 64)
    inputs = [TensorSpec(name="x", datatype="FP32", shape=[-1, 64])]
    if kind == "onnx":
        p = tmp_path / "m.onnx"
        torch.onnx.export(model, (x,), str(p), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
        source, targets = SourceSpec(path=str(p)), ["onnx", "onnx-int8-dynamic"]
    elif kind == "torchscript":
        p = tmp_path / "m.pt"
        torch.jit.save(torch.jit.script(model), str(p))
        source, targets = SourceSpec(path=str(p)), ["torchscript", "onnx"]
    elif kind == "pt2":
        p = tmp_path / "m.pt2"
        ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=1024)}})
        torch.export.save(ep, str(p))
        source, targets = SourceSpec(path=str(p)), ["onnx"]
    elif kind == "safetensors":
        from safetensors.torch import save_file

        p = tmp_path / "w.safetensors"
        save_file(model.state_dict(), str(p))
        source, targets = SourceSpec(factory="sk_models:untrained_mlp", weights=str(p)), ["onnx"]
    else:
        p = tmp_path / "w.pt"
        torch.save(model.state_dict(), str(p))
        source, targets = SourceSpec(factory="sk_models:untrained_mlp", weights=str(p)), ["onnx"]
    report = run(job(tmp_path, npz, source=source, inputs=inputs, targets=[TargetSpec(name=t) for t in targets]))
    assert all(v["status"] == "passed" for v in report["variants"]), report["variants"]
    # the weights really were loaded: the reference is the trained model (high accuracy)
    assert report["reference"]["metric"] > 90


def test_pickled_weights_are_refused(tmp_path, npz):
    p = tmp_path / "evil.pt"
    torch.save({"state": sk_models.mlp().state_dict(), "obj": Path("/etc/passwd")}, str(p))
    with pytest.raises(ModelLoadError, match="never unpickles"):
        run(job(tmp_path, npz, source=SourceSpec(factory="sk_models:untrained_mlp", weights=str(p))))


def test_whole_module_pickle_is_refused_as_a_model(tmp_path, npz):
    p = tmp_path / "model.pt"
    with open(p, "wb") as f:
        pickle.dump({"not": "a model"}, f)
    with pytest.raises(ModelLoadError, match="not a zip"):
        run(job(tmp_path, npz, source=SourceSpec(path=str(p))))
    torch.save(sk_models.mlp(), str(p))  # torch.save of a whole module: a pickle inside a zip
    with pytest.raises(ModelLoadError, match="never unpickles"):
        run(job(tmp_path, npz, source=SourceSpec(path=str(p))))


def test_corrupt_onnx_file(tmp_path, npz):
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        run(job(tmp_path, npz, source=SourceSpec(path=str(p))))


def test_input_spec_that_does_not_match_the_model(tmp_path, npz):
    bad = [TensorSpec(name="x", datatype="FP32", shape=[-1, 32])]
    with pytest.raises(DataError, match="needs size 32"):
        run(job(tmp_path, npz, inputs=bad))  # the data (64 features) do not fit the declared spec
    with pytest.raises(InputError, match="fails on inputs"):
        run(job(tmp_path, npz, inputs=bad, data=DataSpec(), allow_synthetic=True))  # the model rejects 32

    p = tmp_path / "m.onnx"
    torch.onnx.export(sk_models.mlp(), (torch.zeros(2, 64),), str(p), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    with pytest.raises(InputError, match="does not match the ONNX model"):
        run(job(tmp_path, npz, source=SourceSpec(path=str(p)),
                inputs=[TensorSpec(name="x", datatype="FP16", shape=[-1, 64])]))
    with pytest.raises(InputError, match="do not match the ONNX model"):
        run(job(tmp_path, npz, source=SourceSpec(path=str(p)),
                inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])]))


def test_calibration_data_of_the_wrong_dtype(tmp_path):
    x, y = sk_models.digits_flat()
    p = tmp_path / "f64.npz"
    np.savez(p, x=x[:100].astype(np.float64), labels=y[:100])
    with pytest.raises(DataError, match="float64") as e:
        run(job(tmp_path, str(p), inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 64])]))
    assert "astype" in e.value.hint


def test_metric_needs_labels(tmp_path):
    x, _ = sk_models.digits_flat()
    p = tmp_path / "nolabels.npz"
    np.savez(p, x=x[:100])
    with pytest.raises(DataError, match="needs labels"):
        run(job(tmp_path, str(p)))


def test_unknown_target():
    from serve_kit.optimize.target import target_class

    with pytest.raises(UsageError, match="unknown optimize target"):
        target_class("onnx-int3")


def test_every_target_config_is_checked_before_any_work(tmp_path):
    from serve_kit.errors import ConfigError

    # The source does not even import: the bad config of the last target is reported first.
    job = OptimizeJob(source=SourceSpec(factory="no_such_module:build"), repository=tmp_path / "repo",
                      targets=[TargetSpec(name="onnx"), TargetSpec(name="onnx-int4", config={"block_size": 8})])
    with pytest.raises(ConfigError, match="block_size"):
        run(job)
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------------------------------------
# Never lose a run: every failure inside a target is its row; the report is always written.

from hypothesis import given, settings, strategies as st  # noqa: E402

from serve_kit.errors import ConversionError, TargetNotApplicable  # noqa: E402
from serve_kit.optimize import target as target_mod  # noqa: E402
from serve_kit.optimize.pipeline import outcome, parse_size  # noqa: E402


class _Failing(target_mod.Target):
    """A test-local target (the plugin API) that fails the way real targets do."""

    name = "test-failing"
    precision = "fp32"
    backend = "onnxruntime"

    class Config(target_mod.TargetConfig):
        how: str = "not-applicable"

    def _build_impl(self, ctx, outdir):
        how = self.config.how
        if how == "not-applicable":
            raise TargetNotApplicable("no MatMul or Gemm to quantize in this model", origin="test-failing")
        if how == "error":
            raise ConversionError("the converter gave up", origin="test-failing", hint="try another opset")
        if how == "library":
            np.linalg.inv(np.zeros((2, 2)))  # raises inside numpy, as a quantizer's library would
        if how == "bug":
            from serve_kit.optimize.pipeline import _geomean

            _geomean([])  # a ZeroDivisionError raised by serve-kit's own code
        if how == "interrupt":
            raise KeyboardInterrupt
        if how == "run":  # a valid model with a fixed batch of 1: ONNX Runtime itself refuses the batches
            import onnx
            from onnx import TensorProto, helper

            w = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], np.zeros(640, np.float32))
            graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["output_0"])], "fixed",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                      [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [1, 10])], [w])
            p = outdir / "model.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(p))
            return target_mod.Artifact(p, "onnxruntime")
        if how == "latency":  # validates, then breaks on the latency inputs (a batch of exactly 3)
            class Picky(torch.nn.Module):
                def __init__(self, inner: torch.nn.Module):
                    super().__init__()
                    self.inner = inner

                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    if x.size(0) == 3:
                        raise RuntimeError("cannot take a batch of 3")
                    return self.inner(x)

            p = outdir / "model.pt"
            torch.jit.save(torch.jit.script(Picky(sk_models.mlp())), str(p))
            return target_mod.Artifact(p, "torchscript")
        if how == "load":  # builds a file ONNX Runtime cannot load: fails in the pipeline's load phase
            p = outdir / "model.onnx"
            p.write_bytes(b"\x08\x07garbage")
            return target_mod.Artifact(p, "onnxruntime")
        raise AssertionError(how)


@pytest.fixture
def failing(monkeypatch):
    monkeypatch.setitem(target_mod._MODULES, _Failing.name, __name__)
    monkeypatch.setitem(target_mod._CLASSES, _Failing.name, _Failing)
    return lambda how: TargetSpec(name=_Failing.name, config={"how": how})


def runs(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "repo" / "mlp" / ".runs").glob("*.json"))]


def test_each_failure_inside_a_target_becomes_its_row(tmp_path, npz, failing):
    targets = [TargetSpec(name="onnx"), failing("not-applicable"), failing("error"), failing("library"),
               failing("load"), failing("bug"), failing("run")]
    report = run(job(tmp_path, npz, targets=targets))
    rows = report["variants"]
    assert [r["status"] for r in rows] == ["passed", "not-applicable", "error", "error", "error", "bug", "error"]
    assert rows[6]["phase"] == "validate" and "onnxruntime" in rows[6]["error"], rows[6]
    assert "dimension" in rows[6]["error"].lower()
    assert "no MatMul" in rows[1]["reason"]
    assert "converter gave up" in rows[2]["error"] and "another opset" in rows[2]["error"]
    assert rows[3]["library"] == "numpy" and "LinAlgError" in rows[3]["error"] and "Singular" in rows[3]["error"]
    assert rows[4]["phase"] == "load" and "cannot load" in rows[4]["error"]
    assert "ZeroDivisionError" in rows[5]["error"] and "_geomean" in rows[5]["traceback"]
    assert "traceback" not in rows[3]  # a library's failure is not our bug: no traceback
    # fail-closed: errors block writing; a bug row makes the run exit 1 even so
    assert report["written"] is None and report["exit_code"] == 1 == outcome(report)
    assert "--keep-going" in report["not_written_because"]
    logged = runs(tmp_path)[0]["variants"]
    assert [r["status"] for r in logged] == [r["status"] for r in rows] and logged[5]["traceback"]
    assert not (tmp_path / "repo" / "mlp" / "1").exists()


def test_not_applicable_never_blocks_writing_except_strict(tmp_path, npz, failing):
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), failing("not-applicable")]))
    assert report["written"]["version"] == 1 and outcome(report) == 0
    strict = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), failing("not-applicable")], strict=True))
    assert strict["written"] is None and outcome(strict, strict=True) == 1 and strict["exit_code"] == 1
    assert strict["strict_blocking"] == ["test-failing"]
    only_na = run(job(tmp_path, npz, targets=[failing("not-applicable")]))
    assert only_na["written"] is None and only_na["exit_code"] == 1  # no target applied
    assert len(runs(tmp_path)) == 3


def test_keep_going_writes_past_errors_but_a_bug_still_exits_1(tmp_path, npz, failing):
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), failing("error")], keep_going=True))
    assert report["written"]["variant"] == "onnx" and report["exit_code"] == 0
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), failing("bug")], keep_going=True))
    assert report["written"]["version"] == 2 and report["exit_code"] == 1


def test_a_missed_gate_exits_3_and_beats_errors(tmp_path, npz, failing):
    strict_gate = {"int8": GateConfig(min_cosine=0.999999999)}
    report = run(job(tmp_path, npz, gates=strict_gate,
                     targets=[TargetSpec(name="onnx-int8-static", config={"diagnose": False}), failing("error")]))
    assert [r["status"] for r in report["variants"]] == ["failed", "error"]
    assert report["exit_code"] == 3


def test_the_report_survives_an_interrupt_and_an_error_halfway(tmp_path, npz, failing):
    with pytest.raises(KeyboardInterrupt):
        run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), failing("interrupt")]))
    (log,) = runs(tmp_path)
    assert log["aborted"]["status"] == "interrupted" and log["exit_code"] == 130
    assert log["variants"][0]["status"] == "passed"  # what was done before is kept
    x, _ = sk_models.digits_flat()
    np.savez(tmp_path / "nolabels.npz", x=x[:100])
    with pytest.raises(DataError):
        run(job(tmp_path, str(tmp_path / "nolabels.npz")))
    assert runs(tmp_path)[-1]["aborted"]["status"] == "error" and "labels" in runs(tmp_path)[-1]["aborted"]["error"]


def test_inspect_and_verify_ignore_the_run_log(tmp_path, npz, failing):
    run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")]))
    run(job(tmp_path, npz, targets=[failing("error")]))
    repo = Repository(tmp_path / "repo")
    assert repo.models() == ["mlp"] and repo.version_numbers("mlp") == [1]
    assert repo.verify() == {"mlp": {1: []}}
    assert len(runs(tmp_path)) == 2


@pytest.mark.parametrize("report,strict,code", [
    ({"variants": [{"status": "passed"}], "written": {"version": 1}}, False, 0),
    ({"variants": [{"status": "passed"}, {"status": "bug"}], "written": {"version": 1}}, False, 1),
    ({"variants": [{"status": "passed"}, {"status": "failed"}], "written": None}, False, 3),
    ({"variants": [{"status": "failed"}, {"status": "error"}], "written": None}, False, 3),
    ({"variants": [{"status": "error"}], "written": None}, False, 1),
    ({"variants": [{"status": "not-applicable"}], "written": None}, False, 1),
    ({"variants": [{"status": "passed"}, {"status": "unavailable"}], "written": None, "select": "none"}, False, 0),
    ({"variants": [{"status": "passed"}, {"status": "unavailable"}], "written": None, "select": "none"}, True, 1),
    ({"variants": [], "written": None, "select": "none"}, False, 1),
])
def test_outcome(report, strict, code):
    assert outcome(report, strict) == code


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "MiB": 1024**2, "GB": 1024**3}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=1, max_value=4096), unit=st.sampled_from(sorted(_UNITS)))
def test_parse_size(n, unit):
    value = n * _UNITS[unit]
    if value < 1 << 20:
        with pytest.raises(UsageError, match="below 1 MiB"):
            parse_size(f"{n}{unit}")
    else:
        assert parse_size(f"{n}{unit}") == value
        assert parse_size(f"{n}{unit.lower()}") == value


@pytest.mark.parametrize("bad", ["", "four gigs", "4X", "-1G", "1e9", "G"])
def test_parse_size_refuses(bad):
    with pytest.raises(UsageError, match="not a memory size") as e:
        parse_size(bad)
    assert "512M" in e.value.hint


def test_max_memory_reaches_the_targets(tmp_path, npz, monkeypatch):
    seen = []
    cls = target_mod.target_class("onnx")
    original = cls._build_impl

    def spy(self, ctx, outdir):
        seen.append(ctx.memory_budget)
        return original(self, ctx, outdir)

    monkeypatch.setattr(cls, "_build_impl", spy)
    run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")], memory_budget=parse_size("512M")))
    assert seen == [512 * 1024**2]


# ---------------------------------------------------------------------------------------------
# Honest latency: interleaved windows, bench's stability rule, speedups only when stable.

from serve_kit.bench.offline import interleaved_speedup, measure_interleaved  # noqa: E402
from serve_kit.bench import stats  # noqa: E402


def test_measure_interleaved_rounds_errors_and_ratio():
    import time as _time

    calls = {"slow": 0, "fast": 0, "breaks": 0}

    def make(name, seconds):
        def fn(_inputs):
            calls[name] += 1
            if name == "breaks" and calls[name] > 5:
                raise RuntimeError("fails on the 6th call")
            _time.sleep(seconds)
        return fn

    # sleeps, not CPU work: the ratio holds however busy the machine is
    fns = {"slow": make("slow", 0.004), "fast": make("fast", 0.001), "breaks": make("breaks", 0.001)}
    results, errors = measure_interleaved(fns, {}, 1, rounds=3, min_seconds=0.06, max_rounds=4)
    assert set(results) == {"slow", "fast"} and isinstance(errors["breaks"], RuntimeError)
    for r in results.values():
        assert 3 <= r["windows"] <= 4 and len(r["window_p50_ms"]) == r["windows"]
        assert r["iterations"] >= 3 * r["windows"] and r["p50_ms"] <= r["p99_ms"]
        assert isinstance(r["stable"], bool) and r["stability_pct"] == 10.0
    sp = interleaved_speedup(results["slow"], results["fast"])
    assert 1.8 < sp["ratio"] < 6 and sp["range"][0] <= sp["ratio"] <= sp["range"][1]
    paired = [a / b for a, b in zip(results["slow"]["window_p50_ms"], results["fast"]["window_p50_ms"])]
    assert sp["stable"] == ((results["slow"]["stable"] and results["fast"]["stable"])
                            or stats.is_stable(paired, None, 10.0))


def test_latency_is_interleaved_at_the_servers_thread_count(tmp_path, npz):
    from serve_kit.runtime.models import available_cores, default_intra_op_threads

    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")]))
    settings_ = report["latency_settings"]
    assert settings_["interleaved"] and settings_["intra_op_threads"] == default_intra_op_threads(available_cores(), 1)
    onnx = report["variants"][0]
    for b in ("1", "4"):
        ref = report["reference"]["latency"][b]
        assert ref["windows"] == onnx["latency"][b]["windows"] >= 3  # the same rounds
        sp, rng = onnx["speedup"][b], onnx["speedup_range"][b]
        # claimed when both sides are stable, or their round-by-round ratio is (bench's rule)
        paired = [a / v for a, v in zip(ref["window_p50_ms"], onnx["latency"][b]["window_p50_ms"])]
        stable = (ref["stable"] and onnx["latency"][b]["stable"]) or stats.is_stable(paired, None, 10.0)
        assert (sp is not None) == stable and rng[0] <= rng[1]
        assert rng[0] <= onnx["speedup_median"][b] <= rng[1]
        assert (b in onnx.get("speedup_unstable", [])) == (not stable)
        # eager torch at the server's width: the same order of magnitude as the export, not 1000x off
        assert ref["p50_ms"] < 50 * onnx["latency"][b]["p50_ms"]


def _mlp_onnx(path: Path) -> Path:
    torch.onnx.export(sk_models.mlp(), (torch.zeros(2, 64),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    return path


def test_when_no_variant_is_faster_the_source_is_written_as_is(tmp_path, npz):
    src = _mlp_onnx(tmp_path / "m.onnx")
    report = run(job(tmp_path, npz, source=SourceSpec(path=str(src)), targets=[TargetSpec(name="onnx")],
                     min_speedup=1000.0))
    assert "stably faster" in report["slower"] and "1000x" in report["slower"]
    row = report["variants"][-1]
    assert row["name"] == "source" and row["status"] == "passed" and report["selected"] == "source"
    info = Repository(tmp_path / "repo").version("mlp")
    assert info.manifest["variant"] == "source" and info.model_file.read_bytes() == src.read_bytes()
    assert report["exit_code"] == 0

    nothing = run(job(tmp_path, npz, source=SourceSpec(path=str(src)), targets=[TargetSpec(name="onnx")],
                      min_speedup=1000.0, when_slower="nothing"))
    assert nothing["written"] is None and "--when-slower nothing" in nothing["not_written_because"]
    assert Repository(tmp_path / "repo").version_numbers("mlp") == [1]
    assert nothing["exit_code"] == 0  # done as asked: nothing that is not faster was written


def test_an_eager_source_that_nothing_beats_is_written_through_its_fp32_export(tmp_path, npz):
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), TargetSpec(name="onnx-int8-dynamic")],
                     min_speedup=1000.0))
    row = report["variants"][-1]
    assert row["name"] == "source" and row["details"]["exported_by"] == "onnx"
    assert Repository(tmp_path / "repo").version("mlp").manifest["variant"] == "source"
    # without an FP32 export there is nothing to write the eager source through: said so
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx-int8-dynamic")], min_speedup=1000.0))
    assert report["written"] is None and "-t onnx" in report["slower"]


def test_latency_agrees_with_serve_kit_bench(tmp_path, npz, monkeypatch):
    """The optimize table's figures against `serve-kit bench` on the written repository: loosely
    (the machine is shared), but a 1000x disagreement like the eager 95 ms one fails."""
    from serve_kit.bench.offline import OfflineJob, run_offline

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(sk_models.__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")],
                     latency=LatencySpec(batch_sizes=[1, 4], min_seconds=0.3)))
    assert report["written"]["variant"] == "onnx"
    bench = run_offline(OfflineJob(repository=tmp_path / "repo", batch_sizes=[1, 4], warmup_s=0.2, window_s=0.2,
                                   min_windows=3, max_windows=5, flops=False))
    rows = {(r["variant"], r["batch_size"]): r for r in bench["results"]}
    for b in (1, 4):
        ours = report["variants"][0]["latency"][str(b)]["p50_ms"]
        theirs = rows[("onnx", b)]["p50_ms"]
        assert 1 / 4 < ours / theirs < 4, (b, ours, theirs)
        ours_eager = report["reference"]["latency"][str(b)]["p50_ms"]
        assert ("pytorch-eager", b) in rows, bench["skipped"]  # why eager was not measured
        theirs_eager = rows[("pytorch-eager", b)]["p50_ms"]
        assert 1 / 4 < ours_eager / theirs_eager < 4, (b, ours_eager, theirs_eager)
        assert 1 / 4 < (ours_eager / ours) / (theirs_eager / theirs) < 4


# ---------------------------------------------------------------------------------------------
# Repository safety: another model is never written silently as the next version.


def test_a_changed_signature_or_source_is_refused_before_any_work_unless_forced(tmp_path, npz, failing):
    run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")]))
    before = snapshot(tmp_path / "repo" / "mlp" / "1")
    src = _mlp_onnx(tmp_path / "m.onnx")
    # another source kind (and output name): refused before the target runs (it would raise)
    with pytest.raises(UsageError, match="another model") as e:
        run(job(tmp_path, npz, source=SourceSpec(path=str(src)), targets=[failing("bug")]))
    assert "source kind torch (v1) -> onnx" in e.value.message and "outputs ['output_0'] -> ['y']" in e.value.message
    assert "--force" in e.value.hint and "--name" in e.value.hint
    assert runs(tmp_path)[-1]["aborted"]["status"] == "error" and not runs(tmp_path)[-1]["variants"]
    # another factory with the same signature
    with pytest.raises(UsageError, match="source factory sk_models:mlp"):
        run(job(tmp_path, npz, source=SourceSpec(factory="sk_models:outlier_mlp"), targets=[TargetSpec(name="onnx")]))
    assert Repository(tmp_path / "repo").version_numbers("mlp") == [1]
    assert snapshot(tmp_path / "repo" / "mlp" / "1") == before
    # the same model again is fine; --force writes the other one and says so
    assert run(job(tmp_path, npz, targets=[TargetSpec(name="onnx")]))["written"]["version"] == 2
    forced = run(job(tmp_path, npz, source=SourceSpec(path=str(src)), targets=[TargetSpec(name="onnx")], force=True))
    assert forced["written"]["version"] == 3 and any("source kind" in c for c in forced["forced"])
    assert Repository(tmp_path / "repo").version("mlp").manifest["forced"] == forced["forced"]
    assert Repository(tmp_path / "repo").config("mlp").outputs[0].name == "y"
    # another file of the same kind and signature is the model retrained: the next version, with
    # the previous source recorded
    other = tmp_path / "m3.onnx"
    torch.onnx.export(sk_models.untrained_mlp(), (torch.zeros(2, 64),), str(other), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    retrained = run(job(tmp_path, npz, source=SourceSpec(path=str(other)), targets=[TargetSpec(name="onnx")]))
    assert retrained["written"]["version"] == 4 and "forced" not in retrained
    assert retrained["source_previous"]["version"] == 3
    assert retrained["source_previous"]["sha256"] != retrained["source"]["sha256"]


def test_a_variant_failing_its_latency_run_is_an_error_row_and_the_rest_is_kept(tmp_path, npz, failing):
    lat = LatencySpec(batch_sizes=[1, 3], min_seconds=0.05)
    report = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), failing("latency")], latency=lat))
    onnx, picky = report["variants"]
    assert onnx["status"] == "passed" and set(onnx["latency"]) == {"1", "3"}
    assert picky["status"] == "error" and picky["phase"] == "latency" and "batch of 3" in picky["error"]
    assert "latency" not in picky and picky["validation"]["passed"] is True  # it did pass its gate
    assert report["written"] is None and report["exit_code"] == 1  # fail-closed without --keep-going
    kept = run(job(tmp_path, npz, targets=[TargetSpec(name="onnx"), failing("latency")], latency=lat,
                   keep_going=True))
    assert kept["written"]["variant"] == "onnx" and kept["exit_code"] == 0


def test_a_speedup_is_claimed_from_a_stable_ratio_though_the_machine_drifts():
    """A shared VM's speed drifts between rounds: both sides' p50s move together, the ratio holds.
    The claim follows the ratio; a ratio that moves by more than bench's 10 % is not claimed."""
    drift = [1.0, 1.3, 0.8, 1.25, 0.9]
    ref = {"window_p50_ms": [2.0 * d for d in drift], "stable": False}
    steady = {"window_p50_ms": [0.5 * d for d in drift], "stable": False}
    c = interleaved_speedup(ref, steady)
    assert c["stable"] and c["ratio"] == pytest.approx(4.0) and c["range"] == pytest.approx([4.0, 4.0])
    wobbly = {"window_p50_ms": [0.5 * d * w for d, w in zip(drift, [1.0, 1.2, 0.85, 1.15, 0.9])], "stable": False}
    c = interleaved_speedup(ref, wobbly)
    assert not c["stable"] and c["range"][0] < c["ratio"] < c["range"][1]
