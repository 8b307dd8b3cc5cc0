"""ONNX FP32 vs INT8 for the `minilm` recipe: latency at batch 1, sequence 128, and cosine.

Both models run in one process, in alternating windows (the order flips every window), so that
both see the same machine noise: a shared or throttled CPU slows whichever model runs at that
moment, and interleaving spreads that evenly. Each window's median is kept; the ratio is the
median of the per-window FP32/INT8 ratios (paired, so drift cancels).

The two sessions share ONNX Runtime's global thread pool. With a pool each (what serve-kit's
backend creates for its one model), the pool of the model that just ran kept spinning and took a
core from the other: INT8 measured 7.7-8.6 ms in windows right after FP32 and 4.3-4.6 ms
otherwise (2 threads), which says nothing about either model. A shared pool is what one model
alone in a process sees: same threads, same spinning, same graph optimizations (serve-kit's
session options). Each threads setting is measured in its own child process, because the global
pool is sized once per process.

Where the models come from:
  --repository DIR   the latest versions of the model in a repository written by
                     `serve-kit optimize --recipe minilm` (manifest `variant` onnx for FP32,
                     precision int8 for INT8); whichever is not there is built as below.
  (default)          built here with the recipe's own `onnx` and INT8 target configs.

Cosine: each model's embeddings of the recipe's 256 held-out sentences against PyTorch
(mean and minimum per sentence), plus INT8 against FP32.

    .venv/bin/python benchmarks/minilm_int8.py
    .venv/bin/python benchmarks/minilm_int8.py --repository model-repository --threads 0,1 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

RECIPE = "minilm"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def from_repository(root: Path, model: str, int8_variant: str | None = None) -> dict[str, Path]:
    """{'fp32': path, 'int8': path} for the latest version of each kind found in the repository;
    int8 is any INT8 precision, or only the variant `int8_variant` when given."""
    from serve_kit.repository import Repository

    found: dict[str, Path] = {}
    for info in Repository(root).versions(model):  # ascending: later versions overwrite earlier
        m = info.manifest or {}
        if m.get("backend") != "onnxruntime" or not info.model_file:
            continue
        if m.get("variant") == "onnx":
            found["fp32"] = info.model_file
        elif m.get("variant") == int8_variant if int8_variant else m.get("precision") == "int8":
            found["int8"] = info.model_file
    return found


def build_missing(recipe, source, calibration, missing: list[str], workdir: Path, log) -> dict[str, Path]:
    """Build the FP32 (`onnx`) and/or the recipe's first INT8 target with the recipe's configs."""
    from serve_kit.optimize.target import BuildContext, target_class

    specs = {t.name: t for t in recipe.targets}
    int8 = next((t for t in recipe.targets if target_class(t.name).precision == "int8"), None)
    wanted = {"fp32": specs.get("onnx"), "int8": int8}
    ctx = BuildContext(source, recipe.inputs, recipe.outputs, calibration, workdir)
    out = {}
    for kind in missing:
        spec = wanted[kind]
        name, config = (spec.name, spec.config) if spec else ("onnx", {})
        t0 = time.perf_counter()
        out[kind] = target_class(name)(config).build(ctx, workdir / name).path
        log(f"built {kind} ({name}) in {time.perf_counter() - t0:.1f} s")
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def interleaved(runners: dict, inputs: dict, windows: int, runs: int, warmup: int = 10) -> dict[str, list[float]]:
    """Per-window median latency (ms) of each runner; the order within a window flips every window."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name](inputs)
    medians: dict[str, list[float]] = {n: [] for n in names}
    for w in range(windows):
        for name in (names if w % 2 == 0 else names[::-1]):
            fn, times = runners[name], []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(inputs)
                times.append(time.perf_counter() - t0)
            medians[name].append(float(np.median(times)) * 1e3)
    return medians


