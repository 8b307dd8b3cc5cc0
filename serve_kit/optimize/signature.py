"""A model's signature as optimize sees it: inputs and outputs with their batch axes, constant
inputs baked into the model, and state that feeds outputs back as the next call's inputs.

- Inference: the inputs of a torch source come from its forward() parameters and the data's
  arrays; outputs and their batch axes from probing the model at two batch sizes.
- Constants (`--constant sr=16000`): an ONNX source gets a baked copy (the input becomes an
  initializer, then constant folding, which removes an `If` branching on it); a torch or
  TorchScript source gets the argument bound (tensors, or int/float/bool/str for non-tensor
  forward() arguments). Either way the input leaves the served signature.
- State (`--state stateN=state`): data are consecutive chunks of streams, and every model (the
  reference and each variant, on its own state, as served) runs closed-loop over them:
  `Signature.run(fn, dataset)`. `Signature.complete(fn, dataset)` fills the state inputs with the
  values the reference really saw, so that calibration, latency and stored samples are realistic.
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import TensorSpec, datatype_of
from ..errors import ConversionError, DataError, InputError, UsageError
from .calibration import Dataset, take

EVAL_BATCH = 64
RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Parsing the command line's --constant and --state


def parse_constant(text: str, origin: str = "--constant") -> tuple[str, Any]:
    """`NAME=VALUE`: VALUE is a JSON number, bool or (nested) list, else taken as a string."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name or not value.strip():
        raise UsageError("constant is not NAME=VALUE", value=text, origin=origin,
                         hint="e.g. --constant sr=16000, --constant scale=[0.5,0.5], --constant mode=fast")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a string argument (forward(x, mode: str))
    if isinstance(parsed, dict) or parsed is None:
        raise UsageError("constant value must be a number, a bool, a string or a JSON list", value=text,
                         origin=origin)
    return name, parsed


def parse_constants(items: list[str], origin: str = "--constant") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, value = parse_constant(item, origin)
        if name in out:
            raise UsageError(f"constant {name!r} is given twice", value=item, origin=origin)
        out[name] = value
    return out


def parse_state(items: list[str], origin: str = "--state") -> dict[str, str]:
    """`OUTPUT=INPUT` pairs: the output feeds the named input at the next step."""
    out: dict[str, str] = {}
    for item in items:
        o, sep, i = (p.strip() for p in item.partition("="))
        if not sep or not o or not i:
            raise UsageError("state is not OUTPUT=INPUT", value=item, origin=origin,
                             hint="e.g. --state stateN=state (output stateN feeds input state at the next chunk)")
        if o in out:
            raise UsageError(f"output {o!r} is given twice", value=item, origin=origin)
        if i in out.values():
            raise UsageError(f"input {i!r} is fed by two outputs", value=item, origin=origin)
        out[o] = i
    return out


def constant_array(name: str, value: Any, spec: TensorSpec | None, origin: str = "--constant") -> np.ndarray:
    """The constant as an array: dtype from the input's spec when declared, else int64 for ints,
    float32 for floats, bool, or a string."""
    if spec is not None:
        try:
            arr = np.asarray(value, dtype=spec.dtype)
        except (TypeError, ValueError) as e:
            raise UsageError(f"constant {name!r} is not a {spec.datatype}: {e}", value=value, origin=origin,
                             hint=f"input {spec.describe()}") from None
        if arr.ndim != len(spec.shape) or any(d != -1 and d != g for d, g in zip(spec.shape, arr.shape)):
            raise UsageError(f"constant {name!r} has shape {list(arr.shape)}, input {spec.describe()} needs "
                             f"{spec.shape}", value=value, origin=origin,
                             hint="a scalar input takes a number; a tensor one a JSON list of its shape")
        return arr
    arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind in "bU":
        return arr
    raise UsageError(f"constant {name!r} has no clear type", value=value, origin=origin,
                     hint="give a number, a bool, a string or a JSON list of numbers")


# ---------------------------------------------------------------------------------------------
# The signature


