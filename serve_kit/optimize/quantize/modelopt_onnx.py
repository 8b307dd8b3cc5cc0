"""NVIDIA Model Optimizer ONNX post-training quantization: explicit Q/DQ graphs for TensorRT.

`modelopt-int8` (max or entropy calibration), `modelopt-fp8` (E4M3) and `modelopt-int4`
(weight-only, AWQ clip / AWQ lite / RTN, block-wise) all calibrate on the real calibration set and
write an ONNX graph with QuantizeLinear/DequantizeLinear pairs. TensorRT turns such a graph into
INT8/FP8/INT4 kernels (trt-int8, trt-fp8 start from it); ONNX Runtime runs it too, which is how
these targets are validated here on the CPU, through the same gate as every other variant.

Measured with nvidia-modelopt 0.47 on the CPU (see the README's GPU section):
- Its INT8 quantizer leaves `Gemm` (2-D nn.Linear) alone; rewriting Gemm as MatMul + Add first
  (`gemm_to_matmul`, default on) lets it consider the linear layers. It still skips, on purpose,
  MatMuls TensorRT would run as a GEMV or with K or N under 16 (no Tensor Core gain).
- Its `high_precision_dtype` defaults to fp16: every non-quantized op is cast to fp16, which on
  the CPU is slower and less accurate. serve-kit defaults to fp32; `fp16` is the choice for a
  TensorRT engine on a GPU.
- INT4 AWQ on a Gemm wrote block scales whose shape ONNX Runtime rejects; after the MatMul rewrite
  it is correct. INT4 here is weight-only: DequantizeLinear on the weights, activations in float.
- Without a GPU it logs "Failed to get GPU count: NVML Shared Library Not Found" and uses numpy
  instead of cupy for INT4 (slower, same result).
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ...errors import ConversionError, TargetError, TargetNotApplicable
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import count_ops, gemm_to_matmul
from .diagnose import guarded
from .prepare import check_written, prepare_for_quantization

INSTALL_HINT = ("pip install 'serve-kit[modelopt]' (nvidia-modelopt plus the ONNX packages its ONNX "
                "path imports; not its [onnx] extra, which pins an older onnx and onnxruntime-gpu)")


def modelopt_unavailable_reason(onnx_path: bool = True) -> str | None:
    """Why Model Optimizer (its ONNX or PyTorch quantization) cannot run here, or None."""
    try:
        if onnx_path:
            import modelopt.onnx.quantization  # noqa: F401
        else:
            import modelopt.torch.quantization  # noqa: F401
    except ImportError as e:
        return f"NVIDIA Model Optimizer is not usable here ({e}); {INSTALL_HINT}"
    return None


MATMUL_GRAPH = "fp32-matmul.onnx"
"""Beside the quantized model: the float graph Model Optimizer started from (Gemm as MatMul)."""


class _ModeloptOnnxConfig(TargetConfig):
    calibration_samples: int = Field(default=256, ge=1)
    """How many calibration samples Model Optimizer runs through the model."""
    high_precision_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """The dtype of the ops left unquantized. Model Optimizer's default, fp16, is slower and less
    accurate on the CPU; choose fp16 for a TensorRT engine."""
    gemm_to_matmul: bool = True
    """Rewrite Gemm (2-D nn.Linear) as MatMul + Add first, so that the linear layers get quantized."""
    nodes_to_exclude: list[str] = Field(default_factory=list)
    """Node name patterns (regular expressions, matched from the start) kept in high precision."""
    keep_nodes: list[str] = Field(default_factory=list)
    """Exact node names kept in high precision (what the diagnosis adds)."""
    op_types_to_quantize: list[str] | None = None
    """Op types to quantize; None = Model Optimizer's default set for the mode."""


class _Diagnose(TargetConfig):
    diagnose: bool = True
    """When the gate is missed: rank the quantized nodes by how much quantizing each one alone
    costs, keep the worst in high precision until a probe of real samples reaches
    `diagnose_target_cosine`, and retry."""
    diagnose_target_cosine: float = Field(default=0.995, gt=0, le=1)
    """The probe's mean cosine to reach (above the default INT8/FP8 gate of 0.99, to leave a
    margin for the held-out evaluation set)."""
    max_diagnose_rounds: int = Field(default=2, ge=0)


class ModeloptInt8Config(_ModeloptOnnxConfig, _Diagnose):
    calibration_method: Literal["max", "entropy"] = "max"
    """Activation ranges: `max` (absolute maximum) or `entropy` (KL-divergence, TensorRT's own)."""
    disable_mha_qdq: bool = False
    """Leave the attention's own MatMuls (Q·K and scores·V) unquantized."""


