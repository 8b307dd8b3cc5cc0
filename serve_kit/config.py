"""Typed configuration: a model's config.yaml and optimize recipes.

config.yaml is the source of truth for how a model in a repository is served. Field names follow
Triton's model configuration wherever Triton has the same concept, so that users already know them
and so that a Triton config.pbtxt can be generated from it. Every model is validated when built;
a validation failure becomes a ConfigError that names the file and the field path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, UsageError

CONFIG_FORMAT = 1

# Open Inference Protocol (KServe v2) datatypes and their numpy equivalents.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]


def numpy_dtype(datatype: str) -> np.dtype:
    return np.dtype(DATATYPES[datatype])


def datatype_of(dtype: np.dtype) -> str:
    """The Open Inference Protocol datatype of a numpy dtype."""
    name = np.dtype(dtype).name
    for dt, np_name in DATATYPES.items():
        if np_name == name:
            return dt
    raise ConfigError(f"numpy dtype {name} has no Open Inference Protocol datatype", value=name,
                      hint="use one of " + ", ".join(DATATYPES.values()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TensorSpec(_Strict):
    """One input or output tensor of a model."""

    name: str = Field(min_length=1)
    """Tensor name, as the model and the protocol know it."""
    datatype: Datatype
    """Open Inference Protocol datatype (FP32, INT64, ...)."""
    shape: list[int]
    """Full shape including the batch dimension (-1 at `batch_axis`) when the model batches;
    -1 = variable; [] = a scalar (rank 0)."""
    batch_axis: int | None = 0
    """Which dimension of `shape` counts samples (state tensors of recurrent models often carry
    theirs on axis 1, e.g. [2, -1, 128]); None = the tensor has no batch axis (a scalar or a
    fixed tensor, fed whole to every call and never split into samples)."""

    @model_validator(mode="before")
    @classmethod
    def _default_axis(cls, data: Any) -> Any:
        # Unsaid, the batch axis is the first dimension when that one is variable; a scalar or a
        # tensor whose first dimension is fixed has none (config.yaml files of unbatched models,
        # written before batch_axis existed, keep loading as they were).
        if isinstance(data, dict) and data.get("batch_axis", ...) is ... and isinstance(data.get("shape"), list):
            shape = data["shape"]
            if not shape or shape[0] != -1:
                data = {**data, "batch_axis": None}
        return data

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        for d in v:
            if d < -1 or d == 0:
                raise ValueError(f"dimension {d} is invalid: use a positive size or -1 for variable")
        return v

    @model_validator(mode="after")
    def _axis(self) -> "TensorSpec":
        a = self.batch_axis
        if a is not None:
            if not 0 <= a < len(self.shape):
                raise ValueError(f"batch_axis {a} is not a dimension of shape {self.shape} (rank "
                                 f"{len(self.shape)}); use @none for a tensor without batch axis")
            if self.shape[a] != -1:
                raise ValueError(f"dimension {a} of shape {self.shape} is the batch axis and must be -1 "
                                 f"(variable); use @none for a tensor fed whole")
        return self

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.datatype)

    @property
    def batched(self) -> bool:
        return self.batch_axis is not None

    def sample_shape(self) -> list[int]:
        """Shape without the batch dimension (the whole shape when there is none)."""
        if self.batch_axis is None:
            return list(self.shape)
        return self.shape[:self.batch_axis] + self.shape[self.batch_axis + 1:]

    def describe(self) -> str:
        """The text `parse` reads back: `name:DATATYPE:SHAPE[@AXIS|@none]`."""
        shape = "x".join(str(d) for d in self.shape) if self.shape else "scalar"
        if self.batch_axis is None:
            axis = "@none" if self.shape and self.shape[0] == -1 else ""
        else:
            axis = "" if self.batch_axis == 0 else f"@{self.batch_axis}"
        return f"{self.name}:{self.datatype}:{shape}{axis}"

    @classmethod
    def parse(cls, text: str, origin: str = "--input") -> "TensorSpec":
        """Parse `name:DATATYPE:SHAPE[@AXIS]`: `input:FP32:-1x1x8x8` (batch first),
        `state:FP32:2x-1x128@1` (batch on axis 1), `x:FP32:3x4@none` (no batch axis, fed whole),
        `sr:INT64:scalar` (rank 0)."""
        m = re.fullmatch(r"([^:]+):([A-Za-z0-9]+):(scalar|-?\d+(?:x-?\d+)*)(?:@(none|\d+))?",
                         text.strip(), flags=re.IGNORECASE)
        if not m:
            raise UsageError("tensor spec is not NAME:DATATYPE:SHAPE[@AXIS]", value=text, origin=origin,
                             hint="e.g. input:FP32:-1x1x8x8 (-1 marks a variable dimension, the first is the "
                                  "batch), state:FP32:2x-1x128@1 (batch on axis 1), x:FP32:3x4@none (no batch "
                                  "axis), sr:INT64:scalar (rank 0)")
        name, dt = m.group(1), m.group(2).upper()
        shape = [] if m.group(3).lower() == "scalar" else [int(d) for d in m.group(3).split("x")]
        data: dict[str, Any] = {"name": name, "datatype": dt, "shape": shape}
        if m.group(4) is not None:
            data["batch_axis"] = None if m.group(4).lower() == "none" else int(m.group(4))
        try:
            return cls(**data)
        except ValidationError as e:
            hint = "datatypes: " + ", ".join(DATATYPES)
            if "batch" in str(e):
                hint = "the batch axis (@AXIS, default 0) must be a -1 dimension; @none = no batch axis"
            raise UsageError(f"tensor spec {text!r} is invalid: {_first_error(e)}", origin=origin,
                             hint=hint) from None


class Padding(_Strict):
    """Bucketed padding (serve-kit's extension): requests whose sequence lengths differ are batched
    together by padding the shorter ones, which is only correct for a model that ignores padded
    positions because a mask input says which positions are real (BERT's attention_mask).

    Without it, requests whose variable dimensions differ are never batched together. With it, a
    request's length is rounded up to a bucket; requests of one bucket form batches, each input
    padded (with its pad value) to the longest of the batch, never past the bucket, and outputs
    listed in `outputs` are cut back to each request's own length. Lengths above the largest
    bucket are batched only with requests of exactly their length."""

    mask_input: str
    """The input whose zeros mark padded positions (e.g. attention_mask). Required: declaring it
    is what says padding is safe for this model."""
    inputs: dict[str, int] = Field(min_length=1)
    """Input name -> the axis that is padded, counted in the full shape (the batch is axis 0).
    Must include mask_input."""
    buckets: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256, 512], min_length=1)
    """Increasing lengths that requests are grouped by."""
    pad_values: dict[str, float] = Field(default_factory=dict)
    """Pad value per input; 0 for inputs not named (token id 0 is BERT's [PAD], mask 0 = padded)."""
    outputs: dict[str, int] = Field(default_factory=dict)
    """Output name -> the axis that follows the padded length and is cut back per request (e.g.
    a per-token output). Outputs not named must not depend on the padded length (pooled ones)."""

    @model_validator(mode="after")
    def _check(self) -> "Padding":
        if self.mask_input not in self.inputs:
            raise ValueError(f"mask_input {self.mask_input!r} must be one of the padded inputs "
                             f"{sorted(self.inputs)}")
        if any(b < 1 for b in self.buckets) or self.buckets != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be positive and strictly increasing, got {self.buckets}")
        unknown = sorted(set(self.pad_values) - set(self.inputs))
        if unknown:
            raise ValueError(f"pad_values names inputs that are not padded: {unknown}")
        return self


class DynamicBatching(_Strict):
    """Server-side dynamic batching (Triton's `dynamic_batching`)."""

    max_queue_delay_microseconds: int = Field(default=100, ge=0)
    """How long a request may wait for others to form a batch (at most; see adaptive_delay)."""
    adaptive_delay: bool = True
    """serve-kit's extension (not in Triton): wait for a fuller batch only while requests arrive
    at least one per two max_queue_delays on average (a moving average of the gaps between arrivals),
    so that a request that comes alone runs at once instead of waiting for company that will not
    come. false: Triton's behaviour, every batch short of its size waits out the delay."""
    preferred_batch_size: list[int] = Field(default_factory=list)
    """Batch sizes the scheduler tries to form (e.g. sizes the backend is fastest at)."""
    max_queue_size: int = Field(default=256, ge=0)
    """Requests waiting beyond this are rejected at once (HTTP 503); 0 = unbounded."""
    default_timeout_microseconds: int = Field(default=0, ge=0)
    """Per-request timeout when the request sets none; 0 = none. A request may only shorten it.
    Past it a queued request is answered 504. Independently, the server's queue-time bound
    (`serve-kit serve --max-queue-ms`, 2 s by default) sheds a request that waited longer with 503 +
    Retry-After; whichever comes first answers."""
    priority_levels: int = Field(default=0, ge=0)
    """Number of priority levels (0 = priorities off); 1 is the highest."""
    default_priority_level: int = Field(default=0, ge=0)
    """Priority of a request that names none."""
    padding: Padding | None = None
    """Bucketed padding of variable-length inputs (see Padding); None = lengths never mixed."""


class InstanceGroup(_Strict):
    count: int = Field(default=1, ge=1)
    """Parallel instances (executors) of the model."""
    kind: Literal["CPU", "GPU", "AUTO"] = "AUTO"


class VersionPolicy(_Strict):
    """Which versions to serve (Triton's `version_policy`): the latest N, all, or specific ones."""

    latest: int | None = Field(default=1, ge=1)
    all: bool = False
    specific: list[int] | None = None

    def select(self, numbers: list[int]) -> list[int]:
        """The versions to serve out of `numbers` (those present, ascending). `specific` ones are
        returned even when absent: the caller reports those as missing."""
        if self.specific:
            return sorted(set(self.specific))
        if self.all:
            return list(numbers)
        return numbers[-(self.latest or 1):]


class Warmup(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    """Batch sizes to run before the model is reported ready."""
    source: Literal["samples", "zeros"] = "samples"
    """`samples`: the version's stored evaluation samples; `zeros`: zero-filled tensors."""


_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class RouteTarget(_Strict):
    """One model version a route sends traffic to."""

    model: str = Field(pattern=_MODEL_NAME)
    """A model of the repository (the endpoint's own, or another with the same signature)."""
    version: int | None = Field(default=None, ge=1)
    """The version; None = that model's latest serving version, resolved per request."""
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """Relative share of the split (share = weight / sum of the weights)."""

    def label(self) -> str:
        return f"{self.model}:{self.version if self.version is not None else 'latest'}"


class StickyKey(_Strict):
    """Where a request's assignment key comes from: the same key always lands on the same target."""

    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", max_length=128)
    """An HTTP header (gRPC: the metadata key of the same name), e.g. x-user-id."""
    parameter: str | None = Field(default=None, min_length=1, max_length=128)
    """A request parameter of the inference request, e.g. user_id."""

    @model_validator(mode="after")
    def _one(self) -> "StickyKey":
        if (self.header is None) == (self.parameter is None):
            raise ValueError("sticky needs exactly one of header or parameter")
        if self.header is not None:
            self.__dict__["header"] = self.header.lower()
        return self


class ShadowTarget(_Strict):
    """A candidate that also gets a share of the requests; its answers are discarded and compared."""

    model: str = Field(pattern=_MODEL_NAME)
    version: int | None = Field(default=None, ge=1)
    percent: float = Field(default=100.0, ge=0, le=100, allow_inf_nan=False)
    """Share of the endpoint's answered requests mirrored to it."""
    max_inflight: int = Field(default=32, ge=1, le=4096)
    """Mirrored requests running at once; beyond it a mirror is dropped (shed first under load)."""

    def label(self) -> str:
        return f"{self.model}:{self.version if self.version is not None else 'latest'}"


class FallbackTarget(_Strict):
    model: str = Field(pattern=_MODEL_NAME)
    version: int | None = Field(default=None, ge=1)

    def label(self) -> str:
        return f"{self.model}:{self.version if self.version is not None else 'latest'}"


class RouteSpec(_Strict):
    """How requests to an endpoint (a model name as clients call it) are routed: `route:` in a
    model's config.yaml, an entry of the repository's routes.yaml, or the management API
    (`PUT /v2/routes/{endpoint}`). The vocabulary of Seldon Core 2 experiments (candidates with
    weights, a mirror) and Flagger (weights stepped by a controller)."""

    endpoint: str | None = Field(default=None, pattern=_MODEL_NAME)
    """The endpoint's name; in a model's config.yaml it is the model's own name."""
    targets: list[RouteTarget] = Field(min_length=1, max_length=64)
    """The split. One target is a blue-green route: the whole endpoint on one version."""
    sticky: StickyKey | None = None
    """Assign by a key (consistent hashing) instead of at random per request."""
    shadow: ShadowTarget | None = None
    compare: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    """Share of the requests a target other than the first answered that also run on the first
    (the champion), to measure live agreement from the split traffic itself."""
    fallback: list[FallbackTarget] = Field(default_factory=list, max_length=8)
    """Tried in order when the answer fails (backend error, timeout, overload, open breaker, not
    ready); a fallback answer is marked as such to the client and in metrics."""

    @model_validator(mode="after")
    def _weights(self) -> "RouteSpec":
        total = sum(t.weight for t in self.targets)
        if not total > 0:
            raise ValueError(f"the targets' weights must sum to a positive number, got {total:g} "
                             f"({', '.join(f'{t.label()}={t.weight:g}' for t in self.targets)})")
        labels = [t.label() for t in self.targets]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"targets listed twice: {dup}")
        return self


class RoutesFile(_Strict):
    """`<repository>/routes.yaml`: routes of endpoints, by name."""

    routes: list[RouteSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _named(self) -> "RoutesFile":
        names = []
        for r in self.routes:
            if r.endpoint is None:
                raise ValueError("every route in routes.yaml needs an endpoint")
            names.append(r.endpoint)
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"endpoints routed twice: {dup}")
        return self
class CircuitBreakerConfig(_Strict):
    """`circuit_breaker:` of config.yaml: stop sending traffic to a failing version for a while."""

    window_seconds: float = Field(default=10.0, gt=0)
    """Rolling window of outcomes, seconds."""
    min_requests: int = Field(default=20, ge=1)
    """Fewer outcomes in the window: the breaker never opens."""
    max_error_rate: float = Field(default=0.5, gt=0, le=1)
    """Share of failures (500 backend error, 504 timeout, too slow) in the window that opens it."""
    max_latency_ms: float | None = Field(default=None, gt=0)
    """A slower answer counts as a failure (slow-call rate); null = latency does not count."""
    open_seconds: float = Field(default=5.0, ge=0)
    """Cool-down while open (requests refused at once, 503), before half-open."""
    half_open_probes: int = Field(default=3, ge=1)
    """Requests let through half-open: all succeed -> closed; one fails -> open again."""


class ResponseCacheConfig(_Strict):
    """`response_cache:` of config.yaml: answer repeated identical inputs without running the model."""

    max_bytes: int = Field(default=64 << 20, ge=1)
    """LRU bound in bytes (keys + output arrays)."""


class ModelConfig(_Strict):
    """`<repo>/<model>/config.yaml`: how a model is served."""

    format: int = CONFIG_FORMAT
    """config.yaml format version."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Model name (the directory name)."""
    backend: Literal["onnxruntime", "torchscript", "tensorrt"]
    """Backend of the latest version; each version's manifest.json names its own."""
    max_batch_size: int = Field(default=0, ge=0)
    """Largest batch the model accepts; 0 = the server does not batch requests together: each
    request is run alone and shapes are full shapes (Triton's meaning), which is what models
    with scalar inputs or a batch axis other than the first are served as."""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    dynamic_batching: DynamicBatching | None = None
    instance_group: InstanceGroup = Field(default_factory=InstanceGroup)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    warmup: Warmup = Field(default_factory=Warmup)
    parameters: dict[str, str] = Field(default_factory=dict)
    """Backend parameters (e.g. intra_op_threads)."""
    route: RouteSpec | None = None
    """How requests to this model's name are routed (split, shadow, fallback); None = every
    unversioned request goes to the latest serving version."""
    circuit_breaker: CircuitBreakerConfig | None = None
    """Open the version's breaker when it fails too often (absent = off)."""
    response_cache: ResponseCacheConfig | None = None
    """Cache answers per version, keyed by the inputs (absent = off)."""

    @model_validator(mode="after")
    def _batch_dim(self) -> "ModelConfig":
        if self.max_batch_size > 0:
            for t in [*self.inputs, *self.outputs]:
                if t.batch_axis != 0 or not t.shape or t.shape[0] != -1:
                    why = ("it has no batch axis" if t.batch_axis is None and t.shape and t.shape[0] == -1 else
                           f"its batch axis is {t.batch_axis}" if t.batch_axis else "")
                    raise ValueError(f"tensor {t.name!r} must have -1 as its first (batch) dimension when "
                                     f"max_batch_size > 0, got shape {t.shape}" + (f" ({why})" if why else "")
                                     + "; a model with scalar inputs or another batch axis is served with "
                                       "max_batch_size 0 (unbatched, full shapes)")
        pad = self.dynamic_batching.padding if self.dynamic_batching else None
        if pad is not None:
            if self.max_batch_size == 0:
                raise ValueError("dynamic_batching.padding needs max_batch_size > 0")
            for kind, axes, specs in (("input", pad.inputs, self.inputs), ("output", pad.outputs, self.outputs)):
                by_name = {t.name: t for t in specs}
                for name, axis in axes.items():
                    t = by_name.get(name)
                    if t is None:
                        raise ValueError(f"dynamic_batching.padding names {kind} {name!r}, which the model "
                                         f"does not have ({kind}s: {sorted(by_name)})")
                    if not 1 <= axis < len(t.shape) or t.shape[axis] != -1:
                        raise ValueError(f"dynamic_batching.padding: {kind} {name!r} axis {axis} must be a "
                                         f"variable (-1) dimension after the batch one; shape is {t.shape}")
        return self


# ---------------------------------------------------------------------------------------------
# Optimize recipes


OutputKind = Literal["probability", "logits", "regression", "discrete"]
"""How an output's measures are chosen (see serve_kit/optimize/validate.py and the README's
"Gates"): `probability` (values in [0, 1]; multi-class when a last axis of at least 2 sums to 1),
`logits` (class scores: argmax, or sigmoid at the threshold for one score), `regression` (any
other real values, embeddings included) and `discrete` (integer or boolean outputs)."""


class GateConfig(_Strict):
    """Accuracy gate for one variant against the reference, over the whole evaluation set.

    Every output gets the measures that fit its kind (detected from the reference's values, or
    set in `kinds`); None disables a check. Set fields override a default gate field by field.
    """

    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    """Minimum mean per-sample cosine similarity, every output of more than one element per
    sample (a one-element cosine is 1.0 by construction and is never computed)."""
    max_abs_error: float | None = Field(default=None, ge=0)
    """Maximum absolute error over every element of every output."""
    max_rel_l2: float | None = Field(default=None, ge=0)
    """Maximum relative L2 error of each output over the whole set: ||variant - reference|| /
    ||reference||, all samples and elements together."""
    min_cosine_across: float | None = Field(default=None, ge=-1, le=1)
    """Minimum cosine across samples, for outputs of at most 16 elements per sample: each element
    position is one vector over the evaluation set (where a per-sample cosine means nothing)."""
    max_prob_error: float | None = Field(default=None, ge=0)
    """Maximum absolute error of a probability output (catches a 0.98 error on one sample that a
    relative or averaged measure would hide)."""
    max_flip_rate: float | None = Field(default=None, ge=0, le=1)
    """Maximum share of decisions that differ from the reference's, for probability, logit and
    discrete outputs: argmax over the last axis for multi-class, the threshold for single
    probabilities (logits: the sigmoid at the threshold), equality for discrete outputs."""
    threshold: float = Field(default=0.5, gt=0, lt=1)
    """Decision threshold of single-probability outputs (and of single logits, through the sigmoid)."""
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Per output name: its own decision threshold, over `threshold`."""
    kinds: dict[str, OutputKind] = Field(default_factory=dict)
    """Per output name: its kind, over the detected one (e.g. `{speech_prob: probability}`)."""
    max_metric_drop: float | None = Field(default=None, ge=0)
    """Maximum drop of the task metric (in the metric's own unit, e.g. accuracy points)."""

    @field_validator("thresholds")
    @classmethod
    def _open_unit(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not 0 < t < 1}
        if bad:
            raise ValueError(f"thresholds must lie strictly between 0 and 1, got {bad}")
        return v

    def merged(self, other: "GateConfig | None") -> "GateConfig":
        """This gate with the fields `other` set (pydantic's model_fields_set) put over it; `kinds`
        and `thresholds` merge per output. Fields `other` leaves at their defaults do not override."""
        if other is None:
            return self
        data = {k: getattr(self, k) for k in self.model_fields_set}
        for k in other.model_fields_set:
            v = getattr(other, k)
            data[k] = {**getattr(self, k), **v} if k in ("kinds", "thresholds") else v
        return GateConfig(**data)

    def threshold_for(self, output: str) -> float:
        return self.thresholds.get(output, self.threshold)


# Defaults per precision: FP32 exports must match tightly; quantized variants may lose a little,
# but never a decision in more than a small share of samples, nor a probability by 0.25 anywhere.
def _gate(rel_l2: float, cos_across: float, prob: float, flips: float, **kw: float) -> GateConfig:
    return GateConfig(max_rel_l2=rel_l2, min_cosine_across=cos_across, max_prob_error=prob, max_flip_rate=flips, **kw)


DEFAULT_GATES: dict[str, GateConfig] = {
    "fp32": _gate(1e-3, 0.9999, 1e-3, 0.002, min_cosine=0.9999, max_abs_error=1e-3, max_metric_drop=0.1),
    # Half precisions: fp16 keeps 10 mantissa bits, bf16 only 7; fp8 (E4M3) has 3.
    "fp16": _gate(0.02, 0.999, 0.02, 0.005, min_cosine=0.9995, max_metric_drop=0.2),
    "bf16": _gate(0.05, 0.995, 0.05, 0.01, min_cosine=0.999, max_metric_drop=0.5),
    "fp8": _gate(0.15, 0.98, 0.25, 0.02, min_cosine=0.99, max_metric_drop=1.0),
    "int8": _gate(0.15, 0.98, 0.25, 0.01, min_cosine=0.99, max_metric_drop=1.0),
    "int4": _gate(0.2, 0.95, 0.3, 0.03, min_cosine=0.98, max_metric_drop=2.0),
}


# ---------------------------------------------------------------------------------------------
# Settings given as KEY=VALUE text (`-t TARGET:KEY=VALUE,...`, `--gate PRECISION.FIELD=VALUE`)


def split_settings(text: str) -> list[str]:
    """`a=1,b=[1,2],c="x,y"` -> ['a=1', 'b=[1,2]', 'c="x,y"']: commas inside brackets or quotes
    belong to the value (a JSON list)."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def type_words(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "")


def setting_value(model: type[BaseModel], key: str, text: str) -> Any:
    """The Python value for `key=text` of a pydantic model, from the field's type: JSON for a text
    starting with `[`, `{` or `"`; `none`/`null` for an optional field; `A+B` for a list; anything
    else as the string, which pydantic's validation turns into the int, float, bool or Literal the
    field wants (`true`/`false`, `yes`/`no`, `1`/`0` for booleans)."""
    import json
    import typing

    ann = model.model_fields[key].annotation
    args = typing.get_args(ann)
    text = text.strip()
    if text[:1] in ("[", "{", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{key}: not valid JSON ({e.msg})", value=text,
                             hint='quote JSON for the shell, e.g. op_types=\'["MatMul","Conv"]\'') from None
    if text.lower() in ("none", "null") and type(None) in args:
        return None
    # Optional[X] / X | None: the non-None members; any other annotation (list[str]) is itself.
    union = typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None))
    inner = [a for a in args if a is not type(None)] if union else [ann]
    if any(typing.get_origin(a) in (list, tuple, set) or a in (list, tuple, set) for a in inner):
        return [t.strip() for t in text.split("+") if t.strip()]
    return text


def model_errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(value)'}: {err['msg']}" for err in e.errors())


GATE_DICT_FIELDS = ("kinds", "thresholds")


def gate_setting(fields: dict[str, Any], key: str, text: str, origin: str, form: str = "FIELD=VALUE") -> None:
    """Add one gate setting, `FIELD=VALUE`, `kinds.OUTPUT=KIND` or `thresholds.OUTPUT=VALUE`, to
    `fields` (checked by building a GateConfig from them)."""
    fld, dot, output = key.partition(".")
    scalar = [f for f in GateConfig.model_fields if f not in GATE_DICT_FIELDS]
    if fld not in GateConfig.model_fields or (fld in GATE_DICT_FIELDS) != bool(dot and output):
        raise UsageError(f"unknown gate field {fld!r} (a gate setting is {form})", value=key, origin=origin,
                         hint="gate fields: " + ", ".join(scalar)
                              + "; per output: kinds.OUTPUT=probability|logits|regression|discrete, "
                                "thresholds.OUTPUT=0.3")
    if fld in GATE_DICT_FIELDS:
        fields.setdefault(fld, {})[output] = text.strip()
    else:
        fields[fld] = setting_value(GateConfig, fld, text)
    try:
        typed = GateConfig(**fields)
    except ValidationError as e:
        raise UsageError(f"invalid gate setting: {model_errors(e)}", value=f"{key}={text}", origin=origin,
                         hint="see the README's \"Gates\" for each field's range") from None
    fields.update({k: getattr(typed, k) for k in fields})


def parse_gate_args(items: list[str], origin: str = "--gate") -> dict[str, dict[str, Any]]:
    """`--gate PRECISION.FIELD=VALUE` items (PRECISION may be `all`) -> {precision: {field: value}}."""
    gates: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        prec, dot, fld = key.partition(".")
        if not sep or not dot or prec not in (*DEFAULT_GATES, "all"):
            raise UsageError("gate is not PRECISION.FIELD=VALUE", value=item, origin=origin,
                             hint=f"precisions: {', '.join(DEFAULT_GATES)}, all; e.g. --gate int8.max_metric_drop=0.5, "
                                  "--gate int8.max_flip_rate=none, --gate all.kinds.prob=probability")
        for p in (DEFAULT_GATES if prec == "all" else [prec]):
            gate_setting(gates.setdefault(p, {}), fld, value, f"{origin} {item}", "PRECISION.FIELD=VALUE")
    return gates


class SourceSpec(_Strict):
    path: str | None = None
    """A TorchScript (.pt/.ts), torch.export (.pt2) or ONNX (.onnx) file."""
    factory: str | None = None
    """`package.module:function` returning an nn.Module."""
    weights: str | None = None
    """Weights for the factory's module: .safetensors, or a state_dict (loaded weights_only)."""

    @model_validator(mode="after")
    def _one(self) -> "SourceSpec":
        if bool(self.path) == bool(self.factory):
            raise ValueError("give exactly one of `path` or `factory`")
        if self.weights and not self.factory:
            raise ValueError("`weights` goes with `factory`")
        return self


class DataSpec(_Strict):
    function: str | None = None
    """`module:function` returning {'calibration': {...}, 'evaluation': {...}} of named arrays."""
    calibration: str | None = None
    """A folder of .npy/.npz files or one .npz with named arrays."""
    evaluation: str | None = None
    """Held-out data for validation; when absent, `calibration` is split in two."""
    label_key: str = "labels"
    """Array name holding labels (not fed to the model)."""
    max_calibration_samples: int = Field(default=512, ge=1)
    max_evaluation_samples: int = Field(default=2048, ge=1)


class TargetSpec(_Strict):
    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    gate: GateConfig | None = None
    """Overrides the precision's default gate for this target."""


class LatencySpec(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    """Batch sizes at which each variant's latency is measured for selection."""
    min_seconds: float = Field(default=0.5, gt=0)
    """Measure each batch size for at least this long (after warm-up), in 3 or more rounds of one
    window per variant (`--latency-seconds`): 1.5 gives bench's 0.5 s windows and steadier ratios."""

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive and at least one is needed")
        return v


class RepositorySpec(_Strict):
    model_name: str | None = None
    max_batch_size: int = Field(default=64, ge=0)
    dynamic_batching: DynamicBatching | None = Field(default_factory=DynamicBatching)
    instance_group: InstanceGroup = Field(default_factory=InstanceGroup)


class Recipe(_Strict):
    """A complete, runnable optimize job (serve_kit/recipes/*.yaml, or the user's own file)."""

    name: str
    description: str = ""
    model: SourceSpec
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    metric: str | None = None
    """`top1` (labels are class ids, the first output holds scores) or `module:function`."""
    targets: list[TargetSpec] = Field(default_factory=list)
    gates: dict[str, GateConfig] = Field(default_factory=dict)
    """Per precision (`fp32`, `int8`, `int4`) overrides of the default gates."""
    latency: LatencySpec = Field(default_factory=LatencySpec)
    repository: RepositorySpec = Field(default_factory=RepositorySpec)
    constants: dict[str, Any] = Field(default_factory=dict)
    """Input name -> value baked into the model (as `--constant NAME=VALUE`): a number, bool,
    string or list; the input leaves the served signature."""
    state: dict[str, str] = Field(default_factory=dict)
    """Output name -> the input it feeds at the next call (as `--state OUTPUT=INPUT`)."""

    @field_validator("targets", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list):
            # Leave it to the list validator to report; iterating would turn `targets: onnx` into
            # the targets o, n, n, x (and a mapping into its keys).
            return v
        return [{"name": t} if isinstance(t, str) else t for t in v]

    @field_validator("gates")
    @classmethod
    def _precisions(cls, v: dict[str, GateConfig]) -> dict[str, GateConfig]:
        # A misspelt precision would otherwise be ignored silently and the default gate applied.
        unknown = sorted(set(v) - set(DEFAULT_GATES))
        if unknown:
            raise ValueError(f"unknown precision(s) {unknown}: use {', '.join(DEFAULT_GATES)}")
        return v


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def validation_error(e: ValidationError, origin: str) -> ConfigError:
    """A ConfigError naming every invalid field path of a pydantic error."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {err['msg']}{got_s}")
    return ConfigError("invalid configuration: " + "; ".join(lines), origin=origin,
                       hint="see the README's reference of config.yaml and recipes")


def load_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", value=str(path), origin=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", origin=str(path)) from None


def parse_model(cls: type[BaseModel], data: Any, origin: str):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, origin) from None


def load_model_config(path: Path) -> ModelConfig:
    return parse_model(ModelConfig, load_yaml(path), str(path))


def load_recipe_file(path: Path) -> Recipe:
    return parse_model(Recipe, load_yaml(path), str(path))
