"""The optimize-target plugin pattern: one small class per export target or quantizer.

A target has a name, a precision (which picks its default accuracy gate), the runtime backend that
serves its result, and a typed Config next to its code. The base class checks availability and
state; subclasses implement `_build_impl`. Adding a target = one module + one test + one recipe line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..config import TensorSpec, parse_model
from ..errors import TargetUnavailable, UsageError
from ..progress import ProgressSink
from .calibration import Dataset
from .source import Source

_MODULES = {
    "torchscript": "serve_kit.optimize.export.torchscript",
    "onnx": "serve_kit.optimize.export.onnx",
    "onnx-int8-static": "serve_kit.optimize.quantize.int8",
    "onnx-int8-dynamic": "serve_kit.optimize.quantize.int8",
    "onnx-int4": "serve_kit.optimize.quantize.int4",
    # NVIDIA Model Optimizer: explicit Q/DQ ONNX for TensorRT (runs on ONNX Runtime's CPU path too).
    "modelopt-int8": "serve_kit.optimize.quantize.modelopt_onnx",
    "modelopt-fp8": "serve_kit.optimize.quantize.modelopt_onnx",
    "modelopt-int4": "serve_kit.optimize.quantize.modelopt_onnx",
    "modelopt-torch-int8": "serve_kit.optimize.quantize.modelopt_torch",
    "modelopt-torch-int8-sq": "serve_kit.optimize.quantize.modelopt_torch",
    "modelopt-torch-fp8": "serve_kit.optimize.quantize.modelopt_torch",
    "modelopt-torch-int4-awq": "serve_kit.optimize.quantize.modelopt_torch",
    # GPU only: TensorRT engines and half-precision PyTorch on CUDA.
    "trt-fp16": "serve_kit.optimize.export.tensorrt",
    "trt-int8": "serve_kit.optimize.export.tensorrt",
    "trt-fp8": "serve_kit.optimize.export.tensorrt",
    "torchscript-cuda-fp16": "serve_kit.optimize.export.torchscript",
    "torchscript-cuda-bf16": "serve_kit.optimize.export.torchscript",
}
_CLASSES: dict[str, type["Target"]] = {}


def target_names() -> list[str]:
    return list(_MODULES)


def register_target(cls: type["Target"]) -> type["Target"]:
    _CLASSES[cls.name] = cls
    return cls


def target_class(name: str) -> type["Target"]:
    if name not in _MODULES:
        raise UsageError("unknown optimize target", value=name, origin="--target / recipe targets",
                         hint="targets: " + ", ".join(_MODULES))
    if name not in _CLASSES:
        importlib.import_module(_MODULES[name])
    return _CLASSES[name]


class TargetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Artifact:
    """What a target built: one model file for one runtime backend."""

    path: Path
    backend: str
    details: dict[str, Any] = field(default_factory=dict)
    backend_options: dict[str, Any] = field(default_factory=dict)
    """Options the backend must load this file with (e.g. `device: cuda`); the pipeline validates
    with them and writes them into the version's config.yaml `parameters`."""


@dataclass
class BuildContext:
    source: Source
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    calibration: Dataset
    workdir: Path
    progress: ProgressSink = field(default_factory=ProgressSink)
    cache_dir: Path | None = None
    """A folder kept across runs (in the repository, beside config.yaml) for build caches such as
    TensorRT's timing cache; None = nothing is kept."""
    max_batch_size: int | None = None
    """The largest batch the served model will be given (config.yaml's max_batch_size), for
    targets that fix it at build time (TensorRT's optimization profile); None = not known."""
    memory_budget: int | None = None
    """Bytes that a target's calibration and diagnosis may hold at once (activations, trial
    models); None = no budget given (targets then pick a safe default from the machine's RAM).
    A target that cannot stay within it fails with a message naming the budget."""
    _onnx_fp32: Path | None = None
    _built: dict[str, Artifact] = field(default_factory=dict)

    def onnx_fp32(self) -> Path:
        """The FP32 ONNX model that quantizers start from (exported once, with defaults)."""
        if self._onnx_fp32 is None:
            base = target_class("onnx")({})
            d = self.workdir / "_onnx_fp32"
            d.mkdir(parents=True, exist_ok=True)
            self._onnx_fp32 = base.build(self, d).path
        return self._onnx_fp32

    def built_by(self, target: str, config: dict[str, Any] | None = None) -> Artifact:
        """The artifact of another target that this one starts from (e.g. trt-int8 from
        modelopt-int8's Q/DQ ONNX), built once per run with the given config."""
        key = f"{target}:{sorted((config or {}).items())!r}"
        if key not in self._built:
            d = self.workdir / f"_input_{target}_{len(self._built)}"
            self._built[key] = target_class(target)(config or {}).build(self, d)
        return self._built[key]


class Target:
    name: ClassVar[str]
    precision: ClassVar[str]
    """`fp32`, `fp16`, `bf16`, `fp8`, `int8` or `int4`: selects the default accuracy gate."""
    backend: ClassVar[str]
    Config: ClassVar[type[TargetConfig]] = TargetConfig
    source_kinds: ClassVar[tuple[str, ...]] = ("torch", "torchscript", "onnx")

    def __init__(self, config: dict[str, Any] | TargetConfig | None = None):
        if isinstance(config, TargetConfig):
            self.config = config
        else:
            self.config = parse_model(self.Config, config or {}, f"config of target {self.name!r}")

    def unavailable_reason(self, source: Source) -> str | None:
        """Why this target cannot run for this source here, or None."""
        if source.kind not in self.source_kinds:
            return f"{self.name} needs a {' or '.join(self.source_kinds)} source, not {source.kind}"
        return None

    def build(self, ctx: BuildContext, outdir: Path) -> Artifact:
        reason = self.unavailable_reason(ctx.source)
        if reason:
            raise TargetUnavailable(reason, value=self.name)
        outdir.mkdir(parents=True, exist_ok=True)
        return self._build_impl(ctx, outdir)

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        raise NotImplementedError

    def retry_config(self, ctx: BuildContext, artifact: Artifact, evaluation: Dataset,
                     attempt: int) -> TargetConfig | None:
        """After a missed gate: a changed config worth another try (e.g. sensitive nodes kept in
        float), or None to give up. The default never retries."""
        return None