class ModeloptFp8Config(_ModeloptOnnxConfig, _Diagnose):
    calibration_method: Literal["max"] = "max"
    """FP8 (E4M3) scales come from the absolute maximum."""


class ModeloptInt4Config(_ModeloptOnnxConfig):
    calibration_method: Literal["awq_clip", "awq_lite", "rtn", "rtn_dq"] = "awq_clip"
    """awq_clip: clipping search per block on the calibration activations; awq_lite: activation-aware
    scaling then clipping; rtn: round to nearest (no data); rtn_dq: the same, DequantizeLinear only."""
    block_size: int = Field(default=128, ge=16)
    """Weights per scale along K (a power of two; small models need small blocks)."""
    gemm_to_matmul: bool = True
    """INT4 quantizes MatMul weights only; Gemm must be rewritten for its linears to count."""


class _ModeloptOnnxTarget(Target):
    backend = "onnxruntime"
    mode: str

    def unavailable_reason(self, source) -> str | None:
        return super().unavailable_reason(source) or modelopt_unavailable_reason()

    def _extra_args(self, ctx: BuildContext) -> dict[str, Any]:
        return {"disable_mha_qdq": True} if getattr(self.config, "disable_mha_qdq", False) else {}

    def retry_config(self, ctx: BuildContext, artifact: Artifact, evaluation, attempt: int):
        """Sensitivity by bypass: quantization of one node is undone in the Q/DQ graph itself (its
        inputs wired past their QuantizeLinear/DequantizeLinear pair), which needs no new
        calibration. Nodes are ranked by the probe cosine each bypass alone gives; the worst are
        bypassed together, worst first, until the probe reaches `diagnose_target_cosine`; those
        nodes go into `nodes_to_exclude` and Model Optimizer quantizes again."""
        cfg = self.config
        if not getattr(cfg, "diagnose", False) or attempt > cfg.max_diagnose_rounds:
            return None
        probe = evaluation.subset(np.arange(min(len(evaluation), 48)))
        src = ctx.onnx_fp32()
        if cfg.gemm_to_matmul:
            src = artifact.path.parent / MATMUL_GRAPH
        with ctx.progress.task(f"diagnose {self.name}: per-node sensitivity"):
            plan, why = guarded(sensitivity_plan, src, artifact.path, probe, cfg.diagnose_target_cosine,
                                artifact.path.parent)
        if why:
            artifact.details["diagnosis"] = why
            ctx.progress.log(f"{self.name}: {why}", "yellow")
            return None
        if not plan["exclude"]:
            return None
        artifact.details["diagnosis"] = plan
        ctx.progress.log(f"{self.name}: keeping {len(plan['exclude'])} node(s) in {cfg.high_precision_dtype} "
                         f"(probe cosine {plan['probe_cosine_before']:.4f} -> {plan['probe_cosine_after']:.4f}) "
                         "and quantizing again", "yellow")
        return cfg.model_copy(update={"keep_nodes": [*cfg.keep_nodes, *plan["exclude"]]})

    def _build_impl(self, ctx: BuildContext, outdir: Path) -> Artifact:
        from modelopt.onnx.quantization import quantize

        cfg = self.config
        # Dequantize-in-graph weights folded, opset raised to 13, as for ONNX Runtime's quantizers.
        src = outdir / "_prepared.onnx"
        prepared = prepare_for_quantization(ctx.onnx_fp32(), src)
        prepared.pop("per_channel")
        rewritten = 0
        if cfg.gemm_to_matmul:
            rewritten = gemm_to_matmul(src, outdir / MATMUL_GRAPH)
            src.unlink()
            src = outdir / MATMUL_GRAPH
        n = min(len(ctx.calibration), cfg.calibration_samples)
        calib = {k: np.ascontiguousarray(v[:n]) for k, v in ctx.calibration.inputs.items()}
        path = outdir / "model.onnx"
        args = dict(quantize_mode=self.mode, calibration_data=calib, calibration_method=cfg.calibration_method,
                    calibration_eps=["cpu"], high_precision_dtype=cfg.high_precision_dtype,
                    nodes_to_exclude=_exclusions(cfg) or None, op_types_to_quantize=cfg.op_types_to_quantize,
                    output_path=str(path), log_level="CRITICAL", **self._extra_args(ctx))
        with ctx.progress.task(f"quantize {self.name} (Model Optimizer {cfg.calibration_method}, {n} samples)"):
            _quiet_modelopt()
            try:
                with ort_quantization_restored(), stdout_to_stderr():
                    quantize(str(src), **args)
            except Exception as e:
                raise TargetError.wrap("nvidia-modelopt", f"Model Optimizer {self.mode} quantization", e,
                                       value=self.name, hint="try another calibration_method, or exclude the "
                                       "failing nodes with nodes_to_exclude") from None
        if not path.is_file():
            raise ConversionError(f"Model Optimizer {self.mode} quantization wrote no model", value=self.name)
        ops = count_ops(path)
        if not (ops.get("DequantizeLinear") or ops.get("TRT_INT4DequantizeLinear")):
            raise TargetNotApplicable(f"Model Optimizer {self.mode} quantized nothing in this graph",
                                      value=self.name, hint="it skips MatMuls that TensorRT would run as a GEMV or "
                                      "with K or N under 16 (no Tensor Core gain); op_types_to_quantize must name "
                                      "ops the model has: " + ", ".join(sorted(count_ops(src))))
        written = check_written(path, f"Model Optimizer {self.mode}")
        return Artifact(path, self.backend, {
            "quantizer": "nvidia-modelopt", "modelopt_version": _modelopt_version(), "mode": self.mode,
            "calibration_method": cfg.calibration_method, "calibration_samples": n, "written_model": written,
            **prepared,
            "high_precision_dtype": cfg.high_precision_dtype, "gemm_rewritten_as_matmul": rewritten,
            "nodes_kept_in_float": [*cfg.nodes_to_exclude, *cfg.keep_nodes], "ops": ops},
            backend_options=ort_options_for(path))