def measure_child(fp32: str, int8: str, threads: int, batch: int, seq: int, windows: int, runs: int) -> dict:
    """Runs in a fresh process: the global thread pool must be sized before the first session."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    from serve_kit.recipes import minilm
    from serve_kit.runtime.backends.onnxruntime import DEFAULT_DISABLED_OPTIMIZERS, session_options

    _pybind_state.set_global_thread_pool_sizes(threads, 1)
    runners = {}
    for kind, path in (("fp32", fp32), ("int8", int8)):
        so = session_options()  # the graph optimization level serve-kit serves with
        so.use_per_session_threads = False
        # the fusions serve-kit's backend disables (SkipLayerNormFusion: slow on this CPU)
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=DEFAULT_DISABLED_OPTIMIZERS.split(","))
        runners[kind] = (lambda s: (lambda feed: s.run(None, feed)))(sess)
    # Real held-out sentences (never calibrated on), padded to `seq` tokens.
    sentences = minilm.load_sentences()[minilm.N_CALIBRATION:minilm.N_CALIBRATION + batch]
    inputs = minilm.tokenize(sentences, length=seq)
    t0 = time.perf_counter()
    med = interleaved(runners, inputs, windows, runs)
    a, b = np.asarray(med["fp32"]), np.asarray(med["int8"])
    return {"threads": threads, "seconds": round(time.perf_counter() - t0, 1),
            "fp32_ms": float(np.median(a)), "int8_ms": float(np.median(b)),
            "fp32_best_window_ms": float(a.min()), "int8_best_window_ms": float(b.min()),
            "ratio": float(np.median(a / b)), "ratio_range": [float(np.min(a / b)), float(np.max(a / b))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, help="repository written by `serve-kit optimize --recipe minilm`")
    ap.add_argument("--model", default="minilm", help="model name in the repository")
    ap.add_argument("--threads", default="0", help="ONNX Runtime intra-op threads, comma-separated settings "
                                                   "to measure (0 = ORT's default, as serve-kit serves)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128, help="sequence length (sentences padded to it)")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--runs", type=int, default=10, help="calls per window")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--measure-child", nargs=2, metavar=("FP32", "INT8"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_child:
        print(json.dumps(measure_child(*args.measure_child, int(args.threads), args.batch, args.seq,
                                       args.windows, args.runs)))
        return 0
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print

    import onnxruntime as ort

    from serve_kit.optimize import calibration as cal
    from serve_kit.optimize.source import load_source
    from serve_kit.optimize.validate import run_batched
    from serve_kit.recipes import load_recipe
    from serve_kit.runtime.backends import load_backend

    recipe = load_recipe(RECIPE)
    source = load_source(recipe.model)
    source.inputs, source.outputs = recipe.inputs, recipe.outputs
    split = cal.from_function(recipe.data.function, recipe.inputs, recipe.data.label_key)

    paths = from_repository(args.repository, args.model) if args.repository else {}
    origin = {k: f"repository {args.repository}" for k in paths}
    with tempfile.TemporaryDirectory(prefix="minilm-int8-bench-") as tmp:
        missing = [k for k in ("fp32", "int8") if k not in paths]
        if missing:
            paths.update(build_missing(recipe, source, split.calibration, missing, Path(tmp), log))
            origin.update({k: "built by this script" for k in missing})

        # Accuracy on the held-out sentences, through serve-kit's backend (what is served).
        ref = run_batched(source.run, split.evaluation)["embedding"]
        outs = {}
        for kind in ("fp32", "int8"):
            backend = load_backend("onnxruntime", paths[kind], output_names=["embedding"])
            outs[kind] = run_batched(backend.infer, split.evaluation)["embedding"]
            del backend
        accuracy = {
            "fp32_vs_pytorch": cosine(outs["fp32"], ref),
            "int8_vs_pytorch": cosine(outs["int8"], ref),
            "int8_vs_fp32": cosine(outs["int8"], outs["fp32"]),
        }
        accuracy = {k: {"mean": float(v.mean()), "min": float(v.min())} for k, v in accuracy.items()}

        results = []
        for threads in [int(t) for t in args.threads.split(",")]:
            cmd = [sys.executable, __file__, "--measure-child", str(paths["fp32"]), str(paths["int8"]),
                   "--threads", str(threads), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--windows", str(args.windows), "--runs", str(args.runs)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    report = {
        "date": date.today().isoformat(), "cpu": cpu_model(), "cores": _cores(),
        "onnxruntime": ort.__version__, "batch": args.batch, "seq": args.seq,
        "windows": args.windows, "runs_per_window": args.runs,
        "models": {k: {"path": str(p), "origin": origin[k]} for k, p in paths.items()},
        "accuracy": accuracy, "latency": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['date']}  {report['cpu']}, {report['cores']} cores, onnxruntime {report['onnxruntime']}")
    for k, m in report["models"].items():
        print(f"  {k}: {m['origin']}")
    print(f"batch {args.batch}, sequence {args.seq}; {args.windows} interleaved windows x {args.runs} calls")
    for r in results:
        print(f"  threads={r['threads'] or 'default'}: FP32 {r['fp32_ms']:.2f} ms, INT8 {r['int8_ms']:.2f} ms "
              f"(medians of window medians; best windows {r['fp32_best_window_ms']:.2f} / "
              f"{r['int8_best_window_ms']:.2f}) -> INT8 {r['ratio']:.2f}x faster "
              f"(per-window {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}x)")
    for k, v in accuracy.items():
        print(f"  cosine {k}: mean {v['mean']:.6f}, min {v['min']:.6f}")
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    sys.exit(main())
