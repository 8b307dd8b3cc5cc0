"""Calibration feeds for the quantizers, and the memory they may take.

Feeds honour each input's batch axis (TensorSpec.batch_axis, 0 by default): samples are sliced
along it, and an input without one (a rank-0 `sr`, a fixed table) is passed whole to every call.
A data array for such an input may hold one value per sample (rank + 1): then the batch's first
sample's value is fed, since one call can take only one.

Memory: the quantizers hold activations, so what a build may take is bounded by
BuildContext.memory_budget (default: a quarter of the machine's RAM). The activation bytes of one
sample are measured once (every main-graph tensor made an output, one sample run); from that
figure come the calibration batch size, how many samples histogram calibration can keep, and the
diagnosis' batch. A target that cannot run even one sample within the budget does not apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError, TargetNotApplicable
from . import save_model


def _axis(spec) -> int | None:
    if not spec.shape:  # rank 0: nothing to slice, with or without the field set
        return None
    return getattr(spec, "batch_axis", 0)


def _rank(spec) -> int:
    return len(spec.shape)


def sample_count(inputs: dict[str, np.ndarray], specs) -> int:
    for s in specs:
        arr, axis = inputs.get(s.name), _axis(s)
        if arr is None:
            continue
        if axis is None:
            if arr.ndim == _rank(s) + 1:
                return int(arr.shape[0])
            continue
        return int(arr.shape[axis])
    raise DataError("the data hold no batched input to count samples by", value=sorted(inputs))


def take(inputs: dict[str, np.ndarray], specs, index: np.ndarray) -> dict[str, np.ndarray]:
    """The feed of the samples `index` (ascending), each input sliced along its batch axis."""
    return _select(inputs, specs, index, feed=True)


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray turns a 0-d array into shape (1,): a rank-0 input must stay rank 0.
    a = np.asarray(a)
    return a if a.ndim == 0 else np.ascontiguousarray(a)


def subset(inputs: dict[str, np.ndarray], specs, index: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays of the samples `index`, in the data's own layout (per-sample values kept per sample)."""
    return _select(inputs, specs, index, feed=False)


def _select(inputs: dict[str, np.ndarray], specs, index: np.ndarray, feed: bool) -> dict[str, np.ndarray]:
    """The samples `index` of every input along its batch axis. An input without one keeps its
    per-sample values (rank + 1) as they are, or, as a `feed` for one call, the first sample's."""
    index = np.asarray(index)
    out = {}
    for s in specs:
        arr = inputs.get(s.name)
        if arr is None:
            continue
        axis = _axis(s)
        per_sample = arr.ndim == _rank(s) + 1
        if axis is None:
            picked = (arr[index[0]] if feed else arr[index]) if per_sample else arr
        else:
            picked = np.take(arr, index, axis=axis)
        out[s.name] = _contiguous(picked) if feed else picked
    return out


def evenly(n: int, k: int) -> np.ndarray:
    """k sample indices spread over n (the first k would all be from one corner of the data)."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


class FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over named arrays, in batches of one size
    (ORT's histogram calibrators fail on a short last batch; the remainder is dropped)."""

    def __init__(self, inputs: dict[str, np.ndarray], specs, batch_size: int = 16,
                 index: np.ndarray | None = None, equal_batches: bool = False, names: list[str] | None = None):
        self.inputs, self.specs, self.names = inputs, [s for s in specs if s.name in inputs], names
        self.index = np.arange(sample_count(inputs, specs)) if index is None else np.asarray(index)
        # An input without a batch axis takes one value per call: a batch can hold only one sample
        # when the data give that input a value per sample.
        per_sample_whole = any(_axis(s) is None and inputs[s.name].ndim == _rank(s) + 1 for s in self.specs)
        self.batch_size = 1 if per_sample_whole else max(1, min(batch_size, len(self.index)))
        n = len(self.index)
        self.limit = n - n % self.batch_size if equal_batches else n
        self.rewind()

    def rewind(self) -> None:
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.limit:
            return None
        idx = self.index[self._pos:min(self._pos + self.batch_size, self.limit)]
        self._pos += self.batch_size
        feed = take(self.inputs, self.specs, idx)
        if self.names is not None:
            feed = {k: v for k, v in feed.items() if k in self.names}
        return feed

    def __iter__(self):
        self.rewind()
        while (batch := self.get_next()) is not None:
            yield batch

    def __len__(self) -> int:
        return -(-self.limit // self.batch_size)

    @property
    def samples(self) -> int:
        return self.limit


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def budget_bytes(ctx_budget: int | None) -> int:
    """The build's memory budget: the one given, else a quarter of physical RAM."""
    return int(ctx_budget) if ctx_budget else physical_memory() // 4


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def activation_bytes(model_path: Path, feed: dict[str, np.ndarray], workdir: Path) -> int:
    """Bytes of every main-graph tensor for `feed` (one sample): what a calibrator or a debugger
    holds per sample when it keeps all activations."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        for o in node.output:
            if o and o not in have and o not in inits:
                model.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    aug = workdir / "_activation_probe.onnx"
    save_model(model, aug)
    del model
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        total = 0
        for v in sess.run(None, {k: v for k, v in feed.items() if k in wanted}):
            total += getattr(v, "nbytes", 0)
        return int(total)
    finally:
        aug.unlink(missing_ok=True)


@dataclass
class CalibrationPlan:
    batch_size: int
    index: np.ndarray
    per_sample_bytes: int
    budget: int

    def describe(self, total: int) -> dict[str, Any]:
        return {"samples_used": int(len(self.index)), "samples_given": int(total), "batch_size": self.batch_size,
                "activation_bytes_per_sample": self.per_sample_bytes, "memory_budget_bytes": self.budget}


HOLDS_ALL = {"entropy", "percentile"}
"""ORT's histogram calibrators keep every batch's activations until the end; MinMax reduces each
batch to a min and a max inside the graph."""
OVERHEAD = 2.0
"""ORT's arena and numpy copies on top of the activations themselves (1.8x measured on the OCR detector at batch 16)."""


def plan_calibration(per_sample: int, samples: int, batch_size: int, method: str, budget: int,
                     target: str) -> CalibrationPlan:
    cost = max(1, int(per_sample * OVERHEAD))
    if cost > budget:
        raise TargetNotApplicable(
            f"one calibration sample needs about {fmt_bytes(cost)} of activations, over the memory budget of "
            f"{fmt_bytes(budget)}", value=target,
            hint="raise --max-memory, or calibrate on smaller inputs (shorter sequences, smaller images)")
    fit = budget // cost
    if method in HOLDS_ALL:
        n = min(samples, fit)
        batch = max(1, min(batch_size, n))
        n -= n % batch
        return CalibrationPlan(batch, evenly(samples, n), per_sample, budget)
    return CalibrationPlan(max(1, min(batch_size, fit, samples)), np.arange(samples), per_sample, budget)
