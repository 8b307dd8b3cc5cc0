"""INT8 post-training quantization with ONNX Runtime: static (QDQ, calibrated) and dynamic.

Measured on this CPU (see README): static QDQ with per-channel int8 weights and uint8 activations
is the fast choice for convolutions; int8 activations were slower for Conv; dynamic quantization
made convolutions 2-10x slower (ConvInteger), so the dynamic target quantizes only MatMul-like
ops by default. One mode is never applied blindly to every op type.

Transformers (all-MiniLM-L6-v2, batch 1, sequence 128, ORT 1.32, AVX-512 VNNI): dynamic INT8 of
the weight MatMuls is the fast and accurate choice, about 2.1x faster than FP32 on one thread
with cosine 0.993 per-channel. Running ORT's transformer optimizer first (Attention fused, then
QAttention) was slower, 8.3 vs 7.4 ms, so it is not offered; static QDQ of every MatMul lost too
much (cosine 0.937 minmax, 0.837 percentile: activation outliers).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ...errors import ConversionError
from ..calibration import Dataset, ReaderAdapter
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import count_ops, gemm_to_matmul


class Int8StaticConfig(TargetConfig):
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """How activation ranges are chosen from the calibration set."""
    percentile: float = Field(default=99.999, gt=90, le=100)
    """For `percentile`: the percentile of |activation| kept in range."""
    per_channel: bool = True
    """Per-output-channel weight scales (much better accuracy for convolutions)."""
    activation_type: Literal["uint8", "int8"] = "uint8"
    """uint8 activations were faster for convolutions on this CPU."""
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types: list[str] | None = None
    """Op types to quantize; None = every op type ONNX Runtime can quantize."""
    nodes_to_exclude: list[str] = Field(default_factory=list)
    """Nodes kept in float (filled in by the diagnosis when a gate is missed)."""
    preprocess: bool = True
    """Run ORT's quant_pre_process (shape inference, graph cleanup) first."""
    skip_symbolic_shape: bool = True
    """Symbolic shape inference fails on BERT-like graphs; plain ONNX shape inference suffices."""
    calibration_batch_size: int = Field(default=16, ge=1)
    diagnose: bool = True
    """When the gate is missed: find the nodes with the largest quantization error, keep them in
    float and retry (up to `max_diagnose_rounds`)."""
    max_diagnose_rounds: int = Field(default=3, ge=0)
    diagnose_candidates: int = Field(default=8, ge=1)
    """How many of the worst-ranked tensors get a measured trial per round (one quantization each)."""


class Int8DynamicConfig(TargetConfig):
    per_channel: bool = True
    """Per-channel weight scales (MiniLM: cosine 0.993 vs 0.969 per-tensor)."""
    weight_type: Literal["int8", "uint8"] = "int8"
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Attention", "LSTM", "GRU"])
    """Op types to quantize. Conv is left out on purpose: ConvInteger was 2-10x slower here."""
    gemm_to_matmul: bool = True
    """Rewrite Gemm (nn.Linear) as MatMul + Add so that it gets quantized."""
    reduce_range: bool = False
    """7-bit weights, for CPUs without VNNI (avoids saturation in the u8s8 kernels)."""


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def _preprocess(src: Path, dst: Path, skip_symbolic_shape: bool) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic_shape)
        return dst
    except Exception:  # pre-processing is an optimization; quantize the plain model if it fails
        return src


