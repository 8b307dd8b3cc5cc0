"""Comparing a variant's outputs with a reference's: the measures of optimize's validation gates
(optimize/validate.py) and of the runtime's live shadow comparison (runtime/router.py), one code.

Every output is compared over the WHOLE evaluation set with the measures that fit its kind (see the
README's "Gates"):

- every output: max and mean absolute error, relative L2 error of the whole set
  (||variant - reference|| / ||reference||, all samples and elements together);
- outputs of more than one element per sample: per-sample cosine (mean and minimum); a one-element
  output has none, since its cosine is 1.0 by construction whatever the error;
- small outputs (at most 16 elements per sample): cosine across samples, one vector per element
  position over the whole set, so that a scalar output has a similarity measure that can fail;
- probability, logit and discrete outputs: the share of decisions that flip (argmax over the last
  axis for multi-class, the threshold for single probabilities, the sigmoid at it for single
  logits, equality for integers);
- small probability outputs (at most 16 per sample): the largest absolute probability error (the
  silero-vad case: 0.98 on one sample, invisible to an averaged or relative measure); over a large
  probability map one element's error says little, and the flip rate judges its decisions.

The kind of an output is detected from the reference's values (see `detect_kind`), or set per output
in the gate (`kinds`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

import numpy as np

from .config import GateConfig
from .errors import InputError

SMALL_OUTPUT = 16
"""Outputs of at most this many elements per sample also get the cosine across samples."""
_CHUNK_ELEMENTS = 1 << 22
"""Elements per output compared at once: float64 temporaries stay ~100 MB whatever the set's size."""
_LOGIT_NAME = re.compile(r"(^|[^a-z])(logits?|scores?|cls|class|classes)([^a-z]|$)")

# ---------------------------------------------------------------------------------------------
# output kinds


def _as_samples(a: np.ndarray) -> np.ndarray:
    """Samples along axis 0, so that a rank-0 or rank-1 output is a set of one-element samples."""
    return a.reshape(1) if a.ndim == 0 else a


def _chunks(n: int, per_sample: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _is_multiclass_probability(r: np.ndarray) -> bool:
    if r.ndim < 2 or r.shape[-1] < 2:
        return False
    per_sample = int(np.prod(r.shape[1:]))
    return all(bool(np.all(np.abs(np.sum(r[s], axis=-1, dtype=np.float64) - 1.0) <= 1e-3))
               for s in _chunks(len(r), per_sample))


def detect_kind(name: str, reference: np.ndarray, classifier: bool = False) -> str:
    """The kind of an output from the reference's values over the evaluation set:

    - `discrete`: integer or boolean datatype;
    - `probability`: every value finite and within [0, 1];
    - `logits`: class scores, i.e. the output the task metric reads as scores (`classifier`), or
      one whose name says so (`logits`, `scores`, `cls`, `class`...);
    - `regression`: anything else (regression values, embeddings, feature maps).

    Shape alone cannot tell logits from a 4-value box regression or an embedding, hence the name
    and the metric; `kinds` in the gate config overrides the detection."""
    r = _as_samples(np.asarray(reference))
    if r.dtype.kind in "biu":
        return "discrete"
    if r.dtype.kind != "f" or r.size == 0:
        return "regression"
    if _within_unit_interval(r):
        return "probability"
    if classifier or _LOGIT_NAME.search(name.lower()):
        return "logits"
    return "regression"


def _within_unit_interval(r: np.ndarray) -> bool:
    per_sample = int(np.prod(r.shape[1:])) if r.ndim > 1 else 1
    for s in _chunks(len(r), per_sample):
        c = r[s]
        # NaN fails both comparisons, so a NaN anywhere is not a probability either.
        if not (bool(np.all(c >= 0.0)) and bool(np.all(c <= 1.0))):
            return False
    return True


def _decision(kind: str, r: np.ndarray, threshold: float) -> str | None:
    """How a probability/logit/discrete output decides: `argmax`, `threshold T` or `equal`."""
    if kind == "discrete":
        return "equal"
    if kind == "probability":
        return "argmax" if _is_multiclass_probability(r) else f"threshold {threshold:g}"
    if kind == "logits":
        return "argmax" if r.ndim >= 2 and r.shape[-1] >= 2 else f"sigmoid threshold {threshold:g}"
    return None


def _decide(decision: str, a: np.ndarray, threshold: float) -> np.ndarray:
    if decision == "argmax":
        return np.argmax(a, axis=-1)
    if decision == "equal":
        return a
    if decision.startswith("sigmoid"):
        return a > math.log(threshold / (1.0 - threshold))
    return a > threshold


# ---------------------------------------------------------------------------------------------
# measures


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], gate: GateConfig | None = None,
                    classifier: str | None = None) -> dict[str, dict[str, Any]]:
    """Per output of `ref`, the measures of `got` against it over the whole set (module docstring).

    `gate` supplies per-output kinds and decision thresholds (default: detected, 0.5);
    `classifier` names the output a task metric reads as class scores (it is then `logits`).
    A measure that does not apply to an output is None. `worst_sample` maps each measure to the
    sample where it is worst."""
    gate = gate or GateConfig()
    check_gate_outputs(gate, list(ref))
    result = {}
    for name, r in ref.items():
        if name not in got:
            raise InputError(f"variant produced no output {name!r}", value=sorted(got))
        g = np.asarray(got[name])
        r = np.asarray(r)
        if g.shape != r.shape:
            raise InputError(f"output {name!r} has shape {list(g.shape)}, reference {list(r.shape)}")
        r, g = _as_samples(r), _as_samples(g)
        kind = gate.kinds.get(name) or detect_kind(name, r, classifier == name)
        threshold = gate.threshold_for(name)
        result[name] = _measure(r, g, kind, threshold)
        result[name]["kind_from"] = "gate" if name in gate.kinds else "detected"
    return result


