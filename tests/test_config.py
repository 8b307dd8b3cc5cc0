"""serve_kit.config: tensor specs, config.yaml validation, gates and recipes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from serve_kit.config import (DATATYPES, DEFAULT_GATES, GateConfig, ModelConfig, Recipe, SourceSpec, TensorSpec,
                              datatype_of, load_model_config, load_recipe_file, numpy_dtype)
from serve_kit.errors import EXIT_USAGE, ConfigError, InputError, UsageError


# ---------------------------------------------------------------------------------------------
# TensorSpec.parse


@pytest.mark.parametrize("text, name, datatype, shape", [
    ("input:FP32:-1x1x8x8", "input", "FP32", [-1, 1, 8, 8]),
    ("input:fp32:-1x1x8x8", "input", "FP32", [-1, 1, 8, 8]),  # datatype is case-insensitive
    ("ids:Int64:-1x-1", "ids", "INT64", [-1, -1]),
    ("x:BOOL:3", "x", "BOOL", [3]),
    ("  token_type.ids:uint8:2x5  ", "token_type.ids", "UINT8", [2, 5]),  # surrounding blanks ignored
])
def test_parse_valid(text, name, datatype, shape):
    spec = TensorSpec.parse(text)
    assert (spec.name, spec.datatype, spec.shape) == (name, datatype, shape)
    assert spec.dtype == np.dtype(DATATYPES[datatype])
    # A fixed first dimension is no batch axis: the whole shape is one sample.
    assert spec.sample_shape() == (shape[1:] if shape[0] == -1 else shape)


def test_parse_describe_round_trip():
    spec = TensorSpec.parse("input:fp16:-1x3x224x224")
    assert spec.describe() == "input:FP16:-1x3x224x224"
    assert TensorSpec.parse(spec.describe()) == spec


@pytest.mark.parametrize("text", [
    "input",              # name only
    "input:FP32",         # no shape
    "input::-1x4",        # no datatype
    ":FP32:-1x4",         # no name
    "input:FP32:",        # empty shape
    "input:FP32:-1x",     # dangling separator
    "input:FP32:-1,4",    # wrong separator
    "input:FP32:ax4",     # not a number
    "in:put:FP32:4",      # extra part
])
def test_parse_malformed_names_value_and_origin(text):
    with pytest.raises(UsageError) as ei:
        TensorSpec.parse(text, origin="--output")
    e = ei.value
    assert e.exit_code == EXIT_USAGE
    rendered = e.render()
    assert repr(text) in rendered
    assert "(from --output)" in rendered
    assert "NAME:DATATYPE:SHAPE" in rendered
    assert "hint: e.g. input:FP32:-1x1x8x8" in rendered


def test_parse_unknown_datatype_lists_datatypes():
    with pytest.raises(UsageError) as ei:
        TensorSpec.parse("input:FLOAT32:-1x4", origin="recipe inputs")
    rendered = ei.value.render()
    assert "'input:FLOAT32:-1x4'" in rendered
    assert "datatype" in rendered
    assert "(from recipe inputs)" in rendered
    assert "hint: datatypes: BOOL" in rendered and "FP32" in rendered.split("hint:")[1]


@pytest.mark.parametrize("text, bad", [
    ("input:FP32:-1x0x8", "0"),
    ("input:FP32:0", "0"),
    ("input:FP32:-2x8", "-2"),
    ("input:FP32:-1x-5", "-5"),
])
def test_parse_invalid_dimension(text, bad):
    with pytest.raises(UsageError) as ei:
        TensorSpec.parse(text)
    rendered = ei.value.render()
    assert repr(text) in rendered
    assert f"dimension {bad} is invalid" in rendered
    assert "(from --input)" in rendered  # the default origin


def test_tensor_spec_rejects_unknown_fields_and_empty_name():
    with pytest.raises(Exception, match="Extra inputs"):
        TensorSpec(name="x", datatype="FP32", shape=[1], dims=[1])
    with pytest.raises(Exception, match="at least 1 character"):
        TensorSpec(name="", datatype="FP32", shape=[1])


def test_datatype_mapping_round_trips():
    for dt in DATATYPES:
        assert datatype_of(numpy_dtype(dt)) == dt
    with pytest.raises(ConfigError) as ei:
        datatype_of(np.dtype("complex64"))
    assert "complex64" in ei.value.render()


# ---------------------------------------------------------------------------------------------
# ModelConfig


def _config_dict(**over):
    data = {
        "name": "digits",
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    data.update(over)
    return data


def _write(tmp_path: Path, data, name="config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_model_config_defaults_and_round_trip(tmp_path):
    cfg = load_model_config(_write(tmp_path, _config_dict(dynamic_batching={"preferred_batch_size": [4, 8]})))
    assert cfg.max_batch_size == 8
    assert cfg.dynamic_batching.preferred_batch_size == [4, 8]
    assert cfg.dynamic_batching.max_queue_size == 256
    assert cfg.instance_group.count == 1 and cfg.version_policy.latest == 1
    # What we dump is what we load back.
    again = load_model_config(_write(tmp_path, cfg.model_dump(mode="json"), "again.yaml"))
    assert again == cfg


@pytest.mark.parametrize("where", ["inputs", "outputs"])
def test_batch_dim_required_when_batching(tmp_path, where):
    data = _config_dict()
    data[where][0]["shape"] = [4] + data[where][0]["shape"][1:]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as ei:
        load_model_config(path)
    rendered = ei.value.render()
    name = data[where][0]["name"]
    assert f"tensor {name!r} must have -1 as its first (batch) dimension" in rendered
    assert f"(from {path})" in rendered


def test_no_batch_dim_needed_without_batching():
    cfg = ModelConfig(**_config_dict(max_batch_size=0,
                                     inputs=[{"name": "input", "datatype": "FP32", "shape": [1, 8, 8]}],
                                     outputs=[{"name": "logits", "datatype": "FP32", "shape": [10]}]))
    assert cfg.inputs[0].shape == [1, 8, 8]


def test_batch_dim_checked_on_assignment():
    cfg = ModelConfig(**_config_dict(max_batch_size=0, inputs=[{"name": "input", "datatype": "FP32",
                                                                "shape": [1, 8, 8]}]))
    with pytest.raises(Exception, match="batch"):
        cfg.max_batch_size = 4  # validate_assignment: the model validator runs again


@pytest.mark.parametrize("over, path, got", [
    ({"dynamic_batching": {"max_queue_size": -1}}, "dynamic_batching.max_queue_size", "-1"),
    ({"dynamic_batching": {"max_queue_sise": 3}}, "dynamic_batching.max_queue_sise", "3"),
    ({"instance_group": {"count": 0}}, "instance_group.count", "0"),
    ({"backend": "tensorflow"}, "backend", "'tensorflow'"),
    ({"name": "bad/name"}, "name", "'bad/name'"),
    ({"shards": 2}, "shards", "2"),  # unknown top-level field
])
def test_config_error_names_file_and_field_path(tmp_path, over, path, got):
    p = _write(tmp_path, _config_dict(**over))
    with pytest.raises(ConfigError) as ei:
        load_model_config(p)
    e = ei.value
    assert e.origin == str(p)
    rendered = e.render()
    assert f"{path}: " in rendered
    assert f"(got {got})" in rendered
    assert f"(from {p})" in rendered
    assert "hint:" in rendered


def test_config_error_on_nested_tensor_field(tmp_path):
    data = _config_dict()
    data["outputs"][0]["datatype"] = "FLOAT"
    with pytest.raises(ConfigError, match=r"outputs\.0\.datatype: .*\(got 'FLOAT'\)"):
        load_model_config(_write(tmp_path, data))


def test_config_error_lists_every_bad_field(tmp_path):
    p = _write(tmp_path, _config_dict(max_batch_size=-1, instance_group={"count": 0}))
    with pytest.raises(ConfigError) as ei:
        load_model_config(p)
    assert "max_batch_size:" in ei.value.message and "instance_group.count:" in ei.value.message


@pytest.mark.parametrize("text, fragment", [
    ("name: [unclosed", "not valid YAML"),
    ("", "(top level)"),          # empty file: None is not a config
    ("- 1\n- 2\n", "(top level)"),  # a list is not a config
])
def test_config_file_not_a_mapping(tmp_path, text, fragment):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_model_config(p)
    assert fragment in ei.value.render()
    assert ei.value.origin == str(p)


def test_config_file_missing(tmp_path):
    p = tmp_path / "nope" / "config.yaml"
    with pytest.raises(ConfigError) as ei:
        load_model_config(p)
    assert "file not found" in ei.value.render() and str(p) in ei.value.render()


# ---------------------------------------------------------------------------------------------
# GateConfig


def test_gate_merged_overrides_only_what_was_set():
    base = GateConfig(min_cosine=0.99, max_abs_error=1e-3, max_metric_drop=1.0)
    merged = base.merged(GateConfig(max_metric_drop=2.5))
    assert merged == GateConfig(min_cosine=0.99, max_abs_error=1e-3, max_metric_drop=2.5)
    assert base.max_metric_drop == 1.0  # the base is not modified


def test_gate_merged_explicit_none_disables_a_check():
    merged = DEFAULT_GATES["fp32"].merged(GateConfig(max_abs_error=None))
    assert merged.max_abs_error is None
    assert merged.min_cosine == DEFAULT_GATES["fp32"].min_cosine
    assert DEFAULT_GATES["fp32"].max_abs_error == 1e-3  # defaults are never mutated


def test_gate_merged_none_and_empty_keep_the_base():
    base = DEFAULT_GATES["int8"]
    assert base.merged(None) is base
    assert base.merged(GateConfig()) == base


def test_gate_merged_chains():
    user = GateConfig.model_validate({"min_cosine": 0.95})
    target = GateConfig.model_validate({"max_metric_drop": 5})
    gate = DEFAULT_GATES["int4"].merged(user).merged(target)
    assert (gate.min_cosine, gate.max_metric_drop) == (0.95, 5)


@pytest.mark.parametrize("data", [{"min_cosine": 1.5}, {"min_cosine": -2}, {"max_abs_error": -1},
                                  {"max_metric_drop": -0.1}, {"min_cosin": 0.9}])
def test_gate_bounds(data):
    with pytest.raises(Exception):
        GateConfig(**data)


# ---------------------------------------------------------------------------------------------
# Recipes


def _recipe(**over):
    data = {"name": "r", "model": {"path": "model.onnx"}}
    data.update(over)
    return data


def test_recipe_targets_as_strings_and_dicts():
    r = Recipe.model_validate(_recipe(targets=[
        "onnx",
        {"name": "onnx-int8-static", "config": {"per_channel": True}, "gate": {"min_cosine": 0.9}},
    ]))
    assert [t.name for t in r.targets] == ["onnx", "onnx-int8-static"]
    assert r.targets[0].config == {} and r.targets[0].gate is None
    assert r.targets[1].config == {"per_channel": True}
    assert r.targets[1].gate == GateConfig(min_cosine=0.9)


def test_recipe_targets_null_or_absent_is_empty():
    assert Recipe.model_validate(_recipe(targets=None)).targets == []
    assert Recipe.model_validate(_recipe()).targets == []


@pytest.mark.parametrize("targets", ["onnx", {"name": "onnx"}])
def test_recipe_targets_must_be_a_list(targets):
    # Regression: a bare string used to be iterated into the targets o, n, n, x.
    with pytest.raises(Exception, match="valid list"):
        Recipe.model_validate(_recipe(targets=targets))


def test_recipe_target_unknown_field(tmp_path):
    p = _write(tmp_path, _recipe(targets=[{"name": "onnx", "gates": {}}]), "recipe.yaml")
    with pytest.raises(ConfigError, match=r"targets\.0\.gates: Extra inputs"):
        load_recipe_file(p)


def test_recipe_gates_per_precision(tmp_path):
    r = Recipe.model_validate(_recipe(gates={"int8": {"max_metric_drop": 3}}))
    assert r.gates["int8"].max_metric_drop == 3
    # Regression: a misspelt precision was accepted and silently ignored (the default applied).
    p = _write(tmp_path, _recipe(gates={"int-8": {"max_metric_drop": 3}}), "recipe.yaml")
    with pytest.raises(ConfigError) as ei:
        load_recipe_file(p)
    assert "gates" in ei.value.message and "'int-8'" in ei.value.message
    assert ei.value.origin == str(p)


@pytest.mark.parametrize("model, message", [
    ({}, "exactly one of `path` or `factory`"),
    ({"path": "", "factory": ""}, "exactly one of `path` or `factory`"),
    ({"path": "m.onnx", "factory": "pkg.mod:build"}, "exactly one of `path` or `factory`"),
    ({"path": "m.onnx", "weights": "w.safetensors"}, "`weights` goes with `factory`"),
])
def test_source_spec_exactly_one(tmp_path, model, message):
    p = _write(tmp_path, _recipe(model=model), "recipe.yaml")
    with pytest.raises(ConfigError) as ei:
        load_recipe_file(p)
    assert "model: " in ei.value.message and message in ei.value.message
    assert ei.value.origin == str(p)


def test_source_spec_valid():
    assert SourceSpec(path="m.onnx").factory is None
    s = SourceSpec(factory="pkg.mod:build", weights="w.safetensors")
    assert (s.path, s.factory, s.weights) == (None, "pkg.mod:build", "w.safetensors")


def test_latency_batch_sizes_positive():
    with pytest.raises(Exception, match="positive"):
        Recipe.model_validate(_recipe(latency={"batch_sizes": [1, 0]}))
    with pytest.raises(Exception, match="positive"):
        Recipe.model_validate(_recipe(latency={"batch_sizes": []}))


def test_packaged_recipe_loads():
    from serve_kit.recipes import load_recipe, recipe_names

    assert "digits-cnn" in recipe_names()
    r = load_recipe("digits-cnn")
    assert r.name == "digits-cnn"
    assert r.model.factory and not r.model.path
    assert [t.describe() for t in r.inputs] == ["input:FP32:-1x1x8x8"]
    assert r.targets and all(t.name for t in r.targets)
    assert r.repository.max_batch_size >= 1


def test_every_packaged_recipe_loads():
    from serve_kit.recipes import load_recipe, recipe_names

    for name in recipe_names():
        assert load_recipe(name).name, name


def test_recipe_by_path(tmp_path):
    from serve_kit.recipes import load_recipe

    p = _write(tmp_path, _recipe(name="mine", targets=["onnx"]), "mine.yaml")
    assert load_recipe(str(p)).name == "mine"


def test_unknown_recipe_lists_recipes():
    from serve_kit.recipes import load_recipe, recipe_names

    with pytest.raises(InputError) as ei:
        load_recipe("no-such-recipe")
    e = ei.value
    rendered = e.render()
    assert "'no-such-recipe'" in rendered
    assert "(from --recipe)" in rendered
    assert e.hint is not None
    for name in recipe_names():
        assert name in e.hint
