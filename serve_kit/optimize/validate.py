"""Validation: run a variant against the reference on held-out real inputs and apply its gate.

The measures of each output (serve_kit/compare.py, shared with the runtime's shadow comparison)
are taken over the WHOLE evaluation set. With labels and a task metric, the metric and its change
are checked too. A variant passes only if every check its gate configures passes; the result lists
every check and the worst-offending output, measure and sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..compare import _as_samples, compare_outputs, detect_kind  # noqa: F401 - detect_kind re-exported
from ..config import GateConfig
from ..errors import DataError, InputError
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


# ---------------------------------------------------------------------------------------------
# task metric


class Metric:
    """A task metric: `top1` (accuracy in percent of the first output's decisions: argmax over the
    last axis, or the 0.5 threshold of a single probability / 0 of a single logit) or a user
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

    def scores_output(self, outputs: dict[str, np.ndarray]) -> str | None:
        """The output this metric reads as class scores (then a `logits` output for the gate)."""
        return next(iter(outputs), None) if self.name == "top1" else None

    def check_labels(self, labels: np.ndarray, samples: int | None = None, origin: str = "evaluation data",
                     name: str = "labels") -> None:
        """Refuse labels that cannot match this metric before any work (a top1 over string labels
        would silently read 0.00): top1 needs integer class ids, one per sample. A user function
        gets whatever dtype the user saved (e.g. text for an OCR metric), only the count is checked."""
        labels = np.asarray(labels)
        if samples is not None and labels.ndim >= 1 and len(labels) != samples:
            raise DataError(f"label array {name!r} has {len(labels)} entries for {samples} samples",
                            value=list(labels.shape), origin=origin, hint="save one label per sample")
        if self.name != "top1":
            return
        hint = ("top1 compares the first output's predicted class ids with the labels: save them as "
                "integers (e.g. np.int64 class indices; map class names to ids first)")
        if labels.dtype.kind not in "biuf":
            raise DataError(f"label array {name!r} has dtype {labels.dtype} ({_dtype_words(labels.dtype)}), "
                            "which can never equal a class id", value=str(labels.dtype), origin=origin, hint=hint)
        if labels.dtype.kind == "f" and not bool(np.all(np.isfinite(labels) & (labels == np.round(labels)))):
            raise DataError(f"label array {name!r} holds non-integer floats, not class ids",
                            value=str(labels.reshape(-1)[:5].tolist()), origin=origin, hint=hint)

    def __call__(self, outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
        try:
            value = self.fn(outputs, labels)
            value = float(value)
        except (InputError, DataError):
            raise
        except Exception as e:
            raise InputError(f"metric {self.name!r} failed: {type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:300]}",
                             origin="--metric / recipe metric",
                             hint="it is called as fn(outputs: dict[str, ndarray], labels: ndarray) -> float") from None
        if not math.isfinite(value):
            raise InputError(f"metric {self.name!r} returned {value}", origin="--metric / recipe metric",
                             hint="a metric must return a finite number (higher is better)")
        return value


def _dtype_words(dtype: np.dtype) -> str:
    return {"U": "text", "S": "bytes", "O": "Python objects", "c": "complex numbers", "M": "dates",
            "m": "durations", "V": "raw records"}.get(dtype.kind, dtype.kind)


def _top1(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    scores = _as_samples(np.asarray(next(iter(outputs.values()))))
    if scores.ndim == 1 or scores.shape[-1] == 1:
        # One score per sample: a binary decision, at 0.5 for probabilities and 0 for logits.
        s = scores.reshape(len(scores), -1)[:, 0]
        cut = 0.5 if float(np.min(s, initial=0.0)) >= 0 and float(np.max(s, initial=0.0)) <= 1 else 0.0
        pred = (s > cut).astype(np.int64)
    else:
        pred = np.argmax(scores, axis=-1)
    return 100.0 * float(np.mean(pred.reshape(-1) == labels.reshape(-1)))


# ---------------------------------------------------------------------------------------------
# the gate


_CHECKS: list[tuple[str, str, str, str]] = [
    # (measure in compare_outputs, gate field, "max" = value must not exceed / "min", words)
    ("max_abs_error", "max_abs_error", "max", "max abs error"),
    ("rel_l2", "max_rel_l2", "max", "relative L2 error"),
    ("cosine_mean", "min_cosine", "min", "mean per-sample cosine"),
    ("cosine_across", "min_cosine_across", "min", "cosine across samples"),
    ("prob_error", "max_prob_error", "max", "probability error"),
    ("flip_rate", "max_flip_rate", "max", "decision flip rate"),
]


@dataclass
class GateResult:
    passed: bool
    checks: list[dict[str, Any]] = field(default_factory=list)
    worst: dict[str, Any] | None = None
    """The check closest to (or furthest past) its threshold: output, measure, sample, value."""

    @property
    def failures(self) -> list[str]:
        return [c["text"] for c in self.checks if not c["passed"]]


def _badness(value: float, threshold: float, direction: str) -> float:
    """How far a value is towards its threshold: 1.0 at it, above 1 past it."""
    if direction == "max":
        return value / threshold if threshold > 0 else (math.inf if value > 0 else 0.0)
    miss, room = 1.0 - value, 1.0 - threshold
    return miss / room if room > 0 else (math.inf if miss > 0 else 0.0)


def apply_gate(gate: GateConfig, errors: dict[str, dict[str, Any]], metric_delta: float | None) -> GateResult:
    """Every check the gate configures for every output it applies to (a measure that is None for
    an output, e.g. the cosine of one element, is not checked), then the metric drop."""
    checks = []
    for out, e in errors.items():
        for measure, fld, direction, words in _CHECKS:
            limit, value = getattr(gate, fld), e.get(measure)
            if limit is None or value is None:
                continue
            ok = value <= limit if direction == "max" else value >= limit
            sample = (e.get("worst_sample") or {}).get(measure)
            at = f" (worst sample {sample})" if sample is not None else ""
            sign = ("<=" if ok else ">") if direction == "max" else (">=" if ok else "<")
            text = f"{out}: {words} {value:.4g} {sign} {limit:g}{at}"
            checks.append({"check": f"{out}.{measure}", "output": out, "measure": measure, "value": value,
                           "threshold": limit, "limit": limit, "passed": bool(ok), "sample": sample,
                           "kind": e.get("kind"), "text": text,
                           "badness": _badness(value, limit, direction)})
    if gate.max_metric_drop is not None and metric_delta is not None:
        drop = -metric_delta
        checks.append({"check": "metric_drop", "output": None, "measure": "metric_drop", "value": drop,
                       "threshold": gate.max_metric_drop, "limit": gate.max_metric_drop,
                       "passed": bool(drop <= gate.max_metric_drop), "sample": None, "kind": None,
                       "text": f"metric dropped {drop:.3f} {'<=' if drop <= gate.max_metric_drop else '>'} "
                               f"{gate.max_metric_drop}",
                       "badness": _badness(drop, gate.max_metric_drop, "max") if drop > 0 else 0.0})
    worst = None
    if checks:
        failed = [c for c in checks if not c["passed"]]
        w = max(failed or checks, key=lambda c: c["badness"])
        worst = {"output": w["output"], "measure": w["measure"], "sample": w["sample"], "value": w["value"],
                 "threshold": w["threshold"], "passed": w["passed"]}
    for c in checks:
        c.pop("badness")
    return GateResult(all(c["passed"] for c in checks), checks, worst)


@dataclass
class Validation:
    errors: dict[str, dict[str, Any]]
    metric: float | None
    metric_delta: float | None
    gate: GateConfig
    result: GateResult
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "errors": self.errors, "metric": self.metric,
                "metric_delta": self.metric_delta, "gate": self.gate.model_dump(),
                "passed": self.result.passed, "checks": self.result.checks, "worst": self.result.worst}


def validate(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], data: Dataset,
             metric: Metric | None, reference_metric: float | None, gate: GateConfig) -> Validation:
    errors = compare_outputs(reference, outputs, gate, metric.scores_output(reference) if metric else None)
    value = delta = None
    if metric is not None and data.labels is not None:
        value = metric(outputs, data.labels)
        delta = value - reference_metric if reference_metric is not None else None
    return Validation(errors, value, delta, gate, apply_gate(gate, errors, delta), len(data))
