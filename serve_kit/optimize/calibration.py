"""Calibration and evaluation data: loading, checking against the model's signature, hashing.

Data are real by default: a folder of .npy/.npz files, one .npz with named arrays, or a recipe's
dataset function. Random data are refused unless the user asks for them explicitly
(`--allow-synthetic-calibration`); then they are labelled synthetic everywhere, manifest included.
"""

from __future__ import annotations

import hashlib
import importlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import TensorSpec
from ..errors import DataError, InputError

# Variable (non-batch) dimensions get this size in synthetic data.
SYNTHETIC_VARIABLE_DIM = 16


SEQUENCE_KEY = "sequence"
"""Optional array of a stateful model's data: one sequence id per sample; samples of one id are
consecutive chunks of one stream (in file order)."""


def take(arr: np.ndarray, index: Any, axis: int | None) -> np.ndarray:
    """`arr` restricted to the samples `index` (an int array or a slice) along its batch axis;
    an input without batch axis (None) is fed whole and is never split."""
    if axis is None:
        return arr
    if isinstance(index, slice):
        where = [slice(None)] * arr.ndim
        where[axis] = index
        return arr[tuple(where)]
    return np.take(arr, index, axis=axis)


def count(arr: np.ndarray, axis: int | None) -> int | None:
    """Samples in `arr` along its batch axis; None for an input without batch axis."""
    return None if axis is None else arr.shape[axis]