@dataclass
class Signature:
    """The served signature (constants removed) and how to run a model over a data set."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    """Output name -> the input it feeds at the next step."""
    hidden_state: str | None = None
    """Set (to the evidence) when the model keeps state inside between calls: two identical calls
    answer differently (e.g. silero-vad's TorchScript file holds its recurrent state in
    attributes). Served, each request then continues whatever state the previous one left."""
    pristine: Callable[[], Any] | None = field(default=None, repr=False, compare=False)
    """With hidden_state: loads the module afresh (its state as shipped), so that the reference
    run and every variant's export start from the same state."""

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(s for s in self.outputs if s.name == name)

    @property
    def stateful(self) -> bool:
        return bool(self.state)

    @property
    def state_inputs(self) -> set[str]:
        return set(self.state.values())

    def batchable(self) -> bool:
        """Whether the server may batch requests on the first axis (every tensor batch-first)."""
        return all(t.batch_axis == 0 for t in [*self.inputs, *self.outputs])

    def served_max_batch(self, wanted: int) -> int:
        """config.yaml's max_batch_size: `wanted`, or 0 (served unbatched, full shapes) when a
        tensor has no batch axis or carries it elsewhere than first, or the model keeps state (also
        inside: requests of several clients batched together would share it)."""
        return wanted if self.batchable() and not self.stateful and not self.hidden_state else 0

    def describe(self) -> dict[str, Any]:
        return {"constants": {k: v.tolist() for k, v in self.constants.items()},
                **({"state": dict(self.state)} if self.state else {}),
                **({"hidden_state": self.hidden_state} if self.hidden_state else {})}

    # -- running ---------------------------------------------------------------------------------

    def run(self, fn: RunFn, ds: Dataset, batch_size: int = EVAL_BATCH,
            advance: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Outputs of `fn` over every sample of `ds`, each output along its own batch axis, in the
        samples' order. A stateful signature runs closed-loop (see `closed_loop`)."""
        if self.stateful:
            return self.closed_loop(fn, ds, advance=advance)[0]
        if self.hidden_state:
            # State kept inside: consecutive samples are consecutive requests of a stream, one at
            # a time as served (a batch would be read as parallel streams, or reset the state).
            batch_size = 1
        chunks: dict[str, list[np.ndarray]] = {}
        n = len(ds)
        for start in range(0, n, batch_size):
            out = fn(ds.slice(start, start + batch_size))
            for k, v in out.items():
                chunks.setdefault(k, []).append(np.asarray(v))
            if advance:
                advance(min(batch_size, n - start))
        return {k: self._join(k, v) for k, v in chunks.items()}

    def runner(self, fn: RunFn) -> Callable[[Dataset], dict[str, np.ndarray]]:
        """`fn` wrapped so that callers need not know about state: `runner(fn)(dataset)`."""
        return lambda ds, advance=None: self.run(fn, ds, advance=advance)

    def _join(self, name: str, parts: list[np.ndarray]) -> np.ndarray:
        axis = self._out_axis(name)
        if axis is None or len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=axis)

    def _out_axis(self, name: str) -> int | None:
        spec = next((s for s in self.outputs if s.name == name), None)
        return 0 if spec is None else spec.batch_axis

    def sequences(self, ds: Dataset) -> list[np.ndarray]:
        """Sample indices of each sequence, in stream order (one stream when no sequence ids)."""
        n = len(ds)
        if ds.sequence is None:
            return [np.arange(n)]
        ids, first = np.unique(ds.sequence, return_index=True)
        return [np.flatnonzero(ds.sequence == i) for i in ids[np.argsort(first)]]

    def initial_state(self, ds: Dataset, starts: np.ndarray) -> dict[str, np.ndarray]:
        """Each state input for the sequences starting at `starts`: the data's value at that
        sample, or zeros."""
        out = {}
        for name in self.state_inputs:
            spec = self.input(name)
            if name in ds.inputs:
                out[name] = take(ds.inputs[name], starts, spec.batch_axis)
                continue
            if any(d == -1 for i, d in enumerate(spec.shape) if i != spec.batch_axis):
                raise DataError(f"state input {spec.describe()} has variable dimensions besides its batch axis, "
                                f"so its initial value cannot be zeros", origin=ds.origin,
                                hint=f"give its initial value in the data as array {name!r}")
            shape = [len(starts) if i == spec.batch_axis else d for i, d in enumerate(spec.shape)]
            out[name] = np.zeros(shape, dtype=spec.dtype)
        return out

    def closed_loop(self, fn: RunFn, ds: Dataset, advance: Callable[[int], None] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run `fn` over `ds` as a user streams it: step t feeds chunk t of every sequence at once
        (batch = sequences still running), each state input taking the output that feeds it from
        step t-1 (at t = 0, `initial_state`). Returns (outputs, state inputs fed), both along their
        batch axes in the samples' order."""
        seqs = self.sequences(ds)
        n = len(ds)
        carry = self.initial_state(ds, np.array([s[0] for s in seqs]))
        fed = {k: [None] * n for k in carry}
        results: dict[str, list[Any]] = {}
        plain = {k: v for k, v in ds.inputs.items() if k not in carry}
        longest = max(len(s) for s in seqs)
        for t in range(longest):
            active = np.array([j for j, s in enumerate(seqs) if len(s) > t])
            rows = np.array([seqs[j][t] for j in active])
            batch = {k: take(v, rows, ds.axis(k)) for k, v in plain.items()}
            for k, v in carry.items():
                axis = self.input(k).batch_axis
                batch[k] = np.asarray(take(v, active, axis), order="C")
                for r, piece in zip(rows, np.split(batch[k], len(rows), axis=axis)):
                    fed[k][r] = piece
            out = fn(batch)
            missing = [o for o in self.state if o not in out]
            if missing:
                raise InputError(f"the model returned no output {missing} named in --state", value=sorted(out),
                                 origin="--state")
            for o, i in self.state.items():
                new = self._as_input_layout(o, i, np.asarray(out[o]), len(rows))
                axis = self.input(i).batch_axis
                where = [slice(None)] * carry[i].ndim
                where[axis] = active
                carry[i][tuple(where)] = new
            for k, v in out.items():
                v = np.asarray(v)
                axis = self._out_axis(k)
                slot = results.setdefault(k, [None] * n)
                if axis is None:
                    slot[rows[0]] = v
                    continue
                for r, piece in zip(rows, np.split(v, len(rows), axis=axis)):
                    slot[r] = piece
            if advance:
                advance(len(rows))
        outputs = {k: (np.concatenate(v, axis=self._out_axis(k)) if self._out_axis(k) is not None
                       else next(p for p in v if p is not None)) for k, v in results.items()}
        states = {k: np.concatenate(v, axis=self.input(k).batch_axis) for k, v in fed.items()}
        return outputs, states

    def _as_input_layout(self, out_name: str, in_name: str, value: np.ndarray, rows: int) -> np.ndarray:
        spec_in = self.input(in_name)
        out_axis = self._out_axis(out_name)
        if out_axis is not None and out_axis != spec_in.batch_axis:
            value = np.moveaxis(value, out_axis, spec_in.batch_axis)
        if value.ndim != len(spec_in.shape) or value.shape[spec_in.batch_axis] != rows:
            raise InputError(f"output {out_name!r} (shape {list(value.shape)} for {rows} sequence(s)) cannot feed "
                             f"state input {spec_in.describe()}", origin="--state",
                             hint="--state pairs an output with the input it becomes at the next step; "
                                  "their shapes must match")
        return value.astype(spec_in.dtype, copy=False)

    def complete(self, fn: RunFn, ds: Dataset, advance: Callable[[int], None] | None = None
                 ) -> tuple[Dataset, dict[str, np.ndarray]]:
        """(ds with every state input holding what `fn` really saw at each sample, closed-loop;
        fn's outputs). Stateless: (ds, outputs) unchanged."""
        if not self.stateful:
            return ds, self.run(fn, ds, advance=advance)
        outputs, states = self.closed_loop(fn, ds, advance=advance)
        inputs = {**ds.inputs, **states}
        axes = {**ds.axes, **{k: self.input(k).batch_axis for k in states}}
        done = Dataset({s.name: inputs[s.name] for s in self.inputs}, ds.labels, ds.origin, ds.synthetic,
                       list(ds.notes), axes, ds.sequence)
        return done, outputs

    def calibration_set(self, fn: RunFn, ds: Dataset) -> Dataset:
        """The calibration data with realistic state: what the reference saw along its run."""
        return self.complete(fn, ds)[0]

    def batch_first(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs with their batch axis moved first (for per-sample comparisons)."""
        out = {}
        for k, v in outputs.items():
            axis = self._out_axis(k)
            out[k] = np.moveaxis(v, axis, 0) if axis not in (None, 0) else v
        return out

    def head(self, arrays: dict[str, np.ndarray], n: int, specs: list[TensorSpec] | None = None
             ) -> dict[str, np.ndarray]:
        """The first n samples of named arrays (inputs or outputs), each along its own axis."""
        axes = {s.name: s.batch_axis for s in (specs or [*self.inputs, *self.outputs])}
        return {k: take(v, slice(0, n), axes.get(k, 0)) for k, v in arrays.items()}


def runner(fn: RunFn, sig: Signature) -> Callable[..., dict[str, np.ndarray]]:
    """`fn` (a model's `infer`) as `run(dataset, advance=None) -> outputs`, closed-loop when `sig`
    keeps state: the one call every part uses to run a model over data."""
    return sig.runner(fn)


def calibration_set(sig: Signature, fn: RunFn, ds: Dataset) -> Dataset:
    """Calibration data whose state inputs hold what `fn` (the reference) saw along its run."""
    return sig.calibration_set(fn, ds)


# ---------------------------------------------------------------------------------------------
# Inference and checks (from the source and the data)


def check_against_onnx(specs: list[TensorSpec], graph: list[TensorSpec], what: str, origin: str) -> None:
    by_name = {g.name: g for g in graph}
    names = [s.name for s in specs]
    if sorted(names) != sorted(by_name):
        raise InputError(f"{what} names {names} do not match the ONNX model's {what} {sorted(by_name)}",
                         origin=origin, hint=f"use the model's names, e.g. {graph[0].describe()}")
    for s in specs:
        g = by_name[s.name]
        if s.datatype != g.datatype or len(s.shape) != len(g.shape) or any(
                a != b and -1 not in (a, b) for a, b in zip(s.shape, g.shape)):
            raise InputError(f"{what} spec {s.describe()} does not match the ONNX model's {g.describe()}",
                             value=s.describe(), origin=origin, hint=f"the model declares {g.describe()}")


def forward_parameters(module) -> list[tuple[str, str | None]]:
    """(name, type) of forward()'s parameters; type is `Tensor`, `int`, `float`, `bool`, `str`
    or None when unknown (an eager module without annotation)."""
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript: the compiled schema knows the types
        return [(a.name, str(a.type)) for a in schema.arguments if a.name != "self"]
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    out = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        name = ann if isinstance(ann, str) else getattr(ann, "__name__", None)
        out.append((p.name, name if name in ("Tensor", "int", "float", "bool", "str") else None))
    return out


def infer_inputs(module, kind: str, ref: str, arrays: dict[str, np.ndarray] | None,
                 constants: dict[str, Any]) -> list[TensorSpec]:
    """Input specs of a torch source from its forward() parameters and the data's arrays."""
    if arrays is None:
        raise UsageError("the input signature of a PyTorch model is needed", value=ref, origin="--model",
                         hint="give --input NAME:DATATYPE:SHAPE (e.g. input:FP32:-1x1x8x8), or real data to infer it")
    params = [p for p, _ in forward_parameters(module)]
    names = [n for n in arrays if n in params] if params else list(arrays)
    free = [p for p in params if p not in constants]
    if not names and len(arrays) == 1 and len(free) >= 1:
        names = list(arrays)
    if not names:
        raise UsageError("cannot infer the input signature: the data's arrays do not name forward() parameters",
                         value=sorted(arrays), origin="--calibration-data",
                         hint=f"forward() takes {params}; give --input for each, or name the arrays so")
    specs = []
    for n in names:
        a = arrays[n]
        if a.ndim == 0:
            specs.append(TensorSpec(name=n, datatype=datatype_of(a.dtype), shape=[]))
        else:
            specs.append(TensorSpec(name=n, datatype=datatype_of(a.dtype), shape=[-1, *a.shape[1:]]))
    return specs


def missing_arguments(module, kind: str, inputs: list[TensorSpec], constants: dict[str, Any]) -> list[str]:
    """forward() parameters without default that neither an input nor a constant gives."""
    given = {s.name for s in inputs} | set(constants)
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments if a.name != "self" and a.name not in given
                and not a.has_default_value()]
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(inputs) + len(constants) >= len(positional) and not (set(constants) - {p.name for p in positional}):
        # Unnamed data (arr_0) feed parameters by position.
        return [p.name for p in positional[len(inputs) + len(constants):] if p.default is p.empty]
    return [p.name for p in positional if p.name not in given and p.default is p.empty]


def probe_outputs(fn: RunFn, sig: Signature, ds: Dataset, declared: list[TensorSpec] | None,
                  graph: list[TensorSpec] | None) -> list[TensorSpec]:
    """Output specs, each with its batch axis found by running one and two copies of a sample:
    the dimension that follows the batch size. Declared outputs keep their names and shapes;
    an ONNX graph's outputs their variable dimensions."""
    one = probe_batch(sig, ds, 1)
    out1 = _call(fn, one, sig)
    batched_inputs = any(s.batch_axis is not None for s in sig.inputs)
    out2 = _call(fn, probe_batch(sig, ds, 2), sig) if batched_inputs else out1
    base = declared or graph
    if base is not None and len(base) != len(out1):
        raise InputError(f"model returns {len(out1)} outputs but {len(base)} are declared",
                         value=[o.name for o in base], origin="--output / recipe outputs")
    specs = []
    for i, (name, a1) in enumerate(out1.items()):
        a1, a2 = np.asarray(a1), np.asarray(out2[name])
        changed = [d for d in range(min(a1.ndim, a2.ndim)) if a1.shape[d] != a2.shape[d]]
        axis = changed[0] if a1.ndim == a2.ndim and len(changed) == 1 and a2.shape[changed[0]] == 2 * a1.shape[
            changed[0]] else None
        if base is not None:
            spec = base[i]
            if declared is not None:
                if a1.ndim != len(spec.shape) or any(w != -1 and w != g for d, (w, g) in
                                                     enumerate(zip(spec.shape, a1.shape)) if d != spec.batch_axis):
                    raise InputError(f"output {spec.describe()} does not match what the model returns (shape "
                                     f"{list(a1.shape)} for a batch of 1)", value=spec.describe(),
                                     origin="--output / recipe outputs")
                specs.append(spec)
                continue
            shape = list(spec.shape) if len(spec.shape) == a1.ndim else list(a1.shape)
            if axis is not None:
                shape[axis] = -1
            specs.append(TensorSpec(name=spec.name, datatype=spec.datatype, shape=shape, batch_axis=axis))
            continue
        shape = [-1 if d == axis else s for d, s in enumerate(a1.shape)]
        specs.append(TensorSpec(name=name, datatype=datatype_of(a1.dtype), shape=shape, batch_axis=axis))
    return specs


def hidden_state(fn: RunFn, sig: Signature, ds: Dataset) -> str | None:
    """The evidence that a model keeps state between calls, or None: the same input, sent three
    times in a row, must get the same answer the second and third time (the first may follow a
    call of another batch size, which some stateful modules take as a reset)."""
    batch = probe_batch(sig, ds, 1)
    _call(fn, batch, sig)
    a, b = _call(fn, batch, sig), _call(fn, batch, sig)
    for name in a:
        x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-5, atol=1e-6):
            diff = float(np.max(np.abs(x - y))) if x.shape == y.shape else float("inf")
            return (f"two identical calls answered differently (output {name!r}, max difference {diff:.3g}): the "
                    "model keeps state inside between calls; served, each request continues the state the "
                    "previous request left, whichever client sent it; variants were validated in the reference's "
                    "call order")
    return None


def probe_batch(sig: Signature, ds: Dataset, n: int) -> dict[str, np.ndarray]:
    """n copies of the first sample (state inputs from the data or zeros)."""
    idx = np.zeros(n, dtype=np.int64)
    batch = {k: np.asarray(take(v, idx, ds.axis(k)), order="C") for k, v in ds.inputs.items()}
    for k, v in sig.initial_state(ds, idx).items():
        batch.setdefault(k, np.asarray(v, order="C"))
    return batch


def _call(fn: RunFn, batch: dict[str, np.ndarray], sig: Signature) -> dict[str, np.ndarray]:
    from ..errors import ServeKitError

    try:
        return fn(batch)
    except ServeKitError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        doubles = [k for k, v in batch.items() if v.dtype == np.float64]
        if doubles and re.search(r"[Dd]ouble|float64|dtype|scalar type", str(e)):
            raise DataError(f"the model rejects float64 data for {doubles}: {first}", value=doubles,
                            origin="--calibration-data",
                            hint="save the arrays as float32: arr.astype(np.float32) (or declare --input "
                                 "NAME:FP64:... if the model really takes doubles)") from None
        raise InputError(f"the model fails on inputs of the declared signature: {first}",
                         value=", ".join(s.describe() for s in sig.inputs), origin="--input / recipe inputs",
                         hint="check names, datatypes, shapes and batch axes (@AXIS) against the model; "
                              "constant arguments go in --constant NAME=VALUE") from None


def check_state(state: dict[str, str], inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    ins, outs = {s.name: s for s in inputs}, {s.name: s for s in outputs}
    for o, i in state.items():
        if o not in outs:
            raise UsageError(f"--state names output {o!r}, which the model does not have", value=f"{o}={i}",
                             origin="--state", hint=f"outputs: {sorted(outs)}")
        if i not in ins:
            raise UsageError(f"--state names input {i!r}, which the model does not have", value=f"{o}={i}",
                             origin="--state", hint=f"inputs: {sorted(ins)}")
        a, b = outs[o], ins[i]
        if b.batch_axis is None:
            raise UsageError(f"state input {b.describe()} has no batch axis; it needs one (one state per stream)",
                             origin="--state", hint=f"declare it, e.g. --input {b.name}:{b.datatype}:...@AXIS")
        if a.datatype != b.datatype or len(a.shape) != len(b.shape):
            raise UsageError(f"output {a.describe()} cannot feed input {b.describe()} (datatype or rank differ)",
                             value=f"{o}={i}", origin="--state")


# ---------------------------------------------------------------------------------------------
# Constants: bake (ONNX) or bind (torch)


def bake_onnx(path: Path, constants: dict[str, np.ndarray], workdir: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of the ONNX model with each constant input turned into an initializer, then
    constant-folded (onnxscript's optimizer when installed, else ONNX Runtime's basic level), so
    that branches on it (`If`) disappear. Returns (path, details)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    count_if = _count_ops(model, "If")
    for name, value in constants.items():
        inp = next(i for i in graph.input if i.name == name)
        graph.input.remove(inp)
        init = next((i for i in graph.initializer if i.name == name), None)
        if init is not None:  # an input with a default: the constant replaces it
            graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    workdir.mkdir(parents=True, exist_ok=True)
    baked = workdir / "source-baked.onnx"
    details: dict[str, Any] = {}
    try:
        from onnxscript import optimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = optimizer.optimize(model)
        onnx.checker.check_model(folded)
        onnx.save(folded, str(baked))
        details["folding"] = "onnxscript.optimizer"
    except ImportError:
        plain = workdir / "source-constants.onnx"
        onnx.save(model, str(plain))
        _ort_fold(plain, baked)
        details["folding"] = "onnxruntime basic"
    except Exception as e:  # the optimizer failed on this graph: ONNX Runtime's folding instead
        plain = workdir / "source-constants.onnx"
        onnx.save(model, str(plain))
        _ort_fold(plain, baked)
        details["folding"] = "onnxruntime basic"
        details["onnxscript_failed"] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    details["if_nodes"] = {"before": count_if, "after": _count_ops(onnx.load(str(baked)), "If")}
    return baked, details


def _ort_fold(src: Path, dst: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ConversionError(f"ONNX Runtime cannot fold the model's constants: {str(e).strip().splitlines()[0][:300]}",
                              value=str(src)) from None


def _count_ops(model, op: str) -> int:
    from .export.onnx import _graphs

    return sum(1 for g in _graphs(model.graph) for n in g.node if n.op_type == op)


def bind(module, constants: dict[str, Any], inputs: list[str]):
    """An nn.Module whose forward(*inputs) calls `module` with the constants bound, in the order of
    module.forward's parameters. Non-tensor parameters (int, float, bool, str, as TorchScript's
    schema or the annotations say; 0-d constants of an unannotated eager forward) get Python
    values; others tensors. Tracing it bakes the constants in."""
    import torch

    params = forward_parameters(module)
    order = [p for p, _ in params]
    types = dict(params)
    values: dict[str, Any] = {}
    for name, arr in constants.items():
        arr = np.asarray(arr)
        t = types.get(name)
        if t in ("int", "float", "bool", "str") or (t is None and arr.ndim == 0):
            py = arr.item() if arr.ndim == 0 else arr.tolist()
            values[name] = {"int": int, "float": float, "bool": bool, "str": str}.get(t, lambda v: v)(py) \
                if arr.ndim == 0 else py
        else:
            values[name] = torch.from_numpy(np.asarray(arr, order="C"))
    unknown = [n for n in constants if n not in order]
    if unknown and order:
        raise UsageError(f"--constant names {unknown}, which forward() does not take", value=unknown,
                         origin="--constant", hint=f"forward() takes {order}")
    # Positions of forward()'s parameters filled by the free inputs, in signature order.
    free = [p for p in order if p not in values]
    slots = free[:len(inputs)] if not set(inputs) <= set(order) else [n for n in inputs]
    return _Bound(module, order, values, slots)


def _Bound(inner, order: list[str], values: dict[str, Any], slots: list[str]):
    import torch

    class Bound(torch.nn.Module):
        """forward(*inputs) -> inner(...) with constant arguments bound."""

        def __init__(self):
            super().__init__()
            self.inner = inner
            self._order, self._values, self._slots = order, values, slots

        def forward(self, *args):
            given = dict(zip(self._slots, args))
            call = []
            for name in self._order:
                if name in self._values:
                    call.append(self._values[name])
                elif name in given:
                    call.append(given[name])
                else:
                    break  # a parameter with a default value: left to the default
            return self.inner(*call)

    return Bound().eval()


# ---------------------------------------------------------------------------------------------
# The pipeline's signature step


def resolve(job, source, load_data: Callable[..., tuple[Any, dict | None]]) -> tuple[Signature, Any]:
    """Settle the served signature of `source` for `job` (its inputs, outputs, constants and
    state) and load the data split for it. Constants are applied to `source` (an ONNX source's
    model becomes the baked copy; a torch one's the bound module), and `source.signature`,
    `source.inputs` and `source.outputs` are set: every target then starts from the baked source.

    `load_data(specs, optional=..., streams=...)` is the pipeline's data loader; it returns
    (split, None), or (None, raw arrays) when specs is None (the signature is then inferred)."""
    state = dict(getattr(job, "state", None) or {})
    raw_constants = dict(getattr(job, "constants", None) or {})
    declared = {s.name: s for s in job.inputs or []}
    graph_inputs = {s.name: s for s in source.inputs or []}
    constants: dict[str, np.ndarray] = {}
    for name, value in raw_constants.items():
        spec = declared.get(name) or graph_inputs.get(name)
        if source.kind == "onnx" and name not in graph_inputs:
            raise UsageError(f"--constant names {name!r}, which is no input of the ONNX model", value=name,
                             origin="--constant", hint=f"inputs: {sorted(graph_inputs)}")
        constants[name] = constant_array(name, value, spec)
    declared_list = list(job.inputs or [])
    if source.kind == "onnx" and declared_list:
        # Inputs not declared keep the graph's spec: `--input sr:INT64:scalar` alone is enough.
        unknown = [s for s in declared_list if s.name not in graph_inputs]
        check_against_onnx(declared_list, [graph_inputs[s.name] for s in declared_list] if not unknown
                           else source.inputs, "input", "--input")
        declared_list = [declared.get(g.name, g) for g in source.inputs]
    served_declared = [s for s in declared_list if s.name not in constants] or None

    if constants and source.kind == "onnx":
        import shutil
        import tempfile
        import weakref

        tmp = Path(tempfile.mkdtemp(prefix="serve-kit-constants-"))
        weakref.finalize(source, shutil.rmtree, str(tmp), True)
        original = source.model
        baked, details = bake_onnx(Path(source.model), constants, tmp)
        source.info["constants"] = {k: v.tolist() for k, v in constants.items()}
        source.info["baked"] = details
        source.model, source._ort = baked, None
        source._unbaked = original  # type: ignore[attr-defined]
        # What the baked graph declares (constant folding may have refined shapes; keep the source's).
        source.inputs = [s for s in source.inputs if s.name not in constants]

    inputs = served_declared or ([s for s in source.inputs] if source.inputs else None)
    # State inputs may be absent from the data (they start from zeros); split keeps streams whole.
    opts = {"optional": frozenset(state.values()), "streams": bool(state), "ignore": frozenset(constants)}
    split, raw = load_data(inputs, **opts)
    if inputs is None:
        inputs = infer_inputs(source.model, source.kind, source.ref, raw, constants)
        split, _ = load_data(inputs, **opts)
    if source.kind in ("torch", "torchscript"):
        missing = missing_arguments(source.model, source.kind, inputs, constants)
        if missing:
            name = missing[0]
            kind = dict(forward_parameters(source.model)).get(name)
            example = {"int": "16000", "float": "0.5", "bool": "true", "str": "fast"}.get(kind or "", "16000")
            raise UsageError(f"forward() of the model needs argument(s) {missing}, which neither the inputs "
                             f"{[s.name for s in inputs]} nor a constant give", value=source.ref, origin="--model",
                             hint=f"bind it with --constant {name}=VALUE (e.g. --constant {name}={example}), or "
                                  f"give it per call with --input {name}:DATATYPE:SHAPE and data")
        if constants:
            source.model = bind(source.model, constants, [s.name for s in inputs])
            source._types = None  # the bound module takes tensors (or what its inputs are) only
            source.info["constants"] = {k: v.tolist() for k, v in constants.items()}
    source.inputs = inputs
    sig = Signature(list(inputs), [], constants, state)
    for o, i in state.items():
        if i not in {s.name for s in inputs}:
            raise UsageError(f"--state names input {i!r}, which the model does not have", value=f"{o}={i}",
                             origin="--state", hint=f"inputs: {[s.name for s in inputs]}")
    probe_ds = split.evaluation
    graph_outputs = source.outputs if source.kind == "onnx" else None
    sig.outputs = probe_outputs(source.run, sig, probe_ds, job.outputs, graph_outputs)
    check_state(state, sig.inputs, sig.outputs)
    if source.kind in ("torch", "torchscript"):
        sig.hidden_state = hidden_state(source.run, sig, probe_ds)
        if sig.hidden_state:
            names = [s.name for s in inputs]

            def pristine(spec=job.source):
                """The module as loaded, before any call changed the state it keeps inside."""
                from .source import load_source

                module = load_source(spec).model
                return bind(module, constants, names) if constants else module
            sig.pristine = pristine
    if constants and source.kind == "onnx":
        _check_baked(source, sig, probe_ds)
    source.outputs = sig.outputs
    source.signature = sig
    if state:
        source.info["state"] = dict(state)  # in the report's and the manifest's `source`
    return sig, split


def _check_baked(source, sig: Signature, ds: Dataset) -> None:
    """The baked model must compute what the original does with the constants fed."""
    from ..runtime.backends import load_backend

    batch = probe_batch(sig, ds, 2)
    names = [o.name for o in sig.outputs]
    original = load_backend("onnxruntime", Path(source._unbaked), output_names=names)
    want = original.infer({**batch, **sig.constants})
    got = source.run(batch)
    for k in names:
        w, g = np.asarray(want[k], np.float64), np.asarray(got[k], np.float64)
        if w.shape != g.shape or not np.allclose(w, g, rtol=1e-4, atol=1e-5):
            raise ConversionError(f"baking the constants {sorted(sig.constants)} into the ONNX model changed "
                                  f"output {k!r}", value=str(source.ref),
                                  hint="feed the input per call instead (--input, and the value in the data)")
