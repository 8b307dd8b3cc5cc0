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
    """Per-request timeout when the request sets none; 0 = none. A request may only shorten it."""
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


class GateConfig(_Strict):
    """Accuracy gate for one variant against the reference. None disables a check."""

    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    """Minimum mean per-sample cosine similarity, every output."""
    max_abs_error: float | None = Field(default=None, ge=0)
    """Maximum absolute error over every element of every output."""
    max_metric_drop: float | None = Field(default=None, ge=0)
    """Maximum drop of the task metric (in the metric's own unit, e.g. accuracy points)."""

    def merged(self, other: "GateConfig | None") -> "GateConfig":
        if other is None:
            return self
        data = self.model_dump()
        data.update(other.model_dump(exclude_unset=True))
        return GateConfig(**data)


# Defaults per precision: FP32 exports must match tightly; quantized variants may lose a little.
DEFAULT_GATES: dict[str, GateConfig] = {
    "fp32": GateConfig(min_cosine=0.9999, max_abs_error=1e-3, max_metric_drop=0.1),
    # Half precisions: fp16 keeps 10 mantissa bits, bf16 only 7; fp8 (E4M3) has 3.
    "fp16": GateConfig(min_cosine=0.9995, max_metric_drop=0.2),
    "bf16": GateConfig(min_cosine=0.999, max_metric_drop=0.5),
    "fp8": GateConfig(min_cosine=0.99, max_metric_drop=1.0),
    "int8": GateConfig(min_cosine=0.99, max_metric_drop=1.0),
    "int4": GateConfig(min_cosine=0.98, max_metric_drop=2.0),
}


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
    """Measure each batch size for at least this long (after warm-up)."""

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
