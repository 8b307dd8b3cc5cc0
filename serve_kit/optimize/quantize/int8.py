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

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ...errors import TargetError, TargetNotApplicable
from ..calibration import Dataset
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import count_ops, gemm_to_matmul, is_large, model_inputs
from .diagnose import MAX_SAMPLES, guarded, tensor_sqnr
from .feeds import (FeedReader, activation_bytes, budget_bytes, evenly, plan_calibration, sample_count, subset,
                    take)
from .prepare import check_written, prepare_for_quantization, require_ops


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
    diagnose_samples: int = Field(default=MAX_SAMPLES, ge=1, le=256)
    """Samples the diagnosis ranks tensors and measures trials on (it streams them, a few at a time)."""


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



STATIC_COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention"}
"""What makes static INT8 worth it: Q/DQ around only Relu or Reshape would quantize nothing."""
FLOAT_INPUT = "_float_input.onnx"
"""Beside the quantized model: the float graph the quantizer started from (folded, opset raised,
pre-processed), which the diagnosis compares against node by node."""


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def _preprocess(src: Path, dst: Path, skip_symbolic_shape: bool) -> tuple[Path, str | None]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic_shape)
        return dst, None
    except Exception as e:  # pre-processing is an optimization; quantize the plain model if it fails
        return src, f"skipped: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _first_sample(ctx: BuildContext) -> dict[str, np.ndarray]:
    return take(ctx.calibration.inputs, ctx.inputs, np.arange(1))


