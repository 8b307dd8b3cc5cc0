"""INT4 weight-only quantization (ONNX Runtime MatMulNBits), block-wise.

Methods: `rtn` (round-to-nearest, ORT's native block quantizer), `hqq` (half-quadratic: an
optimizer fits scales/zero points to each weight) and `gptq` (data-aware: uses the calibration set
to compensate rounding error through the layer's input Hessian). Only MatMul nodes are rewritten,
so Gemm (2-D nn.Linear) is first turned into MatMul + Add. `accuracy_level=4` (int8 compute of the
activations) was several times faster here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from pydantic import Field, field_validator

from ...errors import ConversionError
from ..calibration import ReaderAdapter
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import count_ops, gemm_to_matmul


class Int4Config(TargetConfig):
    method: Literal["rtn", "hqq", "gptq"] = "rtn"
    """rtn: no data; hqq: weight-fitting optimizer; gptq: data-aware (calibration set)."""
    block_size: int = 32
    """Weights per scale along K (power of two, >= 16)."""
    symmetric: bool = False
    """Symmetric (no zero point) or asymmetric blocks (rtn only)."""
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    """MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest on CPU)."""
    nodes_to_exclude: list[str] = Field(default_factory=list)
    calibration_samples: int = Field(default=128, ge=1)
    """gptq: how many calibration samples drive the Hessian."""

    @field_validator("block_size")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {v}")
        return v


@register_target
class Int4Target(Target):
    name = "onnx-int4"
    precision = "int4"
    backend = "onnxruntime"
    Config = Int4Config

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        cfg: Int4Config = self.config
        src = outdir / "fp32.onnx"
        rewritten = gemm_to_matmul(ctx.onnx_fp32(), src)
        if cfg.method == "rtn":
            algo = mnq.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                                    accuracy_level=cfg.accuracy_level)
        elif cfg.method == "hqq":
            algo = mnq.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4)
        else:
            sub = ctx.calibration.subset(np.arange(min(len(ctx.calibration), cfg.calibration_samples)))
            algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=ReaderAdapter(sub, 1),
                                                 block_size=cfg.block_size)
        path = outdir / "model.onnx"
        with ctx.progress.task(f"quantize {self.name} ({cfg.method}, block {cfg.block_size})"):
            try:
                q = mnq.MatMulNBitsQuantizer(onnx.load(str(src)), block_size=cfg.block_size,
                                             is_symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level,
                                             nodes_to_exclude=cfg.nodes_to_exclude, algo_config=algo)
                q.process()
                q.model.save_model_to_file(str(path), use_external_data_format=False)
            except Exception as e:
                raise ConversionError(f"INT4 ({cfg.method}) quantization failed: "
                                      f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}",
                                      value=str(src)) from None
        src.unlink(missing_ok=True)
        ops = count_ops(path)
        if not ops.get("MatMulNBits"):
            raise ConversionError("INT4 quantized no node: the model has no MatMul with a constant weight "
                                  f"whose inner size is a multiple of block_size={cfg.block_size}",
                                  value=self.name, hint="try a smaller block_size, or drop this target")
        return Artifact(path, "onnxruntime", {"method": cfg.method, "block_size": cfg.block_size,
                                              "accuracy_level": cfg.accuracy_level,
                                              "gemm_rewritten_to_matmul": rewritten, "ops": ops})
