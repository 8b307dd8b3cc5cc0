"""NVIDIA Model Optimizer's PyTorch path: `mtq.quantize` with a real calibration loop, exported
to Q/DQ ONNX for TensorRT.

Targets: `modelopt-torch-int8` (INT8_DEFAULT_CFG), `modelopt-torch-int8-sq` (INT8 SmoothQuant),
`modelopt-torch-fp8` (FP8 E4M3) and `modelopt-torch-int4-awq` (INT4 weight-only AWQ). The source
must be a PyTorch nn.Module (the quantizers are inserted as modules); a deep copy is quantized, the
reference is left alone.

What the export gives (nvidia-modelopt 0.47, torch 2.13, measured here on the CPU):
- `torch.onnx.export(dynamo=True)` fails on a data-dependent guard inside the quantizers; the
  legacy exporter works, so it is the one used.
- INT8 / INT8-SQ export as standard QuantizeLinear/DequantizeLinear: ONNX Runtime runs them, so
  these are validated here like every other variant.
- FP8 exports as TensorRT's custom `trt::TRT_FP8QuantizeLinear` / `TRT_FP8DequantizeLinear`.
  serve-kit rewrites them into the standard opset-19 QuantizeLinear/DequantizeLinear with a
  FLOAT8E4M3FN zero point (the same numbers: scale, round to E4M3, saturate), which TensorRT 10
  and ONNX Runtime both run, so FP8 is validated here too.
- INT4 AWQ exports block-wise `trt::DequantizeLinear`, which only TensorRT runs: that target
  builds a TensorRT engine from it and is unavailable without TensorRT and a GPU.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from ...errors import ConversionError
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import count_ops
from .prepare import check_written
from .modelopt_onnx import (_modelopt_version, _quiet_modelopt, modelopt_unavailable_reason, ort_options_for,
                            stdout_to_stderr)


class ModeloptTorchConfig(TargetConfig):
    calibration_samples: int = Field(default=256, ge=1)
    """How many calibration samples the calibration loop runs through the model."""
    calibration_batch_size: int = Field(default=32, ge=1)
    disable: list[str] = Field(default_factory=list)
    """Quantizer name patterns (Model Optimizer wildcards, e.g. `*classifier.3*`) kept in float."""
    opset: int = Field(default=19, ge=17)
    """ONNX opset of the export (FP8 Q/DQ needs 19)."""


def quantize_module(module, config_name: str, ctx: BuildContext, cfg: ModeloptTorchConfig):
    """A quantized deep copy of `module`, calibrated on the real calibration set."""
    import torch
    import modelopt.torch.quantization as mtq

    qcfg = copy.deepcopy(getattr(mtq, config_name))
    # 0.47's quant_cfg is an ordered list of rules (later ones win); older releases used a dict.
    for pattern in cfg.disable:
        if isinstance(qcfg["quant_cfg"], list):
            qcfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
        else:
            qcfg["quant_cfg"][pattern] = {"enable": False}
    n = min(len(ctx.calibration), cfg.calibration_samples)
    names = [s.name for s in ctx.inputs]

    def forward_loop(model) -> None:
        with torch.no_grad():
            for start in range(0, n, cfg.calibration_batch_size):
                batch = ctx.calibration.slice(start, min(n, start + cfg.calibration_batch_size))
                model(*[torch.from_numpy(np.ascontiguousarray(batch[k])) for k in names])

    model = copy.deepcopy(module).eval()
    _quiet_modelopt()
    with warnings.catch_warnings(), stdout_to_stderr():
        warnings.simplefilter("ignore")
        return mtq.quantize(model, qcfg, forward_loop), n


def trt_fp8_to_onnx(src: Path, dst: Path) -> int:
    """Rewrite TensorRT's custom FP8 Q/DQ ops into ONNX's own (opset 19, FLOAT8E4M3FN zero point).
    Returns how many nodes were rewritten."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    graph = model.graph
    zp = "serve_kit_fp8_zero_point"
    count, fp8_values = 0, set()
    for node in graph.node:
        if node.domain == "trt" and node.op_type in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            quantize = node.op_type == "TRT_FP8QuantizeLinear"
            node.op_type = "QuantizeLinear" if quantize else "DequantizeLinear"
            node.domain = ""
            if quantize:
                # The zero point's type makes QuantizeLinear produce FP8 (E4M3, saturating).
                node.input.append(zp)
                fp8_values.update(node.output)
            count += 1
    if count:
        # The exporter declared the custom op's output as uint8 (its storage type).
        for vi in graph.value_info:
            if vi.name in fp8_values:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
        graph.initializer.append(helper.make_tensor(zp, TensorProto.FLOAT8E4M3FN, [], [0.0]))
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx") and imp.version < 19:
                imp.version = 19
        still = [n.op_type for n in graph.node if n.domain == "trt"]
        if not still:
            kept = [imp for imp in model.opset_import if imp.domain != "trt"]
            del model.opset_import[:]
            model.opset_import.extend(kept)
    onnx.save(model, str(dst))
    return count


