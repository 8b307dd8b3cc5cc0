"""Figures of one rollout check: deltas of the router's counters and histograms between two scrapes.

A scrape is the sum of every replica's /metrics (prometheus-client's parser reads the text), so a
fleet behind several URLs is judged as one. Names and labels are the contract's
(`serve_kit_route_requests_total`, `serve_kit_route_request_duration_seconds`,
`serve_kit_shadow_agreement`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

Sample = tuple[str, tuple[tuple[str, str], ...]]
ERROR_CODES = frozenset({"500", "503", "504"})
"""Server-side failures; 4xx answers are the client's mistake and never count against a target."""


def parse(text: str) -> dict[Sample, float]:
    """One /metrics page -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = samples.get(key, 0.0) + float(s.value)
    return samples


def combine(scrapes: Iterable[dict[Sample, float]]) -> dict[Sample, float]:
    """Several replicas' samples summed (counters and buckets add; so do _sum and _count)."""
    total: dict[Sample, float] = {}
    for scrape in scrapes:
        for k, v in scrape.items():
            total[k] = total.get(k, 0.0) + v
    return total


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """after - before per sample; a counter that went down (a replica restarted) counts from 0."""
    out = {}
    for k, v in after.items():
        d = v - before.get(k, 0.0)
        out[k] = v if d < 0 else d
    return out


@dataclass
class TargetFigures:
    """What one target (model:version) did between two scrapes."""

    requests: int = 0
    errors: int = 0
    p99_s: float | None = None
    agreement: float | None = None
    """Mean shadow/compare agreement with the champion (None: nothing compared)."""
    compared: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error_rate"] = self.error_rate
        return d


def quantile_from_buckets(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram (upper bounds -> counts), interpolated linearly
    within the bucket it falls in, as PromQL's histogram_quantile does; None with no observations."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]] if math.isinf(bounds[-1]) else max(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):  # beyond the last finite bound: its lower edge is the best we know
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return prev_bound


def figures(d: dict[Sample, float], endpoint: str, model: str, version: int,
            roles: tuple[str, ...] = ("primary",)) -> TargetFigures:
    """One target's figures from a delta; `roles` picks which answers count (primary for split
    traffic, shadow for a shadow phase). Agreement reads both sources (shadow and compare)."""
    want = {"endpoint": endpoint, "model": model, "version": str(version)}
    f = TargetFigures()
    buckets: dict[float, float] = {}
    agree_sum = agree_count = 0.0
    for (name, labels), v in d.items():
        lab = dict(labels)
        if any(lab.get(k) != w for k, w in want.items()):
            continue
        if name == "serve_kit_route_requests_total" and lab.get("role") in roles:
            f.requests += int(round(v))
            if lab.get("code") in ERROR_CODES:
                f.errors += int(round(v))
        elif name == "serve_kit_route_request_duration_seconds_bucket" and lab.get("role") in roles:
            le = float(lab["le"])
            buckets[le] = buckets.get(le, 0.0) + v
        elif name == "serve_kit_shadow_agreement_sum":
            agree_sum += v
        elif name == "serve_kit_shadow_agreement_count":
            agree_count += v
    f.p99_s = quantile_from_buckets(buckets, 0.99)
    f.compared = int(round(agree_count))
    f.agreement = agree_sum / agree_count if agree_count else None
    return f
