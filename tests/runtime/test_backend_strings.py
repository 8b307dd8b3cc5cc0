"""ONNX Runtime string tensors through the backend: BYTES arrive as bytes and must reach ORT as text."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from serve_kit.runtime.backends import load_backend
from serve_kit.runtime.types import BadRequest


@pytest.fixture
def identity_strings(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["out"])], "strings",
                              [helper.make_tensor_value_info("text", TensorProto.STRING, [None, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.STRING, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return load_backend("onnxruntime", path)


def test_bytes_elements_reach_onnx_runtime_as_text(identity_strings):
    x = np.array([[b"ab", "héllo".encode()], [b"", b"z"]], dtype=object)
    out = identity_strings.infer({"text": x})["out"]
    assert out.tolist() == [["ab", "héllo"], ["", "z"]]


def test_non_utf8_bytes_are_a_bad_request(identity_strings):
    with pytest.raises(BadRequest, match="UTF-8"):
        identity_strings.infer({"text": np.array([[b"\xff", b"a"]], dtype=object)})
