"""Validation: run a variant against the reference on held-out real inputs and apply its gate.

Per output: max absolute error, max relative error (to the reference's largest magnitude), mean
and minimum per-sample cosine similarity; with labels or a metric function, the task metric and
its change. A variant passes only if every configured check of its gate passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import GateConfig
from ..errors import InputError
from .calibration import Dataset, import_object

EVAL_BATCH = 64


def run_batched(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], data: Dataset,
                batch_size: int = EVAL_BATCH, advance: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(data), batch_size):
        out = fn(data.slice(start, start + batch_size))
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v))
        if advance:
            advance(min(batch_size, len(data) - start))
    return {k: np.concatenate(v, axis=0) for k, v in chunks.items()}


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    result = {}
    for name, r in ref.items():
        if name not in got:
            raise InputError(f"variant produced no output {name!r}", value=sorted(got))
        g = got[name]
        if g.shape != r.shape:
            raise InputError(f"output {name!r} has shape {list(g.shape)}, reference {list(r.shape)}")
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        diff = np.abs(r64 - g64)
        scale = float(np.max(np.abs(r64))) or 1.0
        a = r64.reshape(len(r64), -1) if r64.ndim > 1 else r64.reshape(-1, 1)
        b = g64.reshape(len(g64), -1) if g64.ndim > 1 else g64.reshape(-1, 1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        both_zero = (na == 0) & (nb == 0)
        cos = np.where(both_zero, 1.0, np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30))
        finite = bool(np.all(np.isfinite(g64)))
        result[name] = {
            "max_abs_error": float(np.max(diff)) if finite else float("inf"),
            "max_rel_error": float(np.max(diff) / scale) if finite else float("inf"),
            "cosine_mean": float(np.mean(cos)) if finite else -1.0,
            "cosine_min": float(np.min(cos)) if finite else -1.0,
        }
    return result


class Metric:
    """A task metric: `top1` (accuracy in percent from the first output's argmax) or a user
    function `module:fn(outputs: dict[str, ndarray], labels: ndarray) -> float` (higher is better)."""

    def __init__(self, spec: str):
        self.name = spec
        if spec == "top1":
            self.fn = _top1
        else:
            fn = import_object(spec, "metric")
            if not callable(fn):
                raise InputError("metric is not callable", value=spec, origin="--metric / recipe metric")
            self.fn = fn

    def __call__(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
        return float(self.fn(outputs, labels))


def _top1(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    scores = next(iter(outputs.values()))
    return 100.0 * float(np.mean(np.argmax(scores, axis=-1) == labels.reshape(-1)))


@dataclass
class GateResult:
    passed: bool
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [c["text"] for c in self.checks if not c["passed"]]


def apply_gate(gate: GateConfig, errors: dict[str, dict[str, float]], metric_delta: float | None) -> GateResult:
    checks = []

    def check(name: str, value: float, limit: float, ok: bool, text: str) -> None:
        checks.append({"check": name, "value": value, "limit": limit, "passed": bool(ok), "text": text})

    for out, e in errors.items():
        if gate.min_cosine is not None:
            check(f"{out}.cosine_mean", e["cosine_mean"], gate.min_cosine, e["cosine_mean"] >= gate.min_cosine,
                  f"{out}: mean cosine {e['cosine_mean']:.6f} < {gate.min_cosine}")
        if gate.max_abs_error is not None:
            check(f"{out}.max_abs_error", e["max_abs_error"], gate.max_abs_error,
                  e["max_abs_error"] <= gate.max_abs_error,
                  f"{out}: max abs error {e['max_abs_error']:.3g} > {gate.max_abs_error}")
    if gate.max_metric_drop is not None and metric_delta is not None:
        check("metric_drop", -metric_delta, gate.max_metric_drop, -metric_delta <= gate.max_metric_drop,
              f"metric dropped {-metric_delta:.3f} > {gate.max_metric_drop}")
    return GateResult(all(c["passed"] for c in checks), checks)


@dataclass
class Validation:
    errors: dict[str, dict[str, float]]
    metric: float | None
    metric_delta: float | None
    gate: GateConfig
    result: GateResult
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "errors": self.errors, "metric": self.metric,
                "metric_delta": self.metric_delta, "gate": self.gate.model_dump(),
                "passed": self.result.passed, "checks": self.result.checks}


def validate(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], data: Dataset,
             metric: Metric | None, reference_metric: float | None, gate: GateConfig) -> Validation:
    errors = compare_outputs(reference, outputs)
    value = delta = None
    if metric is not None and data.labels is not None:
        value = metric(outputs, data.labels)
        delta = value - reference_metric if reference_metric is not None else None
    return Validation(errors, value, delta, gate, apply_gate(gate, errors, delta), len(data))