@register_target
class Int8StaticTarget(Target):
    name = "onnx-int8-static"
    precision = "int8"
    backend = "onnxruntime"
    Config = Int8StaticConfig

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        import onnx

        cfg: Int8StaticConfig = self.config
        fp32 = ctx.onnx_fp32()
        prepared = outdir / "_prepared.onnx"
        details = prepare_for_quantization(fp32, prepared, per_channel=cfg.per_channel)
        wanted = set(cfg.op_types) if cfg.op_types else STATIC_COMPUTE_OPS
        census = require_ops(onnx.load(str(prepared), load_external_data=False), wanted, self.name,
                             "op that static INT8 quantizes")
        details["quantizable_ops"] = census["main_graph"]
        if census["subgraphs"]:  # ORT's quantizer does not enter If/Loop bodies: say what stays float
            details["left_in_float_inside_subgraphs"] = census["subgraphs"]
        src = prepared
        if cfg.preprocess:
            src, note = _preprocess(prepared, outdir / "_preprocessed.onnx", cfg.skip_symbolic_shape)
            if note:
                details["preprocess"] = note
        float_input = outdir / FLOAT_INPUT
        src.replace(float_input)
        prepared.unlink(missing_ok=True)

        plan = self._plan(ctx, float_input, outdir, cfg)
        details["calibration"] = plan.describe(sample_count(ctx.calibration.inputs, ctx.inputs))
        used = len(plan.index)
        note = f", {used} of {details['calibration']['samples_given']} samples" if used < details["calibration"][
            "samples_given"] else f", {used} samples"
        path = outdir / "model.onnx"
        with ctx.progress.task(f"calibrate {self.name} ({cfg.calibration_method}{note})"):
            self._quantize(float_input, path, ctx, cfg, plan.index, plan.batch_size, details["per_channel"])
        ops = count_ops(path)
        if not ops.get("QuantizeLinear") and not ops.get("DequantizeLinear"):
            raise TargetNotApplicable("ONNX Runtime's static quantizer quantized no node of this graph "
                                      f"(ops it could quantize: {details['quantizable_ops']})", value=self.name,
                                      hint="the weights may not be constants, or the ops' inputs not float")
        details["written_model"] = check_written(path, "ONNX Runtime's static INT8 quantizer")
        return Artifact(path, "onnxruntime", {
            "calibration_method": cfg.calibration_method, "per_channel": details.pop("per_channel"),
            "activation_type": cfg.activation_type, "weight_type": cfg.weight_type,
            "nodes_kept_in_float": list(cfg.nodes_to_exclude), "ops": count_ops(path), **details})

    def _plan(self, ctx: BuildContext, model: Path, workdir: Path, cfg: Int8StaticConfig):
        total = sample_count(ctx.calibration.inputs, ctx.inputs)
        try:
            per_sample = activation_bytes(model, _first_sample(ctx), workdir)
        except Exception as e:
            raise TargetError.wrap("onnxruntime", "running the float model on one calibration sample", e,
                                   value=self.name) from None
        return plan_calibration(per_sample, total, cfg.calibration_batch_size, cfg.calibration_method,
                                budget_bytes(ctx.memory_budget), self.name)

    def _quantize(self, src: Path, dst: Path, ctx: BuildContext, cfg: Int8StaticConfig, index: np.ndarray,
                  batch_size: int, per_channel: bool) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
        extra = {"CalibPercentile": cfg.percentile} if cfg.calibration_method == "percentile" else {}
        reader = FeedReader(ctx.calibration.inputs, ctx.inputs, batch_size, index, equal_batches=True,
                            names=model_inputs(src))
        try:
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            use_external_data_format=is_large(src),
                            activation_type=_qtype(cfg.activation_type), weight_type=_qtype(cfg.weight_type),
                            calibrate_method=method, op_types_to_quantize=cfg.op_types,
                            nodes_to_exclude=cfg.nodes_to_exclude, extra_options=extra)
        except MemoryError:
            raise TargetNotApplicable(f"static INT8 calibration ran out of memory at batch {batch_size}",
                                      value=self.name, hint="lower --max-memory or calibration_batch_size") from None
        except Exception as e:
            raise TargetError.wrap("onnxruntime.quantization", "static INT8 quantization", e, value=self.name,
                                   hint="try another calibration_method, or keep the failing node in float "
                                        "(nodes_to_exclude)") from None

    def retry_config(self, ctx: BuildContext, artifact: Artifact, evaluation: Dataset, attempt: int):
        """Per-node sensitivity: for the tensors quantization hurts most (cheap SQNR ranking), try
        keeping the nodes around each one in float, measure the model's output on real samples,
        and keep the group that recovers the most. Each retry adds one more group. Any failure of
        the diagnosis is recorded as `diagnosis unavailable: <reason>` and ends the retries."""
        cfg: Int8StaticConfig = self.config
        if not cfg.diagnose or attempt > cfg.max_diagnose_rounds:
            return None
        result, why = guarded(self._diagnose, ctx, artifact, evaluation)
        if why:
            artifact.details["diagnosis"] = why
            ctx.progress.log(f"{self.name}: {why}", "yellow")
            return None
        return result

    def _diagnose(self, ctx: BuildContext, artifact: Artifact, evaluation: Dataset):
        cfg: Int8StaticConfig = self.config
        kept = set(cfg.nodes_to_exclude)
        float_input = artifact.path.parent / FLOAT_INPUT
        if not float_input.is_file():
            return None
        calibration = artifact.details.get("calibration", {})
        per_sample = max(1, int(calibration.get("activation_bytes_per_sample", 1)))
        budget = budget_bytes(ctx.memory_budget)
        # Both sessions' paired tensors for a batch, with ORT's own activations on top.
        batch = int(max(1, min(8, budget // (3 * per_sample))))
        with ctx.progress.task(f"diagnose {self.name}: rank quantized tensors by SQNR"):
            ranked, info = tensor_sqnr(float_input, artifact.path, evaluation.inputs, ctx.inputs,
                                       artifact.path.parent, batch_size=batch, max_samples=cfg.diagnose_samples)
        ranking = [r for r in ranked if not set(r[2]) <= kept][: cfg.diagnose_candidates]
        if not ranking:
            artifact.details["diagnosis"] = {"sqnr": info, "trials": [], "keep_in_float_next": []}
            return None
        n_eval = sample_count(evaluation.inputs, ctx.inputs)
        probe = subset(evaluation.inputs, ctx.inputs, evenly(n_eval, cfg.diagnose_samples))
        n_cal = sample_count(ctx.calibration.inputs, ctx.inputs)
        used = int(calibration.get("samples_used", n_cal))
        cal_index = evenly(n_cal, min(used, 4 * cfg.diagnose_samples))
        cal_batch = int(calibration.get("batch_size", cfg.calibration_batch_size))
        if cfg.calibration_method in ("entropy", "percentile"):
            if len(cal_index) >= cal_batch:
                cal_index = cal_index[: len(cal_index) - len(cal_index) % cal_batch]
            cal_batch = min(cal_batch, len(cal_index))
        reference = run_onnx(float_input, probe, ctx.inputs, batch)
        trials = []
        with ctx.progress.task(f"diagnose {self.name}: per-node sensitivity", len(ranking)) as advance:
            for tensor, sqnr, nodes in ranking:
                trial_cfg = cfg.model_copy(update={"nodes_to_exclude": sorted(kept | set(nodes))})
                path = artifact.path.parent / "_trial.onnx"
                self._quantize(float_input, path, ctx, trial_cfg, cal_index, cal_batch,
                               bool(artifact.details.get("per_channel", cfg.per_channel)))
                # A "quantized" model with nothing left quantized is the float model again: no trial.
                if count_ops(path).get("QuantizeLinear"):
                    trials.append((_mean_cosine(reference, run_onnx(path, probe, ctx.inputs, batch)), tensor, sqnr,
                                   nodes))
                path.unlink(missing_ok=True)
                advance(1)
        if not trials:
            artifact.details["diagnosis"] = {"sqnr": info, "trials": [], "keep_in_float_next": []}
            return None
        trials.sort(key=lambda t: -t[0])
        best_cos, tensor, _, nodes = trials[0]
        new_nodes = sorted(set(nodes) - kept)
        artifact.details["diagnosis"] = {
            "sqnr": info, "probe_samples": sample_count(probe, ctx.inputs),
            "trials": [{"tensor": t, "sqnr_db": round(q, 2), "nodes": n, "cosine_if_kept_in_float": round(c, 6)}
                       for c, t, q, n in trials],
            "keep_in_float_next": new_nodes}
        ctx.progress.log(f"{self.name}: quantizing {tensor!r} hurts most; keeping {new_nodes} in float "
                         f"(probe cosine {best_cos:.4f}) and retrying", "yellow")
        return cfg.model_copy(update={"nodes_to_exclude": [*cfg.nodes_to_exclude, *new_nodes]})


def run_onnx(path: Path, inputs: dict[str, np.ndarray], specs, batch_size: int = 16) -> list[np.ndarray]:
    """The model's outputs over named arrays, `batch_size` samples at a time, concatenated along
    axis 0 (a comparison only needs them aligned, not in the model's own layout)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    parts: list[list[np.ndarray]] = []
    rows: list[int] = []
    reader = FeedReader(inputs, specs, batch_size, names=sorted(wanted))
    for start in range(0, reader.limit, reader.batch_size):
        feed = reader.get_next()
        parts.append(sess.run(None, feed))
        rows.append(min(reader.batch_size, reader.limit - start))
    out = []
    for k in range(len(parts[0])):
        chunks = [np.asarray(p[k]) for p in parts]
        # One row per sample where the output splits so (it may hold the batch on any axis: the
        # rows are then mixed, but identically for both models compared); else one long row.
        if all(c.size % n == 0 for c, n in zip(chunks, rows)) and len({c.size // n for c, n in zip(chunks, rows)}) == 1:
            out.append(np.concatenate([c.reshape(n, -1) for c, n in zip(chunks, rows)]))
        else:
            out.append(np.concatenate([c.reshape(-1) for c in chunks]).reshape(1, -1))
    return out


def _run_onnx(path: Path, data: Dataset) -> list[np.ndarray]:
    """The whole Dataset in one call (Model Optimizer's probe: small sets of batch-first arrays)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, data.inputs)


def _mean_cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The worst output's mean per-row cosine; for rows of under 16 values (a probability, a
    score) the cosine across all rows instead: the cosine of one value with itself is always 1."""
    cos = []
    for r, g in zip(ref, got):
        a, b = r.reshape(len(r), -1).astype(np.float64), g.reshape(len(g), -1).astype(np.float64)
        if a.shape[1] < 16:
            a, b = a.reshape(1, -1), b.reshape(1, -1)
        denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        cos.append(float(np.mean(np.sum(a * b, axis=1) / denom)))
    return min(cos)


@register_target
class Int8DynamicTarget(Target):
    name = "onnx-int8-dynamic"
    precision = "int8"
    backend = "onnxruntime"
    Config = Int8DynamicConfig

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        import onnx
        from onnxruntime.quantization import quantize_dynamic

        cfg: Int8DynamicConfig = self.config
        src = outdir / "fp32.onnx"
        details = prepare_for_quantization(ctx.onnx_fp32(), src, per_channel=cfg.per_channel)
        wanted = set(cfg.op_types) | ({"Gemm"} if cfg.gemm_to_matmul else set())
        census = require_ops(onnx.load(str(src), load_external_data=False), wanted, self.name,
                             "op that dynamic INT8 quantizes")
        if census["subgraphs"]:
            details["left_in_float_inside_subgraphs"] = census["subgraphs"]
        rewritten = gemm_to_matmul(src, src) if cfg.gemm_to_matmul else 0
        per_channel = details.pop("per_channel")
        path = outdir / "model.onnx"
        with ctx.progress.task(f"quantize {self.name}"):
            try:
                quantize_dynamic(str(src), str(path), per_channel=per_channel,
                                 weight_type=_qtype(cfg.weight_type), op_types_to_quantize=cfg.op_types,
                                 reduce_range=cfg.reduce_range, use_external_data_format=is_large(src))
            except Exception as e:
                raise TargetError.wrap("onnxruntime.quantization", "dynamic INT8 quantization", e,
                                       value=self.name) from None
        src.unlink(missing_ok=True)
        ops = count_ops(path)
        quantized = sum(v for k, v in ops.items()
                        if "Integer" in k or k.startswith("DynamicQuantize") or k == "QAttention")
        if not quantized:
            raise TargetNotApplicable(f"dynamic INT8 quantized no node: none of {cfg.op_types} has constant "
                                      "weights it can quantize", value=self.name,
                                      hint="dynamic INT8 quantizes weights stored in the model; set `op_types`"
                                           " to op types the model has")
        details["written_model"] = check_written(path, "ONNX Runtime's dynamic INT8 quantizer")
        return Artifact(path, "onnxruntime", {"per_channel": per_channel, "op_types": cfg.op_types,
                                              "gemm_rewritten_to_matmul": rewritten, "ops": ops, **details})
