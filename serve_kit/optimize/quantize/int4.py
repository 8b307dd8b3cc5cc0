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

from pydantic import Field, field_validator

from ...errors import TargetError, TargetNotApplicable
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import count_ops, gemm_to_matmul
from .feeds import FeedReader, evenly, sample_count
from .prepare import check_written, prepare_for_quantization, require_ops


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
        # Folding dequantize-in-graph weights first turns them into the constants INT4 needs.
        details = prepare_for_quantization(ctx.onnx_fp32(), src, per_channel=False)
        details.pop("per_channel")
        rewritten = gemm_to_matmul(src, src)
        weights = matmul_weights(onnx.load(str(src), load_external_data=False), self.name)
        if cfg.method == "rtn":
            algo = mnq.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                                    accuracy_level=cfg.accuracy_level)
        elif cfg.method == "hqq":
            algo = mnq.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4)
        else:
            n = sample_count(ctx.calibration.inputs, ctx.inputs)
            reader = FeedReader(ctx.calibration.inputs, ctx.inputs, 1, evenly(n, cfg.calibration_samples))
            algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=cfg.block_size)
        path = outdir / "model.onnx"
        with ctx.progress.task(f"quantize {self.name} ({cfg.method}, block {cfg.block_size})"):
            try:
                q = mnq.MatMulNBitsQuantizer(onnx.load(str(src)), block_size=cfg.block_size,
                                             is_symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level,
                                             nodes_to_exclude=cfg.nodes_to_exclude, algo_config=algo)
                q.process()
                q.model.save_model_to_file(str(path), use_external_data_format=False)
            except Exception as e:
                raise TargetError.wrap("onnxruntime.quantization", f"INT4 ({cfg.method}) quantization", e,
                                       value=self.name) from None
        src.unlink(missing_ok=True)
        ops = count_ops(path)
        if not ops.get("MatMulNBits"):
            ks = sorted({k for k, _ in weights.values()})
            raise TargetNotApplicable(
                f"INT4 quantized no MatMul: its {len(weights)} constant MatMul weight(s) have inner sizes K = "
                f"{ks[:8]}, none a multiple of block_size={cfg.block_size} (or all are in nodes_to_exclude)",
                value=self.name, hint="a smaller block_size (16 is the least) may fit; else drop this target")
        details["written_model"] = check_written(path, "ONNX Runtime's INT4 (MatMulNBits) quantizer")
        return Artifact(path, "onnxruntime", {"method": cfg.method, "block_size": cfg.block_size,
                                              "accuracy_level": cfg.accuracy_level,
                                              "gemm_rewritten_to_matmul": rewritten, "ops": ops, **details})


def matmul_weights(model, target: str) -> dict[str, tuple[int, int]]:
    """Constant 2-D MatMul weights (node name -> (K, N)); TargetNotApplicable with the real cause
    when there are none: no MatMul at all, or MatMuls whose weights are computed or fed in."""
    from .prepare import op_census

    require_ops(model, {"MatMul"}, target, "MatMul (INT4 weight-only quantizes MatMul weights)")
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        dims = inits.get(node.input[1])
        if dims is not None and len(dims) == 2:
            out[node.name] = (dims[0], dims[1])
    if not out:
        census = op_census(model, {"MatMul"})
        raise TargetNotApplicable(
            f"the model's weights are not constants: none of its {census['main_graph'].get('MatMul', 0)} MatMul(s) "
            "multiplies by a 2-D weight stored in the model (they multiply activations, or weights computed "
            "in the graph)", value=target, hint="INT4 weight-only needs MatMul weights stored as initializers; "
                                                "drop this target for this model")
    return out
