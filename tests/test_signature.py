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
