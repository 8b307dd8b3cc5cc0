"""Accuracy gates (serve_kit/optimize/validate.py), their config and the `-t NAME:KEY=VALUE` parser.

The measures are computed on real arrays, the parser runs against the real targets' Configs, and
the pipeline test optimizes a real model through ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sk_models
from serve_kit.config import DEFAULT_GATES, DataSpec, GateConfig, LatencySpec, SourceSpec, TargetSpec, parse_gate_args
from serve_kit.errors import DataError, InputError, UsageError
from serve_kit import compare as C

from serve_kit.optimize.target_args import parse_target_arg, parse_target_args
from serve_kit.optimize.validate import Metric, apply_gate, compare_outputs, detect_kind

PRECISIONS = list(DEFAULT_GATES)


def gate_of(precision: str, ref: dict, got: dict, classifier: str | None = None, metric_delta=None):
    gate = DEFAULT_GATES[precision]
    return apply_gate(gate, compare_outputs(ref, got, gate, classifier), metric_delta)


# ---------------------------------------------------------------------------------------------
# the silero-vad case: one probability per sample, one sample off by 0.98


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 600), data=st.data(), precision=st.sampled_from(PRECISIONS))
def test_a_one_element_probability_off_by_098_fails_every_default_gate(n, data, precision):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ref = rng.uniform(0, 0.02, (n, 1)).astype(np.float32)
    bad = data.draw(st.integers(0, n - 1))
    got = ref.copy()
    got[bad, 0] = ref[bad, 0] + 0.98
    result = gate_of(precision, {"output": ref}, {"output": got})
    assert not result.passed
    errors = compare_outputs({"output": ref}, {"output": got})["output"]
    assert errors["kind"] == "probability"
    assert errors["cosine_mean"] is None and errors["cosine_min"] is None  # never 1.0 by construction
    assert errors["prob_error"] == pytest.approx(0.98, abs=1e-6)
    failed = {c["measure"] for c in result.checks if not c["passed"]}
    assert "prob_error" in failed
    assert result.worst["output"] == "output" and result.worst["sample"] == bad
    assert not result.worst["passed"]


def test_per_sample_cosine_would_have_passed_the_vad_case():
    # What the old gate saw: every per-sample cosine of a positive scalar is exactly 1.
    ref = np.full((100, 1), 0.01, np.float32)
    got = ref.copy()
    got[3] = 0.99
    a, b = ref.reshape(100, -1), got.reshape(100, -1)
    old_cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert np.allclose(old_cos, 1.0)
    assert not gate_of("int8", {"p": ref}, {"p": got}).passed


# ---------------------------------------------------------------------------------------------
# identical outputs pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arr=hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.bool_]),
                      hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=6),
                      elements={"allow_nan": False, "allow_infinity": False}),
       precision=st.sampled_from(PRECISIONS), name=st.sampled_from(["out", "logits", "prob"]))
def test_identical_outputs_always_pass(arr, precision, name):
    if arr.dtype.kind == "f":
        arr = np.clip(arr, -1e6, 1e6)
    result = gate_of(precision, {name: arr}, {name: arr.copy()}, metric_delta=0.0)
    assert result.passed, result.failures
    e = compare_outputs({name: arr}, {name: arr.copy()})[name]
    assert e["max_abs_error"] == 0.0
    assert e["flip_rate"] in (None, 0.0)


def test_float32_noise_at_fp32_precision_passes():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 10)).astype(np.float32)
    got = (ref.astype(np.float64) * (1 + 1e-7 * rng.normal(size=ref.shape))).astype(np.float32)
    assert gate_of("fp32", {"logits": ref}, {"logits": got}).passed


# ---------------------------------------------------------------------------------------------
# kinds


def test_kind_detection():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 10)).astype(np.float32)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert detect_kind("output", softmax) == "probability"
    assert C._decision("probability", softmax, 0.5) == "argmax"
    sig = 1 / (1 + np.exp(-logits))
    assert detect_kind("output", sig) == "probability"
    assert C._decision("probability", sig, 0.5) == "threshold 0.5"  # independent probabilities
    assert detect_kind("logits", logits) == "logits"
    assert detect_kind("cls_score", logits) == "logits"
    assert detect_kind("output_0", logits, classifier=True) == "logits"
    # Shape alone is not evidence: a [N, 4] box regression or an embedding is not a classifier.
    assert detect_kind("boxes", logits[:, :4]) == "regression"
    assert detect_kind("embedding", logits) == "regression"
    assert detect_kind("ids", np.arange(10)) == "discrete"
    assert detect_kind("mask", np.zeros((3, 4), bool)) == "discrete"
    assert detect_kind("x", np.array([0.5, np.nan], np.float32)) == "regression"
    assert detect_kind("scalar", np.float32(0.3)) == "probability"


@settings(max_examples=80, deadline=None)
@given(arr=hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64]),
                      hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5),
                      elements=st.floats(-3, 3, width=16)),
       name=st.sampled_from(["output", "y", "embedding", "logits", "cls_scores"]), classifier=st.booleans())
def test_kind_detection_properties(arr, name, classifier):
    kind = detect_kind(name, arr, classifier)
    if np.all((arr >= 0) & (arr <= 1)):
        assert kind == "probability"  # values decide first: a probability is never gated as a logit
    elif classifier or name in ("logits", "cls_scores"):
        assert kind == "logits"
    else:
        assert kind == "regression"
    assert detect_kind(name, arr.astype(np.int64), classifier) == "discrete"


def test_kinds_in_the_gate_override_detection():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(100, 3)).astype(np.float32)
    e = compare_outputs({"y": ref}, {"y": ref}, GateConfig(kinds={"y": "logits"}))["y"]
    assert e["kind"] == "logits" and e["kind_from"] == "gate" and e["decision"] == "argmax"
    e = compare_outputs({"y": ref}, {"y": ref})["y"]
    assert e["kind"] == "regression" and e["kind_from"] == "detected" and e["flip_rate"] is None


def test_kinds_for_an_output_the_model_lacks_are_refused():
    with pytest.raises(InputError, match=r"\['speech'\]") as e:
        compare_outputs({"output": np.zeros((2, 1))}, {"output": np.zeros((2, 1))}, GateConfig(kinds={"speech": "logits"}))
    assert "output" in e.value.hint


def test_argmax_flips_are_counted_per_decision():
    ref = np.array([[2.0, 1.0, 0.0]] * 100, np.float32)
    got = ref.copy()
    got[:3] = [0.0, 1.0, 2.0]                       # 3 of 100 argmax decisions change
    e = compare_outputs({"logits": ref}, {"logits": got})["logits"]
    assert e["decision"] == "argmax" and e["flip_rate"] == pytest.approx(0.03) and e["decisions"] == 100
    result = gate_of("int8", {"logits": ref}, {"logits": got})
    flip = next(c for c in result.checks if c["measure"] == "flip_rate")
    assert not flip["passed"] and flip["threshold"] == 0.01 and flip["sample"] in (0, 1, 2)


def test_single_logit_flips_at_the_sigmoid_threshold():
    ref = np.array([[-1.0], [0.5], [2.0], [-3.0]], np.float32)
    got = np.array([[0.1], [0.4], [2.0], [-3.0]], np.float32)
    e = compare_outputs({"logit": ref}, {"logit": got})["logit"]
    assert e["decision"] == "sigmoid threshold 0.5" and e["flip_rate"] == pytest.approx(0.25)
    assert e["worst_sample"]["flip_rate"] == 0
    # threshold 0.7 -> logit 0.847: sample 1 (0.5 vs 0.4) no longer flips either way
    e = compare_outputs({"logit": ref}, {"logit": got}, GateConfig(thresholds={"logit": 0.7}))["logit"]
    assert e["decision"] == "sigmoid threshold 0.7" and e["flip_rate"] == pytest.approx(0.0)


def test_probability_threshold_is_configurable():
    ref = np.array([[0.2], [0.45], [0.9]], np.float32)
    got = np.array([[0.25], [0.55], [0.9]], np.float32)
    assert compare_outputs({"p": ref}, {"p": got})["p"]["flip_rate"] == pytest.approx(1 / 3)
    e = compare_outputs({"p": ref}, {"p": got}, GateConfig(threshold=0.22))["p"]
    assert e["decision"] == "threshold 0.22" and e["flip_rate"] == pytest.approx(1 / 3)
    e = compare_outputs({"p": ref}, {"p": got}, GateConfig(threshold=0.6))["p"]
    assert e["flip_rate"] == 0.0


def test_discrete_outputs_compare_by_equality():
    ref = np.array([1, 2, 3, 4], np.int64)
    got = np.array([1, 2, 0, 4], np.int64)
    e = compare_outputs({"label": ref}, {"label": got})["label"]
    assert e["kind"] == "discrete" and e["flip_rate"] == 0.25 and e["rel_l2"] is None and e["cosine_across"] is None
    assert not gate_of("int8", {"label": ref}, {"label": got}).passed


# ---------------------------------------------------------------------------------------------
# measures over the whole set


def test_relative_l2_is_over_the_whole_set_not_per_sample():
    ref = np.zeros((10, 4), np.float32)
    ref[0] = 100.0
    ref[1:] = 1.0
    got = ref.copy()
    got[1:] += 0.5                                  # 50 % off on 9 of 10 samples, small next to sample 0
    e = compare_outputs({"y": ref}, {"y": got})["y"]
    expected = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert e["rel_l2"] == pytest.approx(expected) and e["rel_l2"] < 0.15
    assert e["max_abs_error"] == pytest.approx(0.5) and e["mean_abs_error"] == pytest.approx(0.45)


def test_all_zero_reference_has_no_relative_error():
    zeros = np.zeros((5, 20), np.float32)
    assert compare_outputs({"y": zeros}, {"y": zeros.copy()})["y"]["rel_l2"] == 0.0
    e = compare_outputs({"y": zeros}, {"y": np.full((5, 20), 1e-7, np.float32)},
                        GateConfig(kinds={"y": "regression"}))["y"]
    assert e["rel_l2"] is None and e["max_abs_error"] == pytest.approx(1e-7)


def test_cosine_across_samples_only_for_small_outputs():
    rng = np.random.default_rng(3)
    small = rng.normal(size=(40, 16)).astype(np.float32)
    big = rng.normal(size=(40, 17)).astype(np.float32)
    e = compare_outputs({"s": small, "b": big}, {"s": small, "b": big})
    assert e["s"]["cosine_across"] == pytest.approx(1.0) and e["b"]["cosine_across"] is None
    assert e["b"]["cosine_mean"] == pytest.approx(1.0)
    # a column whose values lose their pattern across samples fails it, though each sample is fine
    got = small.copy()
    got[:, 5] = rng.permutation(small[:, 5])
    e = compare_outputs({"s": small}, {"s": got})["s"]
    assert e["cosine_across"] < 0.9


def test_a_scalar_regression_output_gets_a_similarity_that_can_fail():
    rng = np.random.default_rng(4)
    ref = rng.normal(3.0, 1.0, (200,)).astype(np.float32)
    got = ref[::-1].copy()
    e = compare_outputs({"y": ref}, {"y": got})["y"]
    assert e["cosine_mean"] is None and e["cosine_across"] is not None
    assert not gate_of("int8", {"y": ref}, {"y": got}).passed


def test_non_finite_values_fail_unless_the_reference_has_the_same():
    ref = np.ones((4, 3), np.float32)
    got = ref.copy()
    got[1, 1] = np.nan
    e = compare_outputs({"y": ref}, {"y": got})["y"]
    assert e["max_abs_error"] == float("inf") and e.get("non_finite")
    assert not gate_of("int8", {"y": ref}, {"y": got}).passed
    ref2 = ref.copy()
    ref2[1, 1] = np.inf
    got2 = ref2.copy()
    assert compare_outputs({"y": ref2}, {"y": got2})["y"]["max_abs_error"] == 0.0


@settings(max_examples=30, deadline=None)
@given(arr=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7),
                      elements=st.floats(-100, 100, width=32)),
       noise=hnp.arrays(np.float32, 1, elements=st.floats(0, 1, width=32)), chunk=st.integers(1, 50))
def test_chunked_comparison_gives_the_same_figures(arr, noise, chunk):
    got = arr + noise[0] * np.sin(np.arange(arr.size, dtype=np.float32)).reshape(arr.shape)
    whole = compare_outputs({"y": arr}, {"y": got})["y"]
    saved = C._CHUNK_ELEMENTS
    C._CHUNK_ELEMENTS = chunk
    try:
        parts = compare_outputs({"y": arr}, {"y": got})["y"]
    finally:
        C._CHUNK_ELEMENTS = saved
    for k, v in whole.items():
        if isinstance(v, float):
            assert parts[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        else:
            assert parts[k] == v, k


def test_shape_mismatch_and_missing_output_are_input_errors():
    with pytest.raises(InputError, match="no output"):
        compare_outputs({"a": np.zeros(3)}, {"b": np.zeros(3)})
    with pytest.raises(InputError, match="shape"):
        compare_outputs({"a": np.zeros((3, 2))}, {"a": np.zeros((3, 3))})


# ---------------------------------------------------------------------------------------------
# the gate's result


def test_every_check_is_listed_with_its_threshold_and_the_worst_one_is_named():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    emb = rng.normal(size=(64, 32)).astype(np.float32)
    got_emb = emb.copy()
    got_emb[7] = -emb[7]
    result = gate_of("int8", {"logits": logits, "emb": emb}, {"logits": logits, "emb": got_emb}, metric_delta=-0.5)
    by = {c["check"]: c for c in result.checks}
    assert {"logits.rel_l2", "logits.cosine_mean", "logits.cosine_across", "logits.flip_rate",
            "emb.rel_l2", "emb.cosine_mean", "metric_drop"} <= set(by)
    assert "emb.cosine_across" not in by and "emb.flip_rate" not in by  # 32 elements, regression
    for c in result.checks:
        assert {"output", "measure", "value", "threshold", "passed", "text"} <= set(c)
    assert by["metric_drop"]["passed"] and by["metric_drop"]["value"] == 0.5
    assert not result.passed
    assert result.worst["output"] == "emb" and result.worst["sample"] == 7
    assert any("emb: mean per-sample cosine" in f for f in result.failures)


def test_a_disabled_check_is_not_run():
    ref = np.array([[0.0], [0.0]], np.float32)
    got = np.array([[0.0], [0.9]], np.float32)
    loose = DEFAULT_GATES["int8"].merged(GateConfig(max_prob_error=None, max_rel_l2=None, min_cosine_across=None,
                                                    max_flip_rate=None))
    assert apply_gate(loose, compare_outputs({"p": ref}, {"p": got}, loose), None).passed
    assert not gate_of("int8", {"p": ref}, {"p": got}).passed


def test_merged_overrides_only_the_fields_that_were_set():
    base = DEFAULT_GATES["int8"]
    user = GateConfig(max_flip_rate=0.05, kinds={"p": "probability"})
    m = base.merged(user)
    assert m.max_flip_rate == 0.05 and m.max_rel_l2 == base.max_rel_l2 and m.min_cosine == base.min_cosine
    assert m.kinds == {"p": "probability"}
    m2 = m.merged(GateConfig(kinds={"q": "logits"}, threshold=0.3))
    assert m2.kinds == {"p": "probability", "q": "logits"} and m2.threshold == 0.3 and m2.max_flip_rate == 0.05
    assert base.merged(GateConfig()) == base and base.merged(None) is base
    # an explicit None switches a default check off
    assert base.merged(GateConfig(max_prob_error=None)).max_prob_error is None


def test_default_gates_catch_a_098_error_on_one_probability_at_every_precision():
    for precision, gate in DEFAULT_GATES.items():
        assert gate.max_prob_error is not None and gate.max_prob_error < 0.98, precision
        assert gate.max_flip_rate is not None and gate.max_rel_l2 is not None and gate.min_cosine_across is not None
    tight = ["fp32", "fp16", "bf16", "fp8", "int4"]
    assert [DEFAULT_GATES[p].max_rel_l2 for p in tight] == sorted(DEFAULT_GATES[p].max_rel_l2 for p in tight)


def test_gate_field_ranges_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GateConfig(max_flip_rate=1.5)
    with pytest.raises(ValidationError):
        GateConfig(threshold=1.0)
    with pytest.raises(ValidationError):
        GateConfig(thresholds={"p": 0.0})
    with pytest.raises(ValidationError):
        GateConfig(kinds={"p": "probabilty"})


# ---------------------------------------------------------------------------------------------
# the task metric


def test_top1_refuses_labels_that_can_never_match_a_class_id():
    m = Metric("top1")
    m.check_labels(np.array([0, 1, 2]), 3)
    m.check_labels(np.array([0.0, 1.0, 2.0]), 3)
    for labels, words in [(np.array(["cat", "dog", "cat"]), "text"), (np.array([b"a", b"b", b"c"]), "bytes"),
                          (np.array([{"a": 1}, 2, 3], dtype=object), "Python objects")]:
        with pytest.raises(DataError, match=words) as e:
            m.check_labels(labels, 3, "eval.npz", "labels")
        assert "'labels'" in e.value.message and "integers" in e.value.hint and e.value.origin == "eval.npz"
    with pytest.raises(DataError, match="non-integer"):
        m.check_labels(np.array([0.5, 1.0, 2.0]), 3)
    with pytest.raises(DataError, match="2 entries for 3 samples"):
        m.check_labels(np.array([0, 1]), 3)


def test_a_user_metric_takes_any_labels_and_its_failures_are_input_errors():
    m = Metric("sk_models:digits_flat")  # any importable callable; called wrongly below
    m.check_labels(np.array(["text", "labels"]), 2)
    with pytest.raises(InputError, match="metric 'sk_models:digits_flat' failed: TypeError"):
        m({"y": np.zeros((2, 3))}, np.array([0, 1]))


def test_top1_on_a_single_probability_or_logit_thresholds_it():
    m = Metric("top1")
    assert m({"p": np.array([[0.2], [0.8], [0.6]])}, np.array([0, 1, 0])) == pytest.approx(200 / 3)
    assert m({"z": np.array([-2.0, 3.0, 0.5])}, np.array([0, 1, 1])) == pytest.approx(100.0)
    assert m({"s": np.array([[0.1, 0.9], [0.8, 0.2]])}, np.array([1, 0])) == 100.0


# ---------------------------------------------------------------------------------------------
# -t NAME:KEY=VALUE and --gate


def test_target_settings_are_typed_by_the_target_config():
    spec = parse_target_arg("onnx-int8-static:calibration_method=entropy,diagnose=false,calibration_batch_size=8,"
                            "percentile=99.9")
    assert spec.name == "onnx-int8-static"
    assert spec.config == {"calibration_method": "entropy", "diagnose": False, "calibration_batch_size": 8,
                           "percentile": 99.9}
    assert parse_target_arg("onnx-int8-static:op_types=MatMul+Conv").config == {"op_types": ["MatMul", "Conv"]}
    assert parse_target_arg('onnx-int8-static:op_types=["MatMul","Conv"],diagnose=no').config == {
        "op_types": ["MatMul", "Conv"], "diagnose": False}
    assert parse_target_arg("onnx-int8-static:op_types=none").config == {"op_types": None}
    # A list that is not Optional (onnx-int8-dynamic's op_types) takes the same A+B form.
    assert parse_target_arg("onnx-int8-dynamic:op_types=Conv+MatMul").config == {"op_types": ["Conv", "MatMul"]}
    assert parse_target_arg("onnx").config == {} and parse_target_arg("onnx").gate is None


def test_unknown_or_bad_target_settings_are_usage_errors_listing_the_keys():
    with pytest.raises(UsageError, match="has no setting 'calibration'") as e:
        parse_target_arg("onnx-int8-static:calibration=entropy")
    assert "calibration_method" in e.value.hint and "diagnose" in e.value.hint and "gate." in e.value.hint
    with pytest.raises(UsageError, match="calibration_method") as e:
        parse_target_arg("onnx-int8-static:calibration_method=kl")
    with pytest.raises(UsageError, match="diagnose"):
        parse_target_arg("onnx-int8-static:diagnose=maybe")
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        parse_target_arg("onnx-int8-static:diagnose")
    with pytest.raises(UsageError, match="given twice"):
        parse_target_arg("onnx-int8-static:diagnose=true,diagnose=false")
    with pytest.raises(UsageError, match="unknown optimize target"):
        parse_target_arg("onnx-int9:diagnose=true")
    with pytest.raises(UsageError, match="JSON"):
        parse_target_arg("onnx-int8-static:op_types=[MatMul")
    with pytest.raises(UsageError, match="unknown gate field"):
        parse_target_arg("onnx-int8-static:gate.max_l2=0.1")


def test_gate_keys_in_target_settings():
    spec = parse_target_arg("onnx-int8-static:gate.max_rel_l2=0.1,gate.kinds.prob=probability,"
                            "gate.thresholds.prob=0.3,gate.max_flip_rate=none")
    assert spec.config == {}
    assert spec.gate.max_rel_l2 == 0.1 and spec.gate.kinds == {"prob": "probability"}
    assert spec.gate.thresholds == {"prob": 0.3} and spec.gate.max_flip_rate is None
    assert spec.gate.model_fields_set == {"max_rel_l2", "kinds", "thresholds", "max_flip_rate"}
    with pytest.raises(UsageError, match="max_rel_l2"):
        parse_target_arg("onnx-int8-static:gate.max_rel_l2=-1")
    with pytest.raises(UsageError):
        parse_target_arg("onnx-int8-static:gate.kinds.prob=probabilty")


def test_target_settings_merge_over_the_recipe_entry():
    recipe = [TargetSpec(name="onnx-int8-static", config={"calibration_method": "minmax", "per_channel": True},
                         gate=GateConfig(max_metric_drop=0.5)),
              TargetSpec(name="onnx")]
    specs = parse_target_args(["onnx-int8-static:calibration_method=entropy,gate.max_flip_rate=0.02", "onnx-int4"],
                              recipe)
    assert specs[0].config == {"calibration_method": "entropy", "per_channel": True}
    assert specs[0].gate.max_metric_drop == 0.5 and specs[0].gate.max_flip_rate == 0.02
    assert specs[1].name == "onnx-int4" and specs[1].config == {}
    with pytest.raises(UsageError, match="given twice"):
        parse_target_args(["onnx", "onnx:"], recipe)


def test_gate_arguments():
    g = parse_gate_args(["int8.max_flip_rate=0.02", "all.kinds.speech=probability", "int8.min_cosine=none"])
    assert g["int8"] == {"max_flip_rate": 0.02, "kinds": {"speech": "probability"}, "min_cosine": None}
    assert g["fp32"] == {"kinds": {"speech": "probability"}}
    assert GateConfig(**g["int8"]).kinds == {"speech": "probability"}
    for bad, words in [("int8.max_flip=1", "unknown gate field"), ("int9.max_flip_rate=1", "PRECISION.FIELD"),
                       ("int8.max_flip_rate=lots", "invalid gate setting"), ("int8.kinds=probability", "unknown gate"),
                       ("int8.max_flip_rate=2", "invalid gate setting")]:
        with pytest.raises(UsageError, match=words):
            parse_gate_args([bad])


# ---------------------------------------------------------------------------------------------
# through the pipeline (real model, real ONNX Runtime)

FAST = LatencySpec(batch_sizes=[1], min_seconds=0.02)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return sk_models.digits_npz(tmp_path_factory.mktemp("data") / "digits.npz", n=300)


def test_pipeline_stores_checks_gate_and_worst(tmp_path, npz):
    from serve_kit.optimize.pipeline import OptimizeJob, run

    report = run(OptimizeJob(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "repo",
                             data=DataSpec(calibration=npz), metric="top1", latency=FAST, model_name="mlp",
                             targets=[TargetSpec(name="onnx")]))
    v = report["variants"][0]["validation"]
    assert v["passed"] and v["gate"]["max_flip_rate"] == DEFAULT_GATES["fp32"].max_flip_rate
    assert v["errors"]["output_0"]["kind"] == "logits"  # the output top1 reads
    assert {c["measure"] for c in v["checks"]} >= {"max_abs_error", "rel_l2", "cosine_mean", "cosine_across",
                                                   "flip_rate", "metric_drop"}
    assert v["worst"]["output"] in ("output_0", None) and "measure" in v["worst"]


def test_pipeline_refuses_string_labels_for_top1_before_any_work(tmp_path, npz):
    from serve_kit.optimize.pipeline import OptimizeJob, run

    with np.load(npz) as z:
        x, y = z["x"], z["labels"]
    bad = tmp_path / "names.npz"
    np.savez(bad, x=x, labels=np.array([f"digit-{i}" for i in y]))
    with pytest.raises(DataError, match="can never equal a class id") as e:
        run(OptimizeJob(source=SourceSpec(factory="sk_models:mlp"), repository=tmp_path / "repo",
                        data=DataSpec(calibration=str(bad)), metric="top1", latency=FAST, model_name="mlp",
                        targets=[TargetSpec(name="onnx")]))
    assert "labels" in e.value.message and "integers" in e.value.hint
    assert not (tmp_path / "repo" / "mlp" / "1").exists()


def test_image_smoke_test_compares_one_element_outputs_without_a_cosine():
    from serve_kit.config import ModelConfig
    from serve_kit.packaging.smoke import compare

    cfg = ModelConfig(name="vad", backend="onnxruntime", max_batch_size=8,
                      inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                      outputs=[{"name": "prob", "datatype": "FP32", "shape": [-1, 1]},
                               {"name": "emb", "datatype": "FP32", "shape": [-1, 3]}])
    ref = {"prob": np.array([[0.1], [0.9]], np.float32), "emb": np.array([[1, 2, 3], [4, 5, 6]], np.float32)}
    recorded = compare_outputs(ref, {k: v + 1e-4 for k, v in ref.items()})
    manifest = {"validation": {"errors": recorded}}
    same = compare(cfg, manifest, {k: v.copy() for k, v in ref.items()}, ref)
    assert same["prob"]["passed"] and same["prob"]["cosine_min"] is None and same["prob"]["cosine_min_limit"] is None
    assert same["emb"]["passed"] and same["emb"]["cosine_min"] == pytest.approx(1.0)
    off = compare(cfg, manifest, {"prob": ref["prob"] + 0.5, "emb": ref["emb"]}, ref)
    assert not off["prob"]["passed"] and off["emb"]["passed"]


def test_cli_target_settings_reach_the_target_and_bad_keys_are_usage_errors(tmp_path, npz, cli_env):
    import json
    import subprocess
    import sys

    cli = [sys.executable, "-c", "from serve_kit.cli import main; main()"]
    base = [*cli, "--json", "optimize", "sk_models:mlp", "--calibration-data", npz, "--metric", "top1",
            "-r", str(tmp_path / "repo"), "--batch-sizes", "1", "--select", "none", "--report", str(tmp_path / "r.json")]
    r = subprocess.run([*base, "-t", "onnx-int8-static:calibration_method=percentile,percentile=99.99,diagnose=false,"
                        "gate.max_flip_rate=0.05"], env=cli_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # (read from --report: ONNX Runtime's histogram calibrators print progress on stdout)
    report = json.loads((tmp_path / "r.json").read_text())
    v = report["variants"][0]
    assert v["config"]["calibration_method"] == "percentile" and v["config"]["diagnose"] is False
    assert v["config"]["percentile"] == 99.99
    assert v["validation"]["gate"]["max_flip_rate"] == 0.05 and v["gate_origin"] == "user"
    assert v["validation"]["gate"]["max_rel_l2"] == DEFAULT_GATES["int8"].max_rel_l2  # the rest stays default
    r = subprocess.run([*base, "-t", "onnx-int8-static:calibraton_method=entropy"], env=cli_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "calibraton_method" in r.stdout + r.stderr and "calibration_method" in r.stdout + r.stderr
