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


@dataclass
class Dataset:
    """Batch-first named input arrays (all of one length), optional labels, and their origin."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    origin: str = ""
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def sha256(self) -> str:
        h = hashlib.sha256()
        items = sorted(self.inputs.items())
        if self.labels is not None:
            items.append(("__labels__", self.labels))
        for name, arr in items:
            arr = np.ascontiguousarray(arr)
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}

    def subset(self, index: np.ndarray, origin: str | None = None) -> "Dataset":
        return Dataset({k: v[index] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[index],
                       origin or self.origin, self.synthetic, list(self.notes))

    def tiled(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of exactly `batch_size` real samples (repeating them when there are fewer)."""
        idx = np.arange(batch_size) % len(self)
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.inputs.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "samples": len(self),
            "sha256": self.sha256(),
            "synthetic": self.synthetic,
            "labels": self.labels is not None,
            "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in self.inputs.items()},
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
            if arr.ndim == len(sole.shape) - 1:  # one sample: give it a batch dimension
                arr = arr[None]
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
    arrays = {}
    for k, chunks in parts.items():
        try:
            arrays[k] = np.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]
        except ValueError as e:
            raise DataError(f"arrays named {k!r} in {path} do not stack: {e}", value=str(path)) from None
    return arrays, str(path)


def to_dataset(arrays: dict[str, Any], specs: list[TensorSpec], label_key: str, origin: str) -> Dataset:
    """Check named arrays against the input signature and build a Dataset.

    Every problem names the array, where it came from, what the model expects and how to fix it.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    labels = arrays.pop(label_key, None)
    if len(specs) == 1 and specs[0].name not in arrays and len(arrays) == 1:
        # One input, one array: its name does not matter (e.g. np.savez(f, x) stores "arr_0").
        arrays = {specs[0].name: next(iter(arrays.values()))}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(f"data have no array for model input(s) {missing}", value=sorted(arrays), origin=origin,
                        hint=f"name the arrays after the model's inputs {[s.name for s in specs]}"
                             f" (labels go in {label_key!r})")
    extra = [k for k in arrays if k not in {s.name for s in specs}]
    if extra:
        raise DataError(f"data hold arrays that are no model input: {extra}", origin=origin,
                        hint=f"the model's inputs are {[s.name for s in specs]}; labels go in {label_key!r}")
    n = None
    for s in specs:
        arr = arrays[s.name]
        if arr.dtype != s.dtype:
            raise DataError(f"array {s.name!r} has dtype {arr.dtype}, but model input {s.name!r} is "
                            f"{s.datatype} ({s.dtype})", value=str(arr.dtype), origin=origin,
                            hint=f"save it as {s.dtype}: arr.astype(np.{s.dtype})")
        if arr.ndim != len(s.shape):
            raise DataError(f"array {s.name!r} has shape {list(arr.shape)} (rank {arr.ndim}), but model input "
                            f"{s.describe()} has rank {len(s.shape)}", value=list(arr.shape), origin=origin,
                            hint="arrays are batch-first: (samples, *sample_shape)")
        for i, (got, want) in enumerate(zip(arr.shape[1:], s.shape[1:]), start=1):
            if want != -1 and got != want:
                raise DataError(f"array {s.name!r} has shape {list(arr.shape)}, but model input "
                                f"{s.describe()} needs size {want} in dimension {i}", value=list(arr.shape),
                                origin=origin, hint="arrays are batch-first: (samples, *sample_shape)")
        if n is None:
            n = len(arr)
        elif len(arr) != n:
            raise DataError(f"arrays have different sample counts ({n} and {len(arr)} for {s.name!r})",
                            origin=origin)
    if not n:
        raise DataError("data hold no samples", origin=origin)
    if labels is not None and (labels.ndim == 0 or len(labels) != n):
        got = "a single value" if labels.ndim == 0 else f"{len(labels)} entries"
        raise DataError(f"{label_key!r} has {got} for {n} samples", origin=origin, hint="one label per sample")
    return Dataset({s.name: np.ascontiguousarray(arrays[s.name]) for s in specs}, labels, origin)


def synthetic(specs: list[TensorSpec], samples: int, seed: int = 0) -> Dataset:
    """Random data of the signature's shape. Only on explicit request; always labelled."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for s in specs:
        shape = [samples] + [SYNTHETIC_VARIABLE_DIM if d == -1 else d for d in s.shape[1:]]
        if s.dtype.kind == "f":
            arrays[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind in "iu":
            arrays[s.name] = rng.integers(0, 100, size=shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            arrays[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise DataError(f"cannot make synthetic data for {s.describe()}", value=s.datatype)
    return Dataset(arrays, None, f"synthetic (seed {seed})", synthetic=True,
                   notes=["SYNTHETIC random data: accuracy figures say nothing about real inputs"])


@dataclass
class DataSplit:
    calibration: Dataset
    evaluation: Dataset


def split(ds: Dataset, max_calibration: int, max_evaluation: int, seed: int = 0) -> DataSplit:
    """Disjoint calibration and evaluation subsets of one data set (deterministic shuffle)."""
    n = len(ds)
    if n < 2:
        raise DataError("need at least 2 samples to hold some out for evaluation", value=n, origin=ds.origin,
                        hint="give more samples, or separate --calibration-data and --eval-data")
    idx = np.random.default_rng(seed).permutation(n)
    n_cal = min(max_calibration, n // 2)
    cal, ev = idx[:n_cal], idx[n_cal:n_cal + max_evaluation]
    return DataSplit(ds.subset(np.sort(cal), f"{ds.origin} [calibration split]"),
                     ds.subset(np.sort(ev), f"{ds.origin} [held-out evaluation split]"))


def from_function(ref: str, specs: list[TensorSpec], label_key: str) -> DataSplit:
    fn: Callable = import_object(ref, "recipe data.function")
    data = fn()
    if not isinstance(data, dict) or "calibration" not in data or "evaluation" not in data:
        raise DataError("dataset function must return {'calibration': {...}, 'evaluation': {...}}",
                        value=ref, origin="recipe data.function")
    return DataSplit(to_dataset(data["calibration"], specs, label_key, f"{ref} [calibration]"),
                     to_dataset(data["evaluation"], specs, label_key, f"{ref} [evaluation]"))


class ReaderAdapter:
    """ONNX Runtime's CalibrationDataReader protocol over a Dataset, in small batches."""

    def __init__(self, ds: Dataset, batch_size: int = 16, input_names: list[str] | None = None,
                 equal_batches: bool = False):
        self.ds, self.batch_size, self.names = ds, min(batch_size, len(ds)), input_names
        # ORT's entropy/percentile calibrators stack per-batch histograms and fail on a short last
        # batch ("inhomogeneous shape"); they get equal batches and the remainder is dropped.
        self.limit = len(ds) - len(ds) % self.batch_size if equal_batches else len(ds)
        self.rewind()

    def rewind(self) -> None:
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.limit:
            return None
        batch = self.ds.slice(self._pos, min(self._pos + self.batch_size, self.limit))
        self._pos += self.batch_size
        if self.names is not None:
            batch = {k: v for k, v in batch.items() if k in self.names}
        return batch

    def __iter__(self):
        # qdq_loss_debug.collect_activations iterates instead of calling get_next
        self.rewind()
        while (batch := self.get_next()) is not None:
            yield batch

    def __len__(self) -> int:
        return -(-self.limit // self.batch_size)
