"""`trt-fp16`, `trt-int8`, `trt-fp8`: TensorRT engines (`model.plan`) built from ONNX on this GPU.

trt-fp16 starts from the FP32 ONNX export and lets TensorRT pick FP16 kernels where they are
faster. trt-int8 and trt-fp8 start from Model Optimizer's explicit Q/DQ ONNX (modelopt-int8,
modelopt-fp8): the scales are in the graph, so TensorRT needs no calibrator of its own and the
graph validated on ONNX Runtime is the one TensorRT compiles.

An engine only runs on the TensorRT version and GPU architecture that built it, so the build
records both in the artifact's details (the version's manifest.json), and the tensorrt runtime
backend checks them before deserializing. The helpers that compute profiles, flags and details
are pure functions, testable without TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...config import TensorSpec
from ...errors import ConfigError, ConversionError
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target

TIMING_CACHE_NAME = "tensorrt-timing.cache"
MIN_FP8_COMPUTE_CAPABILITY = (8, 9)
"""FP8 tensor cores start with Ada (8.9) and Hopper (9.0)."""


class ShapeRange(BaseModel):
    """One input's optimization-profile shapes, batch dimension included."""

    model_config = ConfigDict(extra="forbid")
    min: list[int]
    """Smallest shape the engine accepts."""
    opt: list[int]
    """Shape TensorRT tunes its kernels for."""
    max: list[int]
    """Largest shape the engine accepts."""

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError("min, opt and max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 1 <= lo <= mid <= hi:
                raise ValueError(f"need 1 <= min <= opt <= max in every dimension, got {self.min}, "
                                 f"{self.opt}, {self.max}")
        return self


class TensorRTConfig(TargetConfig):
    max_batch_size: int | None = Field(default=None, ge=1)
    """Largest batch the engine accepts (the profile's max). None = the model's config.yaml
    max_batch_size as optimize writes it (so the dynamic batcher never sends a batch the engine
    refuses), or 64 outside a pipeline."""
    opt_batch_size: int | None = Field(default=None, ge=1)
    """Batch size TensorRT tunes its kernels for; None = max_batch_size (what a busy dynamic
    batcher sends)."""
    shapes: dict[str, ShapeRange] = Field(default_factory=dict)
    """Explicit min/opt/max shapes per input (batch included), overriding the defaults. Needed for
    variable non-batch dimensions wider than the calibration samples (e.g. longer sequences)."""
    workspace_mib: int = Field(default=4096, ge=16)
    """Scratch GPU memory TensorRT's tactics may use while building and running."""
    builder_optimization_level: int = Field(default=3, ge=0, le=5)
    """TensorRT's builder effort: higher searches more tactics (slower builds, maybe faster engines)."""
    strongly_typed: bool = False
    """Build a strongly typed network: every tensor keeps the dtype the ONNX graph gives it and no
    precision flag is set (for Q/DQ graphs whose float parts Model Optimizer already cast)."""
    timing_cache: bool = True
    """Load and save TensorRT's timing cache in the repository's cache folder, so a rebuild reuses
    the measured tactics (faster and repeatable builds)."""
    quantize_config: dict[str, Any] = Field(default_factory=dict)
    """For trt-int8 / trt-fp8: the config of the modelopt-int8 / modelopt-fp8 target that writes
    the Q/DQ ONNX (e.g. calibration_method)."""

    @model_validator(mode="after")
    def _opt_le_max(self) -> "TensorRTConfig":
        if self.opt_batch_size is not None and self.max_batch_size is not None \
                and self.opt_batch_size > self.max_batch_size:
            raise ValueError(f"opt_batch_size {self.opt_batch_size} > max_batch_size {self.max_batch_size}")
        return self


# ---------------------------------------------------------------------------------------------
# Pure helpers (no TensorRT needed)


def spec_shapes(specs: Sequence[TensorSpec]) -> dict[str, list[int]]:
    return {s.name: list(s.shape) for s in specs}


def calibration_sample_shapes(calibration) -> dict[str, list[int]]:
    """The per-sample shape (batch dimension dropped) of each calibration array."""
    return {k: list(v.shape[1:]) for k, v in calibration.inputs.items()}


def profile_shapes(shapes: Mapping[str, Sequence[int]], samples: Mapping[str, Sequence[int]],
                   cfg: TensorRTConfig, origin: str = "trt target config") -> dict[str, dict[str, list[int]]]:
    """min/opt/max per input for one optimization profile.

    `shapes` are the network's input shapes (-1 = variable, batch first); `samples` the shape of one
    calibration sample per input. A variable batch dimension gets 1 / opt_batch_size /
    max_batch_size; another variable dimension 1 / the calibration size / the calibration size (the
    engine then accepts what the model was calibrated and validated on, and anything shorter);
    `cfg.shapes` overrides both for an input.
    """
    unknown = sorted(set(cfg.shapes) - set(shapes))
    if unknown:
        raise ConfigError(f"`shapes` names inputs the model does not have: {unknown}", origin=origin,
                          hint=f"the model's inputs are {list(shapes)}")
    max_batch = cfg.max_batch_size or DEFAULT_MAX_BATCH
    opt_batch = cfg.opt_batch_size or max_batch
    if opt_batch > max_batch:
        raise ConfigError(f"opt_batch_size {opt_batch} > max_batch_size {max_batch}", origin=origin)
    out: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        shape = [int(d) for d in shape]
        if name in cfg.shapes:
            r = cfg.shapes[name]
            if len(r.min) != len(shape):
                raise ConfigError(f"shapes.{name} has rank {len(r.min)}, the model's input has rank "
                                  f"{len(shape)} ({shape})", origin=origin)
            fixed = [i for i, d in enumerate(shape) if d != -1 and not r.min[i] == r.opt[i] == r.max[i] == d]
            if fixed:
                raise ConfigError(f"shapes.{name} changes fixed dimensions {fixed} of the model's input {shape}",
                                  origin=origin)
            out[name] = {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
            continue
        lo, mid, hi = [], [], []
        sample = samples.get(name)
        for i, d in enumerate(shape):
            if d != -1:
                lo.append(d), mid.append(d), hi.append(d)
            elif i == 0:
                lo.append(1), mid.append(opt_batch), hi.append(max_batch)
            elif sample is not None and len(sample) == len(shape) - 1:
                c = int(sample[i - 1])
                lo.append(1), mid.append(c), hi.append(c)
            else:
                raise ConfigError(f"input {name!r} {shape}: dimension {i} is variable and no calibration "
                                  "sample gives its size", origin=origin,
                                  hint=f"give shapes: {{{name}: {{min: [...], opt: [...], max: [...]}}}}")
        out[name] = {"min": lo, "opt": mid, "max": hi}
    return out


DEFAULT_MAX_BATCH = 64


def with_batch_limit(cfg: TensorRTConfig, ctx: BuildContext) -> TensorRTConfig:
    """The config with its max_batch_size filled in from the model's batching limit."""
    if cfg.max_batch_size is not None:
        return cfg
    return cfg.model_copy(update={"max_batch_size": ctx.max_batch_size or DEFAULT_MAX_BATCH})


def builder_flags(precision: str, strongly_typed: bool = False) -> list[str]:
    """TensorRT BuilderFlag names for a target precision. FP16 stays on for the quantized ones:
    the layers left unquantized then run in FP16 rather than FP32."""
    if strongly_typed:
        return []  # precision flags are refused for strongly typed networks
    return {"fp16": ["FP16"], "int8": ["FP16", "INT8"], "fp8": ["FP16", "FP8"], "int4": ["FP16", "INT4"]}[precision]


def engine_details(tensorrt_version: str, gpu: Mapping[str, Any], profiles: Mapping[str, Any],
                   flags: Sequence[str], timing_cache: bool, **extra: Any) -> dict[str, Any]:
    """The artifact details that go into manifest.json; the runtime backend reads the version and
    GPU back to refuse an engine built elsewhere (see runtime/backends/tensorrt.py)."""
    return {"tensorrt": {"tensorrt_version": tensorrt_version, "gpu_name": gpu.get("name"),
                         "compute_capability": gpu.get("compute_capability"),
                         "profiles": {k: dict(v) for k, v in profiles.items()}, "flags": list(flags),
                         "timing_cache": bool(timing_cache), **extra}}


def parse_compute_capability(cc: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(cc).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def fp8_unavailable_reason(gpu: Mapping[str, Any]) -> str | None:
    cc = parse_compute_capability(gpu.get("compute_capability"))
    if cc is not None and cc < MIN_FP8_COMPUTE_CAPABILITY:
        return (f"FP8 needs compute capability {'.'.join(map(str, MIN_FP8_COMPUTE_CAPABILITY))}+ (Ada, "
                f"Hopper or newer); {gpu.get('name')} has {gpu.get('compute_capability')}")
    return None


# ---------------------------------------------------------------------------------------------
# Building (TensorRT)


def _parser_error_text(err) -> str:
    parts = []
    for attr in ("node_name", "node_operator"):
        try:
            value = getattr(err, attr)()
        except Exception:  # older TensorRT has neither
            value = None
        if value:
            parts.append(str(value))
    if not parts and getattr(err, "node", lambda: -1)() >= 0:
        parts.append(f"#{err.node()}")
    return (f"node {' '.join(parts)}: " if parts else "") + str(err.desc()).strip()


def _load_timing_cache(config, path: Path) -> bool:
    """Give the build a timing cache, seeded from `path` when that holds one this TensorRT and GPU
    accept; returns whether it was seeded."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a truncated or foreign file
        cache, data = None, b""
    # set_timing_cache(cache, ignore_mismatch=False): refuses a cache from another TensorRT or GPU.
    if cache is None or not config.set_timing_cache(cache, False):
        # Written by another TensorRT version or GPU: start empty; the save then replaces it.
        config.set_timing_cache(config.create_timing_cache(b""), False)
        data = b""
    return bool(data)


def _save_timing_cache(config, path: Path) -> None:
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a concurrent build never reads half a cache


def build_engine(onnx_path: Path, plan_path: Path, cfg: TensorRTConfig, precision: str,
                 samples: Mapping[str, Sequence[int]], cache_path: Path | None,
                 origin: str = "trt target config") -> dict[str, Any]:
    """Parse `onnx_path`, build a serialized engine into `plan_path`; returns the details."""
    import tensorrt as trt

    from ...gpu import gpu_info, tensorrt_logger

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    net_flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        # Explicit batch is always on from TensorRT 10 (the flag is deprecated and ignored there).
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if cfg.strongly_typed:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ConversionError(f"TensorRT's ONNX parser rejected the model ({len(errors)} error(s)): "
                              + "; ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""),
                              value=str(onnx_path),
                              hint="unsupported ops or opsets show here; try another `opset` or exporter "
                                   "for the onnx export, or serve the onnx target instead")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profiles = profile_shapes({t.name: list(t.shape) for t in inputs}, samples, cfg, origin)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    config.builder_optimization_level = cfg.builder_optimization_level
    flags = builder_flags(precision, cfg.strongly_typed)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)
    cache_loaded = _load_timing_cache(config, cache_path) if cache_path is not None else False

    logger.errors.clear()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        why = "; ".join(list(logger.errors)[-3:]) or "see TensorRT's log"
        raise ConversionError(f"TensorRT failed to build an engine: {why}", value=str(onnx_path),
                              hint="raise `workspace_mib`, check `shapes`, or try trt-fp16 first")
    plan_path.write_bytes(bytes(memoryview(serialized)))
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    return engine_details(trt.__version__, gpu_info(0), profiles, flags, cache_path is not None,
                          timing_cache_reused=cache_loaded, strongly_typed=cfg.strongly_typed,
                          workspace_mib=cfg.workspace_mib,
                          builder_optimization_level=cfg.builder_optimization_level)


# ---------------------------------------------------------------------------------------------
# Targets


class _TensorRTTarget(Target):
    backend = "tensorrt"
    Config = TensorRTConfig
    quantizer: ClassVar[str | None] = None
    """The target that writes the Q/DQ ONNX this one starts from (None = the FP32 export)."""

    def unavailable_reason(self, source) -> str | None:
        from ...gpu import gpu_info, tensorrt_unavailable_message

        reason = super().unavailable_reason(source) or tensorrt_unavailable_message()
        if reason:
            return reason
        if self.precision == "fp8":
            reason = fp8_unavailable_reason(gpu_info(0))
            if reason:
                return reason
        if self.quantizer:
            from ..target import target_class

            try:
                return target_class(self.quantizer)(self.config.quantize_config).unavailable_reason(source)
            except ImportError as e:
                return f"{self.quantizer} (which writes the Q/DQ ONNX this target compiles) is unavailable: {e}"
        return None

    def _onnx_input(self, ctx: BuildContext) -> Path:
        if self.quantizer is None:
            return ctx.onnx_fp32()
        return ctx.built_by(self.quantizer, self.config.quantize_config).path

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        cfg: TensorRTConfig = with_batch_limit(self.config, ctx)
        onnx_path = self._onnx_input(ctx)
        cache = ctx.cache_dir / TIMING_CACHE_NAME if (ctx.cache_dir is not None and cfg.timing_cache) else None
        samples = calibration_sample_shapes(ctx.calibration)
        plan = outdir / "model.plan"
        with ctx.progress.task(f"build TensorRT engine ({self.name})"):
            details = build_engine(onnx_path, plan, cfg, self.precision, samples, cache,
                                   origin=f"config of target {self.name!r}")
        if self.quantizer:
            details["tensorrt"]["onnx_from"] = self.quantizer
        return Artifact(plan, "tensorrt", details)


@register_target
class TensorRTFp16Target(_TensorRTTarget):
    name = "trt-fp16"
    precision = "fp16"


@register_target
class TensorRTInt8Target(_TensorRTTarget):
    name = "trt-int8"
    precision = "int8"
    quantizer = "modelopt-int8"


@register_target
class TensorRTFp8Target(_TensorRTTarget):
    name = "trt-fp8"
    precision = "fp8"
    quantizer = "modelopt-fp8"