@register_target
class Int8StaticTarget(Target):
    name = "onnx-int8-static"
    precision = "int8"
    backend = "onnxruntime"
    Config = Int8StaticConfig

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        cfg: Int8StaticConfig = self.config
        fp32 = ctx.onnx_fp32()
        src = _preprocess(fp32, outdir / "preprocessed.onnx", cfg.skip_symbolic_shape) if cfg.preprocess else fp32
        path = outdir / "model.onnx"
        with ctx.progress.task(f"calibrate {self.name} ({cfg.calibration_method}, {len(ctx.calibration)} samples)"):
            try:
                self._quantize(src, path, ctx.calibration, cfg)
            except Exception as e:
                raise ConversionError(f"static INT8 quantization failed: {str(e).strip().splitlines()[0][:300]}",
                                      value=str(fp32)) from None
        if src != fp32:
            src.unlink(missing_ok=True)
        return Artifact(path, "onnxruntime", {
            "calibration_method": cfg.calibration_method, "per_channel": cfg.per_channel,
            "activation_type": cfg.activation_type, "weight_type": cfg.weight_type,
            "nodes_kept_in_float": list(cfg.nodes_to_exclude), "ops": count_ops(path)})

    def _quantize(self, src: Path, dst: Path, calibration: Dataset, cfg: Int8StaticConfig) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
        extra = {"CalibPercentile": cfg.percentile} if cfg.calibration_method == "percentile" else {}
        quantize_static(str(src), str(dst), ReaderAdapter(calibration, cfg.calibration_batch_size, equal_batches=True),
                        quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                        activation_type=_qtype(cfg.activation_type), weight_type=_qtype(cfg.weight_type),
                        calibrate_method=method, op_types_to_quantize=cfg.op_types,
                        nodes_to_exclude=cfg.nodes_to_exclude, extra_options=extra)

    def retry_config(self, ctx: BuildContext, artifact: Artifact, evaluation: Dataset, attempt: int):
        """Per-node sensitivity: for the tensors quantization hurts most (cheap SQNR ranking), try
        keeping the nodes around each one in float, measure the model's output on real samples,
        and keep the group that recovers the most. Each retry adds one more group."""
        cfg: Int8StaticConfig = self.config
        if not cfg.diagnose or attempt > cfg.max_diagnose_rounds:
            return None
        kept = set(cfg.nodes_to_exclude)
        fp32 = ctx.onnx_fp32()
        with ctx.progress.task(f"diagnose {self.name}: rank quantized tensors by SQNR"):
            ranking = [r for r in tensor_sqnr(fp32, artifact.path, evaluation, artifact.path.parent)
                       if not set(r[2]) <= kept][: cfg.diagnose_candidates]
        if not ranking:
            return None
        probe = evaluation.subset(np.arange(min(len(evaluation), 128)))
        calib = ctx.calibration.subset(np.arange(min(len(ctx.calibration), 128)))
        reference = _run_onnx(fp32, probe)
        trials = []
        with ctx.progress.task(f"diagnose {self.name}: per-node sensitivity", len(ranking)) as advance:
            for tensor, sqnr, nodes in ranking:
                trial_cfg = cfg.model_copy(update={"nodes_to_exclude": sorted(kept | set(nodes))})
                path = artifact.path.parent / "_trial.onnx"
                self._quantize(fp32, path, calib, trial_cfg)
                # A "quantized" model with nothing left quantized is the float model again: no trial.
                if count_ops(path).get("QuantizeLinear"):
                    trials.append((_mean_cosine(reference, _run_onnx(path, probe)), tensor, sqnr, nodes))
                path.unlink(missing_ok=True)
                advance(1)
        if not trials:
            return None
        trials.sort(key=lambda t: -t[0])
        best_cos, tensor, _, nodes = trials[0]
        new_nodes = sorted(set(nodes) - kept)
        artifact.details["diagnosis"] = {
            "trials": [{"tensor": t, "sqnr_db": round(q, 2), "nodes": n, "cosine_if_kept_in_float": round(c, 6)}
                       for c, t, q, n in trials],
            "keep_in_float_next": new_nodes}
        ctx.progress.log(f"{self.name}: quantizing {tensor!r} hurts most; keeping {new_nodes} in float "
                         f"(probe cosine {best_cos:.4f}) and retrying", "yellow")
        return cfg.model_copy(update={"nodes_to_exclude": [*cfg.nodes_to_exclude, *new_nodes]})