def check_gate_outputs(gate: GateConfig, outputs: list[str], origin: str = "gate kinds / thresholds") -> None:
    """A `kinds` or `thresholds` entry must name an output: a misspelt name would leave the
    detected kind in force without a word."""
    unknown = sorted((set(gate.kinds) | set(gate.thresholds)) - set(outputs))
    if unknown:
        raise InputError(f"the gate sets kinds or thresholds for outputs the model does not have: {unknown}",
                         origin=origin, hint=f"the outputs are {outputs}")


def _measure(r: np.ndarray, g: np.ndarray, kind: str, threshold: float) -> dict[str, Any]:
    n = len(r)
    per_sample = int(np.prod(r.shape[1:])) if r.ndim > 1 else 1
    decision = _decision(kind, r, threshold)
    small = per_sample <= SMALL_OUTPUT
    out: dict[str, Any] = {"kind": kind, "elements_per_sample": per_sample, "decision": decision}
    if n == 0 or per_sample == 0:
        return {**out, "max_abs_error": 0.0, "mean_abs_error": 0.0, "max_rel_error": 0.0, "rel_l2": 0.0,
                "cosine_mean": None, "cosine_min": None, "cosine_across": None, "prob_error": None,
                "flip_rate": 0.0 if decision else None, "worst_sample": {}}

    sq_diff = sq_ref = abs_sum = 0.0
    ref_scale = 0.0
    sample_max = np.zeros(n)      # largest |diff| per sample
    sample_l2 = np.zeros(n)       # squared L2 of the diff per sample
    cos = np.ones(n) if per_sample > 1 else None
    cols = np.zeros((3, per_sample)) if small and n > 1 else None  # dot, |ref|^2, |got|^2 per element position
    col_worst = np.zeros((2, per_sample))                         # (|diff|, sample) per element position
    flips = 0
    decisions = 0
    sample_flips = np.zeros(n, dtype=np.int64)
    broken = False
    for s in _chunks(n, per_sample):
        a = r[s].astype(np.float64).reshape(s.stop - s.start, -1)
        b = g[s].astype(np.float64).reshape(s.stop - s.start, -1)
        # Non-finite values must be where the reference has the very same ones; anything else
        # (a NaN or overflow the reference does not have) fails every measure.
        fa, fb = np.isfinite(a), np.isfinite(b)
        if not (np.array_equal(fa, fb) and np.array_equal(a[~fa], b[~fb], equal_nan=True)):
            broken = True
            break
        if not fa.all():
            a, b = np.where(fa, a, 0.0), np.where(fb, b, 0.0)
        d = np.abs(a - b)
        sq_diff += float(np.sum(d * d))
        sq_ref += float(np.sum(a * a))
        abs_sum += float(np.sum(d))
        ref_scale = max(ref_scale, float(np.max(np.abs(a))))
        sample_max[s] = np.max(d, axis=1)
        sample_l2[s] = np.sum(d * d, axis=1)
        if cos is not None:
            # Cosine is scale-free: each row is divided by its largest magnitude first, so that
            # tiny (1e-149) or huge (1e200) outputs neither underflow nor overflow the products.
            # A row that matches exactly is 1 whatever its scale; a zero row against a nonzero one 0.
            scale = np.maximum(np.max(np.abs(a), axis=1), np.max(np.abs(b), axis=1))[:, None]
            scale = np.where(scale > 0, scale, 1.0)
            an, bn = a / scale, b / scale
            na, nb = np.linalg.norm(an, axis=1), np.linalg.norm(bn, axis=1)
            exact = np.max(d, axis=1) == 0
            cos[s] = np.where(exact, 1.0, np.sum(an * bn, axis=1) / np.maximum(na * nb, np.finfo(np.float64).tiny))
        if cols is not None:
            cols[0] += np.sum(a * b, axis=0)
            cols[1] += np.sum(a * a, axis=0)
            cols[2] += np.sum(b * b, axis=0)
            worst_here = np.argmax(d, axis=0)
            better = d[worst_here, np.arange(per_sample)] > col_worst[0]
            col_worst[0] = np.where(better, d[worst_here, np.arange(per_sample)], col_worst[0])
            col_worst[1] = np.where(better, worst_here + s.start, col_worst[1])
        if decision:
            flipped = _decide(decision, r[s], threshold) != _decide(decision, g[s], threshold)
            flipped = flipped.reshape(s.stop - s.start, -1)
            sample_flips[s] = np.sum(flipped, axis=1)
            flips += int(np.sum(flipped))
            decisions += flipped.size

    if broken:
        inf = float("inf")
        return {**out, "max_abs_error": inf, "mean_abs_error": inf, "max_rel_error": inf, "rel_l2": inf,
                "cosine_mean": None if cos is None else -1.0, "cosine_min": None if cos is None else -1.0,
                "cosine_across": None if cols is None else -1.0,
                "prob_error": inf if kind == "probability" else None,
                "flip_rate": 1.0 if decision else None, "worst_sample": {}, "non_finite": True}

    max_abs = float(np.max(sample_max))
    worst_abs = int(np.argmax(sample_max))
    continuous = kind != "discrete"
    out.update(max_abs_error=max_abs, mean_abs_error=abs_sum / (n * per_sample),
               max_rel_error=max_abs / (ref_scale or 1.0))
    worst: dict[str, int] = {"max_abs_error": worst_abs}
    # An all-zero reference has no relative error to speak of; the absolute error still applies.
    out["rel_l2"] = (math.sqrt(sq_diff / sq_ref) if sq_ref > 0 else (0.0 if sq_diff == 0 else None)) \
        if continuous else None
    if out["rel_l2"] is not None:
        worst["rel_l2"] = int(np.argmax(sample_l2))
    if cos is not None and continuous:
        out.update(cosine_mean=float(np.mean(cos)), cosine_min=float(np.min(cos)))
        worst["cosine_mean"] = int(np.argmin(cos))
    else:
        out.update(cosine_mean=None, cosine_min=None)
    if cols is not None and continuous:
        dot, ra, gb = cols
        # sqrt(ra) * sqrt(gb), not sqrt(ra * gb): the product underflows for tiny values, and
        # a column that matches exactly is 1 whatever its scale.
        norms = np.sqrt(ra) * np.sqrt(gb)
        across = np.where(col_worst[0] == 0, 1.0, dot / np.maximum(norms, np.finfo(np.float64).tiny))
        j = int(np.argmin(across))
        out["cosine_across"] = float(across[j])
        worst["cosine_across"] = int(col_worst[1][j])
    else:
        out["cosine_across"] = None
    # The worst single probability means something for a few probabilities per sample (a speech
    # decision); over a map of thousands (a text-pixel map, a character distribution per
    # position) one element's error says little, and the flip rate judges the decisions.
    small_probability = kind == "probability" and per_sample <= SMALL_OUTPUT
    out["prob_error"] = max_abs if small_probability else None
    if small_probability:
        worst["prob_error"] = worst_abs
    if decision:
        out["flip_rate"] = flips / decisions if decisions else 0.0
        out["decisions"] = decisions
        worst["flip_rate"] = int(np.argmax(sample_flips))
    else:
        out["flip_rate"] = None
    out["worst_sample"] = worst
    return out