class _ModeloptTorchTarget(Target):
    backend = "onnxruntime"
    Config = ModeloptTorchConfig
    source_kinds = ("torch",)
    mtq_config: ClassVar[str]

    def unavailable_reason(self, source) -> str | None:
        return super().unavailable_reason(source) or modelopt_unavailable_reason(onnx_path=False)

    def export(self, ctx: BuildContext, outdir: Path) -> tuple[Path, dict[str, Any]]:
        """Quantize the source and export it; returns the ONNX path and the details."""
        from ..export.onnx import export_legacy

        cfg: ModeloptTorchConfig = self.config
        with ctx.progress.task(f"quantize {self.name} (Model Optimizer {self.mtq_config})"):
            try:
                model, n = quantize_module(ctx.source.model, self.mtq_config, ctx, cfg)
            except Exception as e:
                raise ConversionError(f"Model Optimizer {self.mtq_config} failed: "
                                      f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}",
                                      value=ctx.source.ref, hint="disable the failing layers' quantizers "
                                      "with `disable: ['*name*']` in the target's config") from None
        path = outdir / "export.onnx"
        try:
            with stdout_to_stderr():
                export_legacy(model, ctx, path, cfg.opset)
        except Exception as e:
            raise ConversionError(f"ONNX export of the quantized model failed: "
                                  f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}",
                                  value=ctx.source.ref) from None
        return path, {"quantizer": "nvidia-modelopt (PyTorch)", "modelopt_version": _modelopt_version(),
                      "config": self.mtq_config, "calibration_samples": n, "exporter": "legacy",
                      "opset": cfg.opset, "disabled": cfg.disable}

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        exported, details = self.export(ctx, outdir)
        path = outdir / "model.onnx"
        rewritten = trt_fp8_to_onnx(exported, path)
        if rewritten:
            details["fp8_qdq_rewritten_to_onnx"] = rewritten
        ops = count_ops(path)
        if not ops.get("DequantizeLinear"):
            raise ConversionError(f"{self.name}: the export holds no DequantizeLinear: nothing was quantized",
                                  value=ctx.source.ref, hint="check `disable` patterns in the target's config")
        details["written_model"] = check_written(path, f"Model Optimizer {self.mtq_config} (PyTorch export)")
        return Artifact(path, self.backend, {**details, "ops": ops}, backend_options=ort_options_for(path))


@register_target
class ModeloptTorchInt8(_ModeloptTorchTarget):
    name = "modelopt-torch-int8"
    precision = "int8"
    mtq_config = "INT8_DEFAULT_CFG"


@register_target
class ModeloptTorchInt8SQ(_ModeloptTorchTarget):
    name = "modelopt-torch-int8-sq"
    precision = "int8"
    mtq_config = "INT8_SMOOTHQUANT_CFG"


@register_target
class ModeloptTorchFp8(_ModeloptTorchTarget):
    name = "modelopt-torch-fp8"
    precision = "fp8"
    mtq_config = "FP8_DEFAULT_CFG"


class ModeloptTorchInt4Config(ModeloptTorchConfig):
    engine: dict[str, Any] = Field(default_factory=dict)
    """The TensorRT engine's config (as for trt-fp16: max_batch_size, shapes, workspace_mib, ...)."""


@register_target
class ModeloptTorchInt4AWQ(_ModeloptTorchTarget):
    """INT4 weight-only AWQ through Model Optimizer's PyTorch path, compiled by TensorRT: the
    export's block-wise `trt::DequantizeLinear` runs nowhere else, so this target is a TensorRT
    engine and is unavailable without TensorRT and a GPU (its quantize-and-export half is tested
    on the CPU)."""

    name = "modelopt-torch-int4-awq"
    precision = "int4"
    backend = "tensorrt"
    mtq_config = "INT4_AWQ_CFG"
    Config = ModeloptTorchInt4Config

    def unavailable_reason(self, source) -> str | None:
        from ...gpu import tensorrt_unavailable_message

        reason = super().unavailable_reason(source)
        if reason:
            return reason
        trt = tensorrt_unavailable_message()
        return (f"its ONNX export uses TensorRT's block-wise trt::DequantizeLinear, which only a TensorRT "
                f"engine runs: {trt}") if trt else None

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        from ..export.tensorrt import (TIMING_CACHE_NAME, TensorRTConfig, build_engine, calibration_sample_shapes,
                                       with_batch_limit)
        from ...config import parse_model

        exported, details = self.export(ctx, outdir)
        engine_cfg = with_batch_limit(parse_model(TensorRTConfig, self.config.engine,
                                                  f"config of target {self.name!r}: engine"), ctx)
        cache = ctx.cache_dir / TIMING_CACHE_NAME if (ctx.cache_dir is not None and engine_cfg.timing_cache) else None
        plan = outdir / "model.plan"
        with ctx.progress.task(f"build TensorRT engine ({self.name})"):
            engine = build_engine(exported, plan, engine_cfg, "int4", calibration_sample_shapes(ctx.calibration),
                                  cache, origin=f"config of target {self.name!r}")
        return Artifact(plan, self.backend, {**details, **engine, "ops": count_ops(exported)})
