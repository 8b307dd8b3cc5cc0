"""protocol.py against hostile input (issue 13): versions and lengths of any text, shapes that would
need huge allocations, BYTES that are not text for a string backend, and malformed JSON answered
without a second parse. Pure functions; hypothesis with bounded case counts."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_kit.config import ModelConfig
from serve_kit.runtime import protocol
from serve_kit.runtime.types import BadRequest

CASES = settings(max_examples=200, deadline=None)


def make_config(inputs, backend="onnxruntime", max_batch_size=4) -> ModelConfig:
    return ModelConfig(name="m", backend=backend, max_batch_size=max_batch_size,
                       inputs=[{"name": n, "datatype": d, "shape": list(s)} for n, d, s in inputs],
                       outputs=[{"name": "out", "datatype": "FP32", "shape": [-1, 2]}])


def _valid_version(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 19 and 1 <= int(text) <= 2**63 - 1


@CASES
@given(text=st.one_of(st.text(max_size=40), st.integers(-5, 2**80).map(str),
                      st.sampled_from(["9" * 5000, "1" * 4301, "0" * 30 + "1", "１", "1_0", "+1", " 1"])))
def test_parse_version_is_a_bounded_integer_or_bad_request(text):
    if text == "":
        assert protocol.parse_version(text) is None
    elif _valid_version(text):
        assert protocol.parse_version(text) == int(text)
    else:
        with pytest.raises(BadRequest, match="model version"):
            protocol.parse_version(text)


def test_a_version_of_thousands_of_digits_is_bad_request_not_int_guard():
    with pytest.raises(BadRequest) as e:
        protocol.parse_version("9" * 5000)
    assert len(e.value.message) < 300  # the bad value is quoted cut short
    assert protocol.parse_version(str(2**63 - 1)) == 2**63 - 1
    for text in (str(2**63), "0", "00"):
        with pytest.raises(BadRequest):
            protocol.parse_version(text)


@CASES
@given(text=st.one_of(st.text(max_size=30), st.integers(-5, 2**70).map(str), st.just("9" * 5000)))
def test_parse_length_takes_plain_digits_only(text):
    if text.isascii() and text.isdigit() and len(text) <= 18:
        assert protocol.parse_length(text, "X") == int(text)
    else:
        with pytest.raises(BadRequest, match="X must be a non-negative integer"):
            protocol.parse_length(text, "X")


@CASES
@given(items=st.lists(st.binary(max_size=8), min_size=2, max_size=2))
def test_text_bytes_are_checked_in_decode_for_a_string_backend(items):
    """ONNX Runtime takes BYTES as text: a non-UTF-8 element is a 400 from decode, before the
    request can join a batch; a backend without text BYTES takes any bytes."""
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in items)
    header = json.dumps({"inputs": [{"name": "s", "shape": [1, 2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    text_ok = all(_utf8(b) for b in items)
    for backend in ("onnxruntime", "torchscript"):
        config = make_config([("s", "BYTES", [-1, 2])], backend=backend)
        if backend == "onnxruntime" and not text_ok:
            with pytest.raises(BadRequest, match="'s': BYTES element .* is not UTF-8"):
                protocol.decode_infer_request(header + raw, len(header), config, "m", None)
        else:
            got = protocol.decode_infer_request(header + raw, len(header), config, "m", None)
            assert got.inputs["s"].tolist() == [items]


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@CASES
@given(shape=st.lists(st.one_of(st.integers(0, 2**66), st.just(10**9), st.just(2**31)), min_size=2, max_size=5))
def test_declared_shapes_are_checked_before_any_allocation(shape):
    """A shape whose tensor would be huge (or whose product overflows 64 bits) is a 400 from the
    header alone: nothing of that size is allocated (traced allocations stay small)."""
    config = make_config([("x", "FP32", [-1] * len(shape))], max_batch_size=0)
    header = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    tracemalloc.start()
    try:
        try:
            protocol.decode_infer_request(header + bytes(16), len(header), config, "m", None)
            ok = True
        except BadRequest:
            ok = False
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert ok == (int(np.prod(shape, dtype=object)) == 4)


def test_float_shapes_are_bad_request():
    config = make_config([("x", "FP32", [-1, -1])])
    for shape in ([1e9, 1e9], [1.0, 4], [float("inf"), 1]):
        body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [1]}]}).encode()
        with pytest.raises(BadRequest, match="'shape' must be an array of integers"):
            protocol.decode_infer_request(body, None, config, "m", None)


def test_large_malformed_json_is_refused_from_the_first_parse(monkeypatch):
    """A large body that is not JSON is answered from orjson's error: no second, slower stdlib
    parse of the whole body (which held the event loop for over a second on 60 MB with NaN).
    The stdlib parser still runs (it is only counted) for NaN / Infinity tokens."""
    calls = []
    real = protocol.json.loads
    monkeypatch.setattr(protocol.json, "loads", lambda text, *a, **k: calls.append(len(text)) or real(text, *a, **k))
    config = make_config([("x", "FP32", [-1, 4])])
    data = "[" + "1.5, " * 400_000 + "1.5]"
    good = f'{{"inputs": [{{"name": "x", "shape": [100001, 4], "datatype": "FP32", "data": {data}}}]}}'
    for bad in (good[:-3] + "x]}", good.replace("1.5, ", "1.5,, ", 1), good[:-1]):
        with pytest.raises(BadRequest, match="not valid JSON"):
            protocol.decode_infer_request(bad.encode(), None, config, "m", None)
    assert calls == []
    nan = good.replace("1.5]", "NaN]").replace("[1.5, ", "[-Infinity, ", 1)
    with pytest.raises(BadRequest, match="batch size"):  # parsed; refused for its shape, not its JSON
        protocol.decode_infer_request(nan.encode(), None, config, "m", None)
    assert len(calls) == 1