FP8_ORT_OPTIMIZATION = "basic"
"""ONNX Runtime 1.32's CPU graph optimizer at the `extended` level and above miscomputes FP8
Q/DQ graphs: the digits CNN with FP8 Q/DQ on every layer scored 98.7 % top-1 at `basic` and 86.9 %
at `extended`/`all` (no single named transformer was the culprit). FP8 models are served at
`basic`, which is what their validation ran with."""


def ort_options_for(path: Path) -> dict[str, Any]:
    """Backend options an ONNX file needs to compute what it was validated to compute."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    fp8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
    if any(i.data_type in fp8 for i in model.graph.initializer):
        return {"graph_optimization": FP8_ORT_OPTIMIZATION}
    return {}


def quantized_nodes(model) -> dict[str, list[tuple[int, str]]]:
    """Compute nodes fed through a DequantizeLinear: node name -> [(input index, float tensor)],
    the float tensor being what the QuantizeLinear in front of that DequantizeLinear read."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, list[tuple[int, str]]] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                out.setdefault(node.name, []).append((i, q.input[0]))
    return out


def _bypassed(model, nodes: dict[str, list[tuple[int, str]]], names) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    wanted = set(names)
    for node in m.graph.node:
        if node.name in wanted:
            for i, tensor in nodes[node.name]:
                node.input[i] = tensor
    return m


RANK_SAMPLES = 16
"""Probe samples the per-node ranking runs on (the chosen prefix is checked on the whole probe)."""


def _probe_cosine(model, data, reference: list[np.ndarray]) -> float:
    import onnxruntime as ort

    from .int8 import _mean_cosine

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return _mean_cosine(reference, sess.run(None, data.inputs))


def sensitivity_plan(fp32: Path, qdq: Path, probe, target_cosine: float, workdir: Path) -> dict[str, Any]:
    """Which quantized nodes to keep in high precision for the probe to reach `target_cosine`."""
    import onnx

    from .int8 import _run_onnx

    reference = _run_onnx(fp32, probe)
    model = onnx.load(str(qdq))
    nodes = quantized_nodes(model)
    before = _probe_cosine(model, probe, reference)
    # The ranking runs once per quantized node (81 on MiniLM: 85 % of the diagnosis' time), and an
    # order needs fewer samples than a threshold does: nodes are ranked on the first RANK_SAMPLES of
    # the probe, the prefix that reaches the target is then measured on the whole probe.
    rank_probe, rank_reference, rank_before = probe, reference, before
    if len(probe) > RANK_SAMPLES:
        rank_probe = probe.subset(np.arange(RANK_SAMPLES))
        rank_reference = _run_onnx(fp32, rank_probe)
        rank_before = _probe_cosine(model, rank_probe, rank_reference)
    alone = sorted(((_probe_cosine(_bypassed(model, nodes, [n]), rank_probe, rank_reference), n) for n in nodes),
                   reverse=True)
    # Candidates: the nodes whose bypass alone helps, worst first; never all of them (that would be
    # the float model again). The smallest prefix that reaches the target is found by doubling,
    # then bisecting: about 2·log2(n) probe runs instead of n.
    ranked = [name for cos, name in alone if cos > rank_before][: max(len(nodes) - 1, 0)]
    measured: dict[int, float] = {0: before}

    def cosine_with(k: int) -> float:
        if k not in measured:
            measured[k] = _probe_cosine(_bypassed(model, nodes, ranked[:k]), probe, reference)
        return measured[k]

    lo, hi = 0, None
    k = 1
    while k <= len(ranked):
        if cosine_with(k) >= target_cosine:
            hi = k
            break
        lo, k = k, k * 2
    if hi is None and ranked and len(ranked) > lo:
        hi = len(ranked) if cosine_with(len(ranked)) >= target_cosine else None
    if hi is None:  # the target is out of reach: keep the best prefix measured
        best = max(measured, key=lambda i: (measured[i], -i))
        chosen = ranked[:best]
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cosine_with(mid) >= target_cosine:
                hi = mid
            else:
                lo = mid
        chosen = ranked[:hi]
    after = measured[len(chosen)]
    return {"probe_samples": len(probe), "rank_samples": len(rank_probe), "quantized_nodes": len(nodes),
            "probe_cosine_before": round(before, 6),
            "probe_cosine_after": round(after, 6), "exclude": chosen,
            "ranking": [{"node": n, "cosine_if_kept": round(c, 6)} for c, n in alone[:16]]}


