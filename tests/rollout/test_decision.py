"""The analysis (deltas, p99 from buckets, figures per target) and the decision rules, pure."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_kit.rollout import analysis
from serve_kit.rollout.analysis import TargetFigures
from serve_kit.rollout.decision import Thresholds, judge

FAST = settings(max_examples=200, deadline=None)

PAGE = """# TYPE serve_kit_route_requests_total counter
serve_kit_route_requests_total{endpoint="d",model="d",version="2",role="primary",code="200"} %d
serve_kit_route_requests_total{endpoint="d",model="d",version="2",role="primary",code="500"} %d
serve_kit_route_requests_total{endpoint="d",model="d",version="2",role="primary",code="400"} 7
serve_kit_route_requests_total{endpoint="d",model="d",version="1",role="primary",code="200"} 100
# TYPE serve_kit_route_request_duration_seconds histogram
serve_kit_route_request_duration_seconds_bucket{endpoint="d",model="d",version="2",role="primary",le="0.01"} %d
serve_kit_route_request_duration_seconds_bucket{endpoint="d",model="d",version="2",role="primary",le="0.1"} %d
serve_kit_route_request_duration_seconds_bucket{endpoint="d",model="d",version="2",role="primary",le="+Inf"} %d
serve_kit_route_request_duration_seconds_sum{endpoint="d",model="d",version="2",role="primary"} 1.0
serve_kit_route_request_duration_seconds_count{endpoint="d",model="d",version="2",role="primary"} %d
# TYPE serve_kit_shadow_agreement summary
serve_kit_shadow_agreement_sum{endpoint="d",model="d",version="2",source="compare"} %g
serve_kit_shadow_agreement_count{endpoint="d",model="d",version="2",source="compare"} %d
"""


def page(ok, bad, fast, mid, agree_sum, compared):
    n = ok + bad + 7
    return PAGE % (ok, bad, fast, fast + mid, n, n, agree_sum, compared)


def test_figures_from_two_scrapes_of_two_replicas():
    before = analysis.combine([analysis.parse(page(10, 0, 10, 7, 5, 5)), analysis.parse(page(0, 0, 0, 7, 0, 0))])
    after = analysis.combine([analysis.parse(page(60, 2, 50, 26, 30, 35)), analysis.parse(page(40, 3, 40, 17, 20, 25))])
    f = analysis.figures(analysis.delta(before, after), "d", "d", 2)
    # 4xx answers are counted as answers but not as errors
    assert f.requests == (60 + 2 + 7 + 40 + 3 + 7) - (10 + 7 + 7)
    assert f.errors == 5
    assert f.compared == 55 and math.isclose(f.agreement, 45 / 55)
    assert 0.01 < f.p99_s <= 0.1
    assert analysis.figures(analysis.delta(before, after), "d", "d", 1).requests == 0  # the champion did nothing new


def test_a_restarted_replica_counts_from_zero():
    before = analysis.parse(page(100, 0, 100, 7, 0, 0))
    after = analysis.parse(page(10, 1, 10, 1, 0, 0))
    assert analysis.figures(analysis.delta(before, after), "d", "d", 2).errors == 1


@FAST
@given(st.lists(st.floats(1e-4, 5.0), min_size=1, max_size=300))
def test_p99_from_buckets_lies_in_the_bucket_of_the_true_p99(xs):
    bounds = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, math.inf]
    arr = np.array(xs)
    buckets = {b: float((arr <= b).sum()) for b in bounds}
    est = analysis.quantile_from_buckets(buckets, 0.99)
    rank = math.ceil(0.99 * len(xs))
    true = float(np.sort(arr)[rank - 1])
    hi = next(b for b in bounds if true <= b)
    lo = max([0.0] + [b for b in bounds if b < hi])
    assert lo <= est <= (hi if not math.isinf(hi) else lo)


figs = st.builds(TargetFigures, requests=st.integers(0, 10_000), errors=st.integers(0, 10_000),
                 p99_s=st.none() | st.floats(1e-4, 10), agreement=st.none() | st.floats(0, 1),
                 compared=st.integers(0, 1000)).filter(lambda f: f.errors <= f.requests)
limits = st.builds(Thresholds, max_error_rate=st.floats(0, 0.5), max_p99_ratio=st.floats(1, 3),
                   min_agreement=st.none() | st.floats(0.5, 1), min_requests=st.integers(1, 500))


@FAST
@given(limits, figs, figs)
def test_rules(t, cand, champ):
    v = judge(t, cand, champ)
    bad_errors = cand.requests > 0 and cand.errors / cand.requests > t.max_error_rate
    enough = cand.requests >= t.min_requests
    slow = enough and cand.p99_s is not None and bool(champ.p99_s) and cand.p99_s / champ.p99_s > t.max_p99_ratio
    disagrees = enough and t.min_agreement is not None and cand.agreement is not None and cand.agreement < t.min_agreement
    if v.action == "pass":  # a pass needs the evidence and every rule met
        assert enough and not bad_errors and not slow and not disagrees
    elif v.action == "hold":  # only for too little evidence, and never hides a rule that failed with enough
        assert not enough and not (bad_errors and cand.errors > t.max_error_rate * t.min_requests)
    else:
        assert bad_errors or slow or disagrees
        assert v.reasons
    # more errors never turn a rollback into a pass
    if v.action == "rollback" and bad_errors:
        worse = TargetFigures(cand.requests + 10, cand.errors + 10, cand.p99_s, cand.agreement, cand.compared)
        assert judge(t, worse, champ).action == "rollback"


def test_a_dead_candidate_is_rolled_back_before_min_requests():
    t = Thresholds(max_error_rate=0.01, min_requests=100)
    assert judge(t, TargetFigures(requests=5, errors=5), TargetFigures()).action == "rollback"
    assert judge(t, TargetFigures(requests=5, errors=0), TargetFigures()).action == "hold"


def _plan(shadow=0.0, agreement=0.95):
    from serve_kit.rollout.engine import Plan, check_steps

    return Plan(endpoint="digits", candidate=("digits", 2), shadow_s=shadow, steps=check_steps([5, 25, 50]),
                interval_s=60, thresholds=Thresholds(0.01, 1.5, agreement, 50))


# No published Istio / Flagger CRD schema ships in the venv (kubernetes-validate has core kinds
# only), so these pin the fields of those schemas that the policy relies on.
def test_istio_manifests_carry_the_first_step_and_the_mirror():
    from serve_kit.rollout.emit import istio

    rule, vs = istio(_plan(), ("digits", 1), service="digits")
    assert rule["kind"] == "DestinationRule" and [s["labels"] for s in rule["spec"]["subsets"]] == [{"version": "1"}, {"version": "2"}]
    http = vs["spec"]["http"][0]
    assert [(r["destination"]["subset"], r["weight"]) for r in http["route"]] == [("v1", 95), ("v2", 5)]
    assert sum(r["weight"] for r in http["route"]) == 100 and "mirror" not in http
    http = istio(_plan(shadow=30), ("digits", 1), service="digits")[1]["spec"]["http"][0]
    assert http["mirror"]["subset"] == "v2" and http["mirrorPercentage"] == {"value": 100.0}
    assert [r["weight"] for r in http["route"]] == [100, 0]


def test_flagger_canary_and_metric_templates_read_serve_kit_metrics():
    from prometheus_client.parser import text_string_to_metric_families  # noqa: F401 - same names as analysis
    from serve_kit.rollout.emit import flagger

    canary, *templates = flagger(_plan(), ("digits", 1), service="digits")
    a = canary["spec"]["analysis"]
    assert a["stepWeights"] == [5, 25, 50] and a["maxWeight"] == 50 and a["threshold"] == 1 and a["interval"] == "1m"
    names = {t["metadata"]["name"]: t["spec"]["query"] for t in templates}
    assert {m["templateRef"]["name"] for m in a["metrics"]} == set(names)
    # Per-version series: under a mesh the pods serve their own version without a route.
    assert "serve_kit_requests_total" in names["serve-kit-error-rate"] and "endpoint=" not in names["serve-kit-error-rate"]
    assert "serve_kit_compute_duration_seconds_bucket" in names["serve-kit-p99-ratio"]
    assert 'version="2"' in names["serve-kit-p99-ratio"] and 'version="1"' in names["serve-kit-p99-ratio"]
    assert "serve_kit_shadow_agreement_sum" in names["serve-kit-agreement"]
    limits = {m["name"]: m["thresholdRange"] for m in a["metrics"]}
    assert limits == {"serve-kit-error-rate": {"max": 0.01}, "serve-kit-p99-ratio": {"max": 1.5},
                      "serve-kit-agreement": {"min": 0.95}}
    assert "serve-kit-agreement" not in {t["metadata"]["name"] for t in flagger(_plan(agreement=None), ("digits", 1), service="d")[1:]}
