"""The harness's own rules (contract 5's exit code, the served-vs-original measures): fast, no model."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from zoo import harness

STATUS = st.sampled_from(sorted(harness.STATUSES))


@given(st.lists(STATUS, max_size=6), st.booleans())
def test_expected_exit_follows_contract_5(statuses, written):
    report = {"variants": [{"name": f"t{i}", "status": s} for i, s in enumerate(statuses)],
              "written": {"version": 1} if written else None}
    code = harness.expected_exit(report)
    if "bug" in statuses:
        assert code == 1
    elif written:
        assert code == 0
    elif "failed" in statuses:
        assert code == 3
    else:
        assert code == 1


def test_compare_measures():
    rng = np.random.default_rng(0)
    prob = rng.uniform(0, 1, (50, 1)).astype(np.float32)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    same = harness.compare({"p": prob, "e": emb}, {"p": prob, "e": emb})
    assert same["p"]["max_abs_error"] == 0 and same["p"]["flip_rate"] == 0 and "cosine_mean" not in same["p"]
    assert same["e"]["cosine_mean"] > 0.999999 and "flip_rate" not in same["e"]
    off = prob.copy()
    off[3] = 1 - off[3]
    d = harness.compare({"p": off}, {"p": prob})["p"]
    assert abs(d["prob_error"] - abs(1 - 2 * float(prob[3, 0]))) < 1e-6 and d["decisions"] == 50
    soft = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    assert harness.compare({"s": soft[::-1]}, {"s": soft})["s"]["flip_rate"] == 1.0  # argmax of a softmax