@dataclass
class Dataset:
    """Named input arrays (the same number of samples along each one's batch axis), optional
    labels, and their origin. `axes` gives each input's batch axis (missing = 0; None = fed
    whole to every call, never sliced and never counted as samples)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    origin: str = ""
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)
    axes: dict[str, int | None] = field(default_factory=dict)
    sequence: np.ndarray | None = None
    """Sequence id per sample for a stateful model's data (see SEQUENCE_KEY); None = one stream."""

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    def __len__(self) -> int:
        for k, v in self.inputs.items():
            n = count(v, self.axis(k))
            if n is not None:
                return n
        # Every input is fed whole: the data set is one sample.
        return 1

    def sha256(self) -> str:
        h = hashlib.sha256()
        items = sorted(self.inputs.items())
        if self.labels is not None:
            items.append(("__labels__", self.labels))
        if self.sequence is not None:
            items.append(("__sequence__", self.sequence))
        for name, arr in items:
            arr = np.asarray(arr, order="C")
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def _batched(self) -> bool:
        return any(self.axis(k) is not None for k in self.inputs)

    def slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: take(v, slice(start, stop), self.axis(k)) for k, v in self.inputs.items()}

    def subset(self, index: np.ndarray, origin: str | None = None) -> "Dataset":
        index = np.asarray(index, dtype=np.int64)
        return Dataset({k: take(v, index, self.axis(k)) for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[index],
                       origin or self.origin, self.synthetic, list(self.notes), dict(self.axes),
                       None if self.sequence is None else self.sequence[index])

    def tiled(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of exactly `batch_size` real samples (repeating them when there are fewer);
        inputs without batch axis come whole."""
        idx = np.arange(batch_size) % len(self)
        return {k: np.asarray(take(v, idx, self.axis(k)), order="C") for k, v in self.inputs.items()}

    def describe(self) -> dict[str, Any]:
        arrays = {}
        for k, v in self.inputs.items():
            arrays[k] = {"dtype": str(v.dtype), "shape": list(v.shape)}
            if self.axis(k) != 0:
                arrays[k]["batch_axis"] = self.axis(k)
        return {
            "origin": self.origin,
            "samples": len(self),
            "sha256": self.sha256(),
            "synthetic": self.synthetic,
            "labels": self.labels is not None,
            "arrays": arrays,
            **({"sequences": int(len(np.unique(self.sequence)))} if self.sequence is not None else {}),
            **({"notes": self.notes} if self.notes else {}),
        }


def import_object(ref: str, origin: str) -> Any:
    """Import `package.module:attribute`."""
    if ":" not in ref:
        raise InputError("expected package.module:function", value=ref, origin=origin,
                         hint="e.g. my_project.models:build_model")
    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"cannot import module {mod_name!r}: {e}", value=ref, origin=origin,
                         hint="is the package installed, or its folder on PYTHONPATH?") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"module {mod_name!r} has no attribute {attr!r}", value=ref, origin=origin)
        obj = getattr(obj, part)
    return obj


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    # np.load decides by content, not by suffix: a .npy renamed .npz would come back as an array
    # (no context manager, a TypeError below) and any other file would be reported as a pickle.
    if not zipfile.is_zipfile(path):
        raise DataError("not a .npz archive (not a zip file; truncated or another format)", value=str(path),
                        hint="write it with numpy.savez, or name a single array .npy")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        hint = ("object arrays are refused (they would need unpickling); save numeric arrays"
                if "pickle" in str(e) else "is it a file written by numpy.savez?")
        raise DataError(f"cannot read .npz file: {e}", value=str(path), hint=hint) from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        hint = ("object arrays are refused (they would need unpickling); save numeric arrays"
                if "pickle" in str(e) else "is it a file written by numpy.save?")
        raise DataError(f"cannot read .npy file: {e}", value=str(path), hint=hint) from None


def load_arrays(path: Path, specs: list[TensorSpec], label_key: str) -> tuple[dict[str, np.ndarray], str]:
    """Named arrays from a .npz, a .npy, or a folder of them. See the README for the naming rules."""
    if not path.exists():
        raise DataError("data path not found", value=str(path))
    known = {s.name for s in specs} | {label_key}
    sole = specs[0] if len(specs) == 1 else None
    parts: dict[str, list[np.ndarray]] = {}

    def add_npy(p: Path) -> None:
        arr = _load_npy(p)
        if p.stem in known:
            name = p.stem
        elif sole is not None:
            name = sole.name
            if sole.batch_axis is not None and arr.ndim == len(sole.shape) - 1:
                arr = np.expand_dims(arr, sole.batch_axis)  # one sample: give it its batch dimension
        else:
            raise DataError(f".npy file name {p.stem!r} names no model input and the model has several inputs",
                            value=str(p), hint=f"name the files after the inputs: {sorted(known)}")
        parts.setdefault(name, []).append(arr)

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise DataError("folder holds no .npy or .npz files", value=str(path))
    else:
        files = [path]
    for p in files:
        if p.suffix == ".npz":
            for k, v in _load_npz(p).items():
                parts.setdefault(k, []).append(v)
        elif p.suffix == ".npy":
            add_npy(p)
        else:
            raise DataError("data must be .npy, .npz or a folder of them", value=str(p))
    axes = {s.name: s.batch_axis for s in specs}
    arrays = {}
    for k, chunks in parts.items():
        if len(chunks) == 1:
            arrays[k] = chunks[0]
            continue
        axis = axes.get(k, 0)
        if axis is None:
            raise DataError(f"several files hold array {k!r}, but model input {k!r} has no batch axis to "
                            f"stack them along", value=str(path), hint="give it once (it is fed whole)")
        try:
            arrays[k] = np.concatenate(chunks, axis=axis)
        except (ValueError, np.exceptions.AxisError) as e:
            raise DataError(f"arrays named {k!r} in {path} do not stack along their batch axis {axis}: {e}",
                            value=str(path)) from None
    return arrays, str(path)


def _axis_text(s: TensorSpec) -> str:
    return "no batch axis" if s.batch_axis is None else f"axis {s.batch_axis}"


def to_dataset(arrays: dict[str, Any], specs: list[TensorSpec], label_key: str, origin: str,
               optional: frozenset[str] | set[str] = frozenset(),
               ignore: frozenset[str] | set[str] = frozenset()) -> Dataset:
    """Check named arrays against the input signature and build a Dataset.

    Each input's samples are counted along its own batch axis (TensorSpec.batch_axis); an input
    without one (a scalar, a fixed tensor) must come whole, as the model takes it. Inputs named
    in `optional` may be absent (a state input then starts from zeros); arrays named in `ignore`
    are dropped (inputs baked in as constants). A `sequence` array that
    names no input is kept as the samples' sequence ids. Every problem names the array, where it
    came from, what the model expects and how to fix it.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items() if k not in ignore}
    labels = arrays.pop(label_key, None)
    names = {s.name for s in specs}
    sequence = arrays.pop(SEQUENCE_KEY, None) if SEQUENCE_KEY not in names else None
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        # One input, one array: its name does not matter (e.g. np.savez(f, x) stores "arr_0").
        arrays = {specs[0].name: next(iter(arrays.values()))}
    missing = [s.name for s in specs if s.name not in arrays and s.name not in optional]
    if missing:
        raise DataError(f"data have no array for model input(s) {missing}", value=sorted(arrays), origin=origin,
                        hint=f"name the arrays after the model's inputs {[s.name for s in specs]}"
                             f" (labels go in {label_key!r}); a recurrent state input fed by an output may start "
                             f"from zeros with --state OUTPUT=INPUT, a fixed one be set with --constant NAME=VALUE")
    extra = [k for k in arrays if k not in names]
    if extra:
        raise DataError(f"data hold arrays that are no model input: {extra}", origin=origin,
                        hint=f"the model's inputs are {[s.name for s in specs]}; labels go in {label_key!r}")
    counts: dict[str, int] = {}
    present = [s for s in specs if s.name in arrays]
    for s in present:
        arr = arrays[s.name]
        if arr.dtype != s.dtype:
            raise DataError(f"array {s.name!r} has dtype {arr.dtype}, but model input {s.name!r} is "
                            f"{s.datatype} ({s.dtype})", value=str(arr.dtype), origin=origin,
                            hint=f"save it as {s.dtype}: arr.astype(np.{s.dtype})")
        layout = ("the whole tensor, fed to every call as is" if s.batch_axis is None else
                  "batch-first: (samples, *sample_shape)" if s.batch_axis == 0 else
                  f"samples along axis {s.batch_axis}, as the model takes them")
        if arr.ndim != len(s.shape):
            hint = f"the array holds {layout}"
            if s.batch_axis is None and arr.ndim == len(s.shape) + 1:
                hint += "; one value for all samples is expected (declare a batch axis with @AXIS if it has one)"
            raise DataError(f"array {s.name!r} has shape {list(arr.shape)} (rank {arr.ndim}), but model input "
                            f"{s.describe()} has rank {len(s.shape)}", value=list(arr.shape), origin=origin,
                            hint=hint)
        for i, (got, want) in enumerate(zip(arr.shape, s.shape)):
            if i != s.batch_axis and want != -1 and got != want:
                raise DataError(f"array {s.name!r} has shape {list(arr.shape)}, but model input "
                                f"{s.describe()} needs size {want} in dimension {i}", value=list(arr.shape),
                                origin=origin, hint=f"the array holds {layout}")
        n = count(arr, s.batch_axis)
        if n is not None:
            counts[s.name] = n
    if len(set(counts.values())) > 1:
        by = {s.name: s for s in present}
        listing = ", ".join(f"{k!r}: {n} along {_axis_text(by[k])}" for k, n in counts.items())
        raise DataError(f"arrays have different sample counts ({listing})", value=counts, origin=origin,
                        hint="each input's samples are counted along its batch axis; declare another one with "
                             "--input NAME:DATATYPE:SHAPE@AXIS (e.g. state:FP32:2x-1x128@1) or @none for an "
                             "input fed whole")
    n = next(iter(counts.values()), 1)
    if not n:
        raise DataError("data hold no samples", origin=origin)
    if labels is not None and (labels.ndim == 0 or len(labels) != n):
        got = "a single value" if labels.ndim == 0 else f"{len(labels)} entries"
        raise DataError(f"{label_key!r} has {got} for {n} samples", origin=origin, hint="one label per sample")
    if sequence is not None and (sequence.ndim != 1 or len(sequence) != n or sequence.dtype.kind not in "iu"):
        raise DataError(f"{SEQUENCE_KEY!r} must hold one integer sequence id per sample ({n}), got "
                        f"{sequence.dtype} of shape {list(sequence.shape)}", origin=origin,
                        hint="e.g. np.repeat(np.arange(streams), chunks_per_stream)")
    return Dataset({s.name: np.asarray(arrays[s.name], order="C") for s in present}, labels, origin,
                   axes={s.name: s.batch_axis for s in present}, sequence=sequence)


def synthetic(specs: list[TensorSpec], samples: int, seed: int = 0) -> Dataset:
    """Random data of the signature's shape. Only on explicit request; always labelled."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for s in specs:
        shape = [samples if i == s.batch_axis else SYNTHETIC_VARIABLE_DIM if d == -1 else d
                 for i, d in enumerate(s.shape)]
        if s.dtype.kind == "f":
            arrays[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iu":
            arrays[s.name] = rng.integers(0, 100, size=shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            arrays[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise DataError(f"cannot make synthetic data for {s.describe()}", value=s.datatype)
    return Dataset(arrays, None, f"synthetic (seed {seed})", synthetic=True,
                   notes=["SYNTHETIC random data: accuracy figures say nothing about real inputs"],
                   axes={s.name: s.batch_axis for s in specs})


@dataclass
class DataSplit:
    calibration: Dataset
    evaluation: Dataset


def split(ds: Dataset, max_calibration: int, max_evaluation: int, seed: int = 0,
          streams: bool = False) -> DataSplit:
    """Disjoint calibration and evaluation subsets of one data set (deterministic shuffle).

    `streams`: the samples are consecutive chunks of streams (a stateful model's data), whose
    order must be kept: whole sequences go to one side (shuffled by sequence), and one single
    stream is cut in two, its first part for calibration."""
    n = len(ds)
    if n < 2:
        raise DataError("need at least 2 samples to hold some out for evaluation", value=n, origin=ds.origin,
                        hint="give more samples, or separate --calibration-data and --eval-data")
    if streams:
        if ds.sequence is not None and len(np.unique(ds.sequence)) > 1:
            ids = np.unique(ds.sequence)
            ids = ids[np.random.default_rng(seed).permutation(len(ids))]
            cal_ids = ids[:max(1, len(ids) // 2)]
            in_cal = np.isin(ds.sequence, cal_ids)
            cal, ev = np.flatnonzero(in_cal)[:max_calibration], np.flatnonzero(~in_cal)[:max_evaluation]
        else:
            n_cal = min(max_calibration, n // 2)
            cal, ev = np.arange(n_cal), np.arange(n_cal, min(n, n_cal + max_evaluation))
        return DataSplit(ds.subset(cal, f"{ds.origin} [calibration split]"),
                         ds.subset(ev, f"{ds.origin} [held-out evaluation split]"))
    idx = np.random.default_rng(seed).permutation(n)
    n_cal = min(max_calibration, n // 2)
    cal, ev = idx[:n_cal], idx[n_cal:n_cal + max_evaluation]
    return DataSplit(ds.subset(np.sort(cal), f"{ds.origin} [calibration split]"),
                     ds.subset(np.sort(ev), f"{ds.origin} [held-out evaluation split]"))


def from_function(ref: str, specs: list[TensorSpec], label_key: str, optional: frozenset[str] = frozenset(),
                  ignore: frozenset[str] = frozenset()) -> DataSplit:
    fn: Callable = import_object(ref, "recipe data.function")
    data = fn()
    if not isinstance(data, dict) or "calibration" not in data or "evaluation" not in data:
        raise DataError("dataset function must return {'calibration': {...}, 'evaluation': {...}}",
                        value=ref, origin="recipe data.function")
    return DataSplit(to_dataset(data["calibration"], specs, label_key, f"{ref} [calibration]", optional, ignore),
                     to_dataset(data["evaluation"], specs, label_key, f"{ref} [evaluation]", optional, ignore))
