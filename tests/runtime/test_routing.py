"""runtime/routing.py: route validation, weighted random and sticky (rendezvous) assignment,
signature compatibility. Pure: no server."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from serve_kit.config import ModelConfig, RouteSpec
from serve_kit.runtime.routing import Route, incompatibility


def _route(*weights: float, **kw) -> Route:
    spec = RouteSpec(targets=[{"model": "m", "version": i + 1, "weight": w} for i, w in enumerate(weights)], **kw)
    return Route.build("m", spec)


def _keys(n: int) -> list[str]:
    return [f"user-{i}" for i in range(n)]


def test_sticky_split_lands_within_one_and_a_half_points_and_keys_keep_their_target():
    route = _route(90, 10, sticky={"header": "x-user-id"})
    picks = [route.pick(k) for k in _keys(10_000)]
    share = picks.count(1) / len(picks)
    assert abs(share - 0.10) <= 0.015, share
    again = _route(90, 10, sticky={"header": "x-user-id"})  # a new Route object, same weights
    assert [again.pick(k) for k in _keys(10_000)] == picks


def test_changing_one_weight_moves_only_the_keys_that_must_move():
    before = _route(90, 10, sticky={"header": "k"})
    after = _route(80, 20, sticky={"header": "k"})
    a = [before.pick(k) for k in _keys(10_000)]
    b = [after.pick(k) for k in _keys(10_000)]
    moved = [(x, y) for x, y in zip(a, b) if x != y]
    assert all(x == 0 and y == 1 for x, y in moved), "a key moved away from the target that gained weight"
    assert abs(len(moved) / 10_000 - 0.10) <= 0.02


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=2, max_size=5).filter(lambda w: sum(w) > 0),
       st.integers(0, 4), st.integers(0, 20))
def test_rendezvous_moves_keys_only_to_or_from_the_changed_target(weights, which, new_weight):
    which %= len(weights)
    changed = list(weights)
    changed[which] = new_weight
    if sum(changed) == 0:
        return
    before, after = _route(*weights, sticky={"header": "k"}), _route(*changed, sticky={"header": "k"})
    for k in _keys(400):
        x, y = before.pick(k), after.pick(k)
        if x != y:
            # Only the changed target's keys move: to it when it gained weight, from it when it lost.
            assert which in (x, y)
            assert (y == which) == (new_weight > weights[which])
        assert weights[x] > 0 and changed[y] > 0


def test_random_split_follows_the_weights():
    route = _route(3, 1)
    rng = random.Random(0)
    picks = [route.pick(None, rng.random()) for _ in range(20_000)]
    assert abs(picks.count(1) / len(picks) - 0.25) < 0.02
    assert _route(0, 5).pick(None, 0.0) == 1  # a zero weight never gets a request


def test_sticky_key_from_header_or_parameter():
    by_header = _route(1, 1, sticky={"header": "X-User-Id"})
    assert by_header.spec.sticky.header == "x-user-id"
    assert by_header.key_of({"x-user-id": "alice"}, {}) == "alice"
    assert by_header.key_of({}, {"x-user-id": "alice"}) is None
    by_param = _route(1, 1, sticky={"parameter": "user_id"})
    assert by_param.key_of({}, {"user_id": 42}) == "42"
    assert _route(1, 1).key_of({"x": "1"}, {}) is None


@pytest.mark.parametrize("spec, words", [
    ({"targets": []}, "at least 1"),
    ({"targets": [{"model": "m", "weight": 0}]}, "sum to a positive number"),
    ({"targets": [{"model": "m", "weight": -1}]}, "greater than or equal to 0"),
    ({"targets": [{"model": "m", "weight": float("nan")}]}, "finite"),
    ({"targets": [{"model": "m", "version": 1}, {"model": "m", "version": 1}]}, "listed twice"),
    ({"targets": [{"model": "../etc"}]}, "pattern"),
    ({"targets": [{"model": "m"}], "shadow": {"model": "m", "percent": 101}}, "less than or equal to 100"),
    ({"targets": [{"model": "m"}], "sticky": {}}, "exactly one"),
    ({"targets": [{"model": "m"}], "compare": 2}, "less than or equal to 1"),
    ({"targets": [{"model": "m"}], "weights": [1]}, "Extra inputs"),
])
def test_invalid_routes_say_why(spec, words):
    with pytest.raises(ValidationError) as e:
        RouteSpec.model_validate(spec)
    assert words in str(e.value)


def _cfg(name: str, d_in: int = 4, d_out: int = 4, mbs: int = 16, out: str = "y", dt: str = "FP32") -> ModelConfig:
    return ModelConfig(name=name, backend="onnxruntime", max_batch_size=mbs,
                       inputs=[{"name": "x", "datatype": dt, "shape": [-1, d_in]}],
                       outputs=[{"name": out, "datatype": "FP32", "shape": [-1, d_out]}])


def test_signature_compatibility():
    base = _cfg("a")
    assert incompatibility(base, _cfg("b")) is None
    assert incompatibility(base, _cfg("b", mbs=64)) is None
    assert "inputs differ" in incompatibility(base, _cfg("b", d_in=5))
    assert "inputs differ" in incompatibility(base, _cfg("b", dt="FP16"))
    assert "outputs differ" in incompatibility(base, _cfg("b", out="z"))
    assert "at most 8 rows" in incompatibility(base, _cfg("b", mbs=8))
    assert "unbatched" in incompatibility(base, ModelConfig(
        name="b", backend="onnxruntime", max_batch_size=0,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 4]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [1, 4]}]))


def test_state_and_describe_show_the_shares():
    route = _route(95, 5, shadow={"model": "m", "version": 3, "percent": 50})
    state = route.state()
    assert [t["share"] for t in state["targets"]] == [0.95, 0.05]
    assert state["generation"] == 1 and state["source"] == "api"
    assert "m:1 95%, m:2 5%; shadow m:3 50%" == route.describe()