def _run_onnx(path: Path, data: Dataset) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, data.inputs)


def _mean_cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    cos = []
    for r, g in zip(ref, got):
        a, b = r.reshape(len(r), -1).astype(np.float64), g.reshape(len(g), -1).astype(np.float64)
        denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        cos.append(float(np.mean(np.sum(a * b, axis=1) / denom)))
    return min(cos)


def tensor_sqnr(fp32: Path, qdq: Path, data: Dataset, workdir: Path,
                max_samples: int = 64) -> list[tuple[str, float, list[str]]]:
    """Quantized tensors ranked by signal-to-quantization-noise ratio (dB), worst first, each with
    the float model's nodes that must stay in float to leave it unquantized: its producer and its
    consumers (QDQ quantizes a tensor when either side is quantized, and ORT folds Relu into the
    producer). Cheap but blind to outlier channels, which inflate a tensor's signal power; hence
    only a ranking of candidates that the per-node trials then measure.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, compute_weight_error, create_activation_matching,
        create_weight_matching, modify_model_output_intermediate_tensors)

    sub = data.subset(np.arange(min(len(data), max_samples)))
    acts = {}
    for which, model in (("qdq", qdq), ("float", fp32)):
        aug = workdir / f"_debug_{which}.onnx"
        modify_model_output_intermediate_tensors(str(model), str(aug))
        acts[which] = collect_activations(str(aug), ReaderAdapter(sub, 16))
        aug.unlink(missing_ok=True)
    matching = create_activation_matching(acts["qdq"], acts["float"])
    errors = {k: v["qdq_err"] for k, v in compute_activation_error(matching).items()}
    weight_errors = compute_weight_error(create_weight_matching(str(fp32), str(qdq)))

    graph = onnx.load(str(fp32), load_external_data=False).graph
    producer: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for o in node.output:
            producer[o] = node.name
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)
    ranked = []
    for tensor, sqnr in [*errors.items(), *weight_errors.items()]:
        nodes = [producer[tensor]] if tensor in producer and tensor not in weight_errors else []
        nodes += consumers.get(tensor, [])
        if nodes:
            ranked.append((tensor, float(sqnr) if np.isfinite(sqnr) else 1e9, sorted(set(nodes))))
    return sorted(ranked, key=lambda r: r[1])


@register_target
class Int8DynamicTarget(Target):
    name = "onnx-int8-dynamic"
    precision = "int8"
    backend = "onnxruntime"
    Config = Int8DynamicConfig

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        from onnxruntime.quantization import quantize_dynamic

        cfg: Int8DynamicConfig = self.config
        src = outdir / "fp32.onnx"
        rewritten = gemm_to_matmul(ctx.onnx_fp32(), src) if cfg.gemm_to_matmul else 0
        if not cfg.gemm_to_matmul:
            shutil.copyfile(ctx.onnx_fp32(), src)
        path = outdir / "model.onnx"
        with ctx.progress.task(f"quantize {self.name}"):
            try:
                quantize_dynamic(str(src), str(path), per_channel=cfg.per_channel,
                                 weight_type=_qtype(cfg.weight_type), op_types_to_quantize=cfg.op_types,
                                 reduce_range=cfg.reduce_range)
            except Exception as e:
                raise ConversionError(f"dynamic INT8 quantization failed: {str(e).strip().splitlines()[0][:300]}",
                                      value=str(src)) from None
        src.unlink(missing_ok=True)
        ops = count_ops(path)
        quantized = sum(v for k, v in ops.items() if "Integer" in k or k.startswith("DynamicQuantize"))
        if not quantized:
            raise ConversionError(f"dynamic INT8 quantized no node (op types {cfg.op_types} absent)",
                                  value=self.name, hint="set `op_types` in the target's config")
        return Artifact(path, "onnxruntime", {"per_channel": cfg.per_channel, "op_types": cfg.op_types,
                                              "gemm_rewritten_to_matmul": rewritten, "ops": ops})