_PATCHED = {
    "calibrate.MinMaxCalibrater": ("augment_graph", "collect_data", "compute_data", "merge_range"),
    "calibrate.HistogramCalibrater": ("augment_graph", "collect_data"),
    "calibrate.HistogramCollector": ("collect", "collect_value", "collect_absolute_value"),
    "calibrate.CalibraterBase": ("__init__", "create_inference_session", "select_tensors_to_calibrate"),
    "calibrate": ("create_calibrator",),
    "qdq_quantizer.QDQQuantizer": ("check_opset_version",),
    "base_quantizer.BaseQuantizer": ("adjust_tensor_ranges",),
}
_MISSING = object()


@contextlib.contextmanager
def ort_quantization_restored():
    """Model Optimizer patches ONNX Runtime's calibrators, quantizers and op registries in place,
    for the rest of the process (modelopt/onnx/quantization/ort_patching.py, ort_utils.py). After a
    modelopt target had run, ONNX Runtime's own static INT8 (onnx-int8-static) failed with
    "Quantization parameters are not specified", or quantized other ops. Everything it patches is
    put back when its quantize() returns."""
    import importlib

    saved = []
    for path, names in _PATCHED.items():
        module, _, cls = path.partition(".")
        obj = importlib.import_module(f"onnxruntime.quantization.{module}")
        if cls:
            obj = getattr(obj, cls)
        saved += [(obj, n, vars(obj).get(n, _MISSING)) for n in names]
    # It also edits ONNX Runtime's op registries (which ops get Q/DQ), in place.
    from onnxruntime.quantization import registry

    registries = {name: dict(getattr(registry, name)) for name in vars(registry) if name.endswith("OpsRegistry")
                  or name == "QDQRegistry"}
    try:
        yield
    finally:
        for name, content in registries.items():
            live = getattr(registry, name)
            live.clear()
            live.update(content)
        for obj, name, value in saved:
            if value is _MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def stdout_to_stderr():
    """Model Optimizer and the Polygraphy / graphsurgeon code under it print progress ("Inserted 14
    quantizers", "[W] ...") to stdout, where `serve-kit --json` writes its report: send file
    descriptor 1 to stderr for the duration (C-level writes included)."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _exclusions(cfg) -> list[str]:
    """Model Optimizer matches nodes_to_exclude as regular expressions from the start of a name:
    exact names are escaped and anchored, so that node_MatMul_8 does not also exclude node_MatMul_88."""
    return [*cfg.nodes_to_exclude, *(f"{re.escape(n)}$" for n in cfg.keep_nodes)]


def _modelopt_version() -> str:
    from importlib import metadata

    return metadata.version("nvidia-modelopt")


def _quiet_modelopt() -> None:
    # Model Optimizer logs through its own logger at INFO and prints a stack of warnings about a
    # missing GPU; the pipeline's progress output is what the user reads.
    logging.getLogger("modelopt").setLevel(logging.ERROR)


@register_target
class ModeloptInt8Target(_ModeloptOnnxTarget):
    name = "modelopt-int8"
    precision = "int8"
    mode = "int8"
    Config = ModeloptInt8Config


@register_target
class ModeloptFp8Target(_ModeloptOnnxTarget):
    name = "modelopt-fp8"
    precision = "fp8"
    mode = "fp8"
    Config = ModeloptFp8Config


@register_target
class ModeloptInt4Target(_ModeloptOnnxTarget):
    name = "modelopt-int4"
    precision = "int4"
    mode = "int4"
    Config = ModeloptInt4Config

    def _extra_args(self, ctx: BuildContext) -> dict[str, Any]:
        return {"block_size": self.config.block_size}
