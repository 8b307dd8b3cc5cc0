"""In-process latency measurement.

`measure_interleaved`: optimize's comparison of the reference and its variants, measured in
round-robin windows with bench's stability rule (see its docstring). `measure`: one callable
alone. Warm-up runs are excluded; each batch size is run for at
least `min_seconds` and at least `min_iterations` times, on real samples, and reported as
percentiles of per-call wall time.

`run_offline` (`serve-kit bench REPO`): every version of a repository's models, loaded through
the runtime's own backends with the server's options, over a batch-size sweep. After a warm-up,
equal windows are measured until the last three agree (p50 and throughput within the stability
percentage) or the window limit is reached, when the result is marked UNSTABLE. Every call is
recorded (HdrHistogram); peak memory is the RSS high-water mark (reset per batch size) above the
RSS before the model was loaded; FLOPs per sample come from the ONNX graph (flops.py) and are
reported as a fraction of this machine's measured FP32 GEMM peak.

A version whose backend runs on a CUDA GPU (TensorRT; ONNX Runtime with a CUDA or TensorRT
provider; `device: cuda` in config.yaml's parameters) also gets a `gpu` entry per result (gpu.py):
NVML utilization, memory and power sampled over its measurement windows, an H2D / compute / D2H
split timed with CUDA events after the windows, and its FLOPs as a fraction of the GPU's measured
GEMM peak (calibrated once, in a separate process, before the versions run). Where the GPU cannot
be used the entry says why; a CPU-only version's results are exactly what they were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class Latency:
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / (self.p50_ms / 1e3) if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "iterations": self.iterations, "p50_ms": self.p50_ms,
                "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "mean_ms": self.mean_ms,
                "samples_per_s": self.samples_per_s}


def measure(fn: Callable[[dict[str, np.ndarray]], object], inputs: dict[str, np.ndarray], batch_size: int,
            min_seconds: float = 0.5, min_iterations: int = 10, warmup: int = 3,
            max_iterations: int = 100_000) -> Latency:
    for _ in range(warmup):
        fn(inputs)
    times = []
    deadline = time.perf_counter() + min_seconds
    while (len(times) < min_iterations or time.perf_counter() < deadline) and len(times) < max_iterations:
        t0 = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return Latency(batch_size, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
                   float(np.percentile(ms, 99)), float(ms.mean()))


# ---------------------------------------------------------------------------------------------
# Interleaved comparison: optimize's reference against its variants, in the same windows


STABILITY_PCT = 10.0
"""Default stability rule of `serve-kit bench` (OfflineJob.stability_pct), shared by optimize."""


def measure_interleaved(fns: dict[str, Callable[[dict[str, np.ndarray]], object]], inputs: dict[str, np.ndarray],
                        batch_size: int, rounds: int = 3, min_seconds: float = 0.5, *, max_rounds: int = 10,
                        stability_pct: float = STABILITY_PCT, warmup_s: float | None = None,
                        settle_s: float = 0.01, reference: str | None = None
                        ) -> tuple[dict[str, dict], dict[str, BaseException]]:
    """Measure several callables on the same inputs in round-robin windows.

    Each round runs one window per callable (the order rotates every round), so that a drift of
    the machine (another process, frequency scaling) hits every callable alike instead of
    whichever happened to run at that moment. A window lasts `min_seconds / rounds` (at least
    MIN_CALLS_PER_WINDOW calls) and starts with `settle_s` of untimed calls: the previous
    callable's thread pool may still be spinning. Rounds go on (past `rounds`, up to
    `max_rounds`) until every callable is stable by bench's rule (stats.is_stable over the last
    STABLE_WINDOWS windows' p50 and throughput within `stability_pct`), or, given a `reference`,
    until every other callable's ratio to it is (`ratio_stable`): on a machine whose speed drifts
    from second to second (a shared VM), absolute figures may never settle while the ratio of two
    callables measured in the same rounds does, and the ratio is what a speedup claims.

    Returns (results, errors): per name its percentiles over every timed call, the per-window
    p50s and `stable`; a callable that raises is dropped from the remaining windows and its
    exception is in `errors` (one variant must not lose the others' figures).
    """
    from . import stats

    window_s = max(min_seconds / max(rounds, 1), 1e-3)
    warmup_s = window_s if warmup_s is None else warmup_s
    live = dict(fns)
    errors: dict[str, BaseException] = {}
    times: dict[str, list[float]] = {n: [] for n in fns}
    windows: dict[str, list[dict]] = {n: [] for n in fns}

    def timed(name: str, seconds: float, record: bool) -> None:
        fn = live[name]
        got: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(got) < (MIN_CALLS_PER_WINDOW if record else 1) or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn(inputs)
            got.append(time.perf_counter() - t0)
        if record:
            ms = np.asarray(got) * 1e3
            times[name].extend(got)
            windows[name].append({"calls": len(ms), "p50_ms": float(np.percentile(ms, 50)),
                                  "throughput": len(ms) * batch_size / (ms.sum() / 1e3)})

    def attempt(name: str, seconds: float, record: bool) -> None:
        try:
            timed(name, seconds, record)
        except Exception as e:  # noqa: BLE001 - reported per callable by the caller
            errors[name] = e
            live.pop(name, None)

    for name in list(live):
        attempt(name, warmup_s, False)
    order = list(live)
    for r in range(max_rounds):
        shift = r % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            if name in live:
                attempt(name, settle_s, False)
            if name in live:
                attempt(name, window_s, True)
        if r + 1 >= rounds and all(stats.is_stable(*_series(windows[n]), stability_pct) or (
                reference in live and n != reference
                and ratio_stable(windows[reference], windows[n], stability_pct)) or (
                n == reference and all(ratio_stable(windows[n], windows[m], stability_pct)
                                       for m in live if m != n)) for n in live):
            break
    results = {}
    for name in fns:
        if name in errors:
            continue
        ms = np.asarray(times[name]) * 1e3
        p50s, tput = _series(windows[name])
        results[name] = {
            "batch_size": batch_size, "iterations": int(ms.size), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "samples_per_s": batch_size / (float(np.percentile(ms, 50)) / 1e3),
            "window_p50_ms": p50s, "windows": len(p50s), "window_s": window_s,
            "stable": bool(stats.is_stable(p50s, tput, stability_pct)),
            "spread_pct": stats.spread(p50s[-stats.STABLE_WINDOWS:]), "stability_pct": stability_pct,
        }
    return results, errors


def _series(windows: list[dict]) -> tuple[list[float], list[float]]:
    return [w["p50_ms"] for w in windows], [w["throughput"] for w in windows]


def _paired_ratios(ref_p50s: list[float], var_p50s: list[float]) -> list[float]:
    return [a / b for a, b in zip(ref_p50s, var_p50s) if b > 0]


def ratio_stable(ref_windows: list[dict], var_windows: list[dict], stability_pct: float = STABILITY_PCT) -> bool:
    """Bench's stability rule applied to the ratio of two callables, round by round: the last
    STABLE_WINDOWS paired ratios of their window p50s within `stability_pct`."""
    from . import stats

    ratios = _paired_ratios([w["p50_ms"] for w in ref_windows], [w["p50_ms"] for w in var_windows])
    return stats.is_stable(ratios, None, stability_pct)


def interleaved_speedup(reference: dict, variant: dict, stability_pct: float = STABILITY_PCT) -> dict:
    """reference / variant from two callables measured in the same rounds: the ratio of their
    median window p50s, its range over the rounds (window by window), and whether it may be
    claimed: both sides stable by bench's rule, or their round-by-round ratio stable by it."""
    from . import stats

    ref, var = reference["window_p50_ms"], variant["window_p50_ms"]
    paired = _paired_ratios(ref, var)
    # The median of the round-by-round ratios: a drift of the machine between rounds cancels.
    ratio = float(np.median(paired)) if paired else float(np.median(ref) / np.median(var))
    stable = bool(reference["stable"] and variant["stable"]) or stats.is_stable(paired, None, stability_pct)
    return {"ratio": ratio, "range": [min(paired, default=ratio), max(paired, default=ratio)],
            "stable": bool(stable)}


# ---------------------------------------------------------------------------------------------
# `serve-kit bench REPO`: every version of every model, over a batch-size sweep


@dataclass
class OfflineJob:
    """An offline benchmark (`serve-kit bench REPO [--model M]`)."""

    repository: Path
    models: list[str] | None = None
    """Models to measure (default: all in the repository)."""
    versions: list[int] | None = None
    """Versions to measure (default: every version present)."""
    batch_sizes: list[int] | None = None
    """Default: 1, 8 and 32, capped at each model's max_batch_size (1 when it does not batch)."""
    warmup_s: float = 0.5
    window_s: float = 0.5
    min_windows: int = 3
    max_windows: int = 10
    stability_pct: float = 10.0
    synthetic: bool = False
    """Random inputs for versions without samples.npz (labelled SYNTHETIC)."""
    flops: bool = True
    """Count FLOPs (ONNX versions) and calibrate this machine's GEMM peak."""
    eager: bool = True
    """Also measure the PyTorch source in eager mode when it is available: the manifest's source
    (a factory or a TorchScript file) loads here and hashes to what was optimized."""


DEFAULT_BATCH_SIZES = (1, 8, 32)
MIN_CALLS_PER_WINDOW = 3


def run_offline(job: OfflineJob, progress=None) -> dict:
    """Measure every selected version through the runtime's own backends, with the options the
    server gives them, so the numbers are those of what is served.

    Each version runs in a fresh interpreter (`python -m serve_kit.bench.offline`): its memory
    figures are its own, and no thread pool of a version measured before keeps spinning on the
    cores (two ONNX Runtime sessions in one process measurably disturb each other).
    """
    from ..errors import RepositoryError, UsageError
    from ..progress import ProgressSink
    from ..repository import Repository, model_file_sha256
    from ..runtime.models import available_cores, backend_options
    from .report import environment

    progress = progress or ProgressSink()
    repo = Repository(Path(job.repository))
    if not repo.exists():
        raise RepositoryError("repository folder not found", value=str(job.repository), origin="REPOSITORY",
                              hint="write one with `serve-kit optimize --recipe digits-cnn -r PATH`")
    names = job.models or repo.models()
    if not names:
        raise RepositoryError("no models in the repository", value=str(job.repository), origin="REPOSITORY")
    for m in names:
        if m not in repo.models():
            raise UsageError("no such model in the repository", value=m, origin="--model",
                             hint=f"models: {', '.join(repo.models()) or 'none'}")
    plan = []
    for name in names:
        config = repo.config(name)
        numbers = repo.version_numbers(name)
        if not numbers:
            raise RepositoryError("model has no versions", value=name, origin=str(repo.root / name))
        wanted = job.versions or numbers
        missing = [v for v in wanted if v not in numbers]
        if missing:
            raise UsageError(f"model {name!r} has no version {missing[0]}", value=missing[0], origin="--version",
                             hint=f"versions: {', '.join(map(str, numbers))}")
        sizes = _batch_sizes(job, config)
        for v in wanted:
            info = repo.version(name, v)
            problems = repo.verify_version(info)
            if problems:
                raise RepositoryError("version failed verification, refusing to measure it: " + "; ".join(problems),
                                      value=f"{name}/{v}", origin=str(info.path),
                                      hint="`serve-kit inspect` shows what changed")
            plan.append((config, info, sizes, False))
        source = (info.manifest or {}).get("source") or {}
        if job.eager and source.get("kind") in ("torch", "torchscript"):
            plan.append((config, info, sizes, True))  # the newest planned version's source
    env = environment()
    gpu_devices = _probe_gpus(plan, job, progress)
    peak = None
    if job.flops and any(((i.manifest or {}).get("backend") or c.backend) == "onnxruntime" for c, i, _, _ in plan):
        from .flops import gemm_peak

        threads = int(backend_options(plan[0][0], available_cores()).get("intra_op_threads", 0))
        with progress.task("calibrating this machine's FP32 GEMM peak", None):
            peak = gemm_peak(threads)
    results, skipped, model_hashes, any_synthetic = [], [], {}, False
    source_of: dict[int, str | None] = {}  # id(result row) -> its version's source sha256
    for config, info, sizes, eager in plan:
        manifest = info.manifest or {}
        backend_name = EAGER if eager else manifest.get("backend") or config.backend
        sha = model_file_sha256(manifest)
        if sha:
            model_hashes[f"{config.name}/{info.version}/{manifest['model_file']}"] = sha
        spec = {"repository": str(job.repository), "model": config.name, "version": info.version, "sizes": sizes,
                "warmup_s": job.warmup_s, "window_s": job.window_s, "min_windows": job.min_windows,
                "max_windows": job.max_windows, "stability_pct": job.stability_pct, "synthetic": job.synthetic,
                "flops": job.flops, "eager": eager, "gpu_devices": gpu_devices}
        out = _run_child(spec, progress, f"{config.name} v{info.version} ({backend_name})",
                         len(sizes) * job.max_windows)
        if "unavailable" in out:
            skipped.append({"model": config.name, "version": info.version, "backend": backend_name,
                            "reason": out["unavailable"]})
            progress.warn(f"{config.name} v{info.version} ({backend_name}): not measured: {out['unavailable']}")
            continue
        for r in out["rows"]:
            if eager:
                r.update(variant=EAGER, precision="fp32", source=manifest.get("source"))
            else:
                r.update(variant=manifest.get("variant", "?"), precision=manifest.get("precision"))
            any_synthetic |= r["synthetic"]
            source_of[id(r)] = (manifest.get("source") or {}).get("sha256")
            f = r.get("flops") or {}
            on_gpu = bool(r.get("gpu")) and "unavailable" not in r["gpu"]
            if peak and f.get("per_sample") and not on_gpu:  # a CPU peak says nothing about a GPU's rate
                f["achieved_per_s"] = f["per_sample"] * r["throughput"]
                f["fraction_of_peak"] = f["achieved_per_s"] / peak["flops_per_s"]
        results.extend(out["rows"])
    if gpu_devices:
        _gpu_fractions(results, gpu_devices, source_of)
    if any_synthetic:
        progress.warn("WARNING: some versions were measured on SYNTHETIC random inputs (--synthetic)")
    return {
        "format": "serve-kit/bench@1",
        "kind": "offline",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "repository": str(job.repository),
        "model_hashes": model_hashes,
        "synthetic": any_synthetic,
        "settings": {"batch_sizes": job.batch_sizes, "warmup_s": job.warmup_s, "window_s": job.window_s,
                     "min_windows": job.min_windows, "max_windows": job.max_windows,
                     "stability_pct": job.stability_pct},
        "peak": peak,
        **({"gpu_devices": gpu_devices} if gpu_devices else {}),
        "results": results,
        "skipped": skipped,
        "warnings": [w for r in results for w in r["warnings"]],
    }


def _run_child(spec: dict, progress, label: str, total: int) -> dict:
    """Measure one version in a fresh interpreter; its progress and result come back as JSON lines."""
    import json
    import os
    import subprocess
    import sys

    from .. import errors

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "serve_kit.bench.offline"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    result = None
    try:
        with progress.task(label, total) as advance:
            for line in proc.stdout:
                msg = json.loads(line)
                if "advance" in msg:
                    advance(msg["advance"])
                elif "log" in msg:
                    progress.log(msg["log"], msg.get("style", ""))
                else:
                    result = msg
        stderr = proc.stderr.read()
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if result is not None and "error" in result:
        e = result["error"]
        cls = getattr(errors, e["error"], errors.ServeKitError)
        if not (isinstance(cls, type) and issubclass(cls, errors.ServeKitError)):
            cls = errors.ServeKitError
        raise cls(e["message"], value=e.get("value"), origin=e.get("origin"), hint=e.get("hint"))
    if result is None or rc != 0:
        raise RuntimeError(f"measuring {label} failed (exit {rc}):\n{stderr[-4000:]}")
    return result


def _probe_gpus(plan, job: OfflineJob, progress) -> dict[str, dict]:
    """Each CUDA device a planned version asks for: its facts and, with FLOP counting on, its
    GEMM peak, measured in a separate process (gpu.probe_in_subprocess). Empty for CPU plans."""
    from ..runtime.models import available_cores, backend_options
    from .gpu import gpu_request, probe_in_subprocess

    devices: list[str] = []
    for config, info, _, eager in plan:
        req = None if eager else gpu_request((info.manifest or {}).get("backend") or config.backend,
                                             backend_options(config, available_cores()))
        if req and req["device"] not in devices:
            devices.append(req["device"])
    probes = {}
    for d in devices:
        what = f"probing {d}" + (" and calibrating its GEMM peak (FP32, TF32, FP16, BF16)" if job.flops else "")
        with progress.task(what, None):
            probes[d] = probe_in_subprocess(d, calibrate=job.flops)
        if "unavailable" in probes[d]:
            progress.warn(f"{d}: {probes[d]['unavailable']}")
    return probes


def _gpu_fractions(results: list[dict], gpu_devices: dict[str, dict], source_of: dict[int, str | None]) -> None:
    """Each GPU result's FLOP rate against its device's measured peak. FLOPs are counted from ONNX
    graphs; a version without one (a TensorRT engine, TorchScript) borrows the count of a measured
    ONNX version of the same model made from the same source (same sha256)."""
    from .gpu import fraction_of_peak, peak_dtype

    counted: dict[tuple, tuple[float, str]] = {}
    for r in results:
        f = r.get("flops") or {}
        sha = source_of.get(id(r))
        if f.get("per_sample") and sha:
            counted.setdefault((r["model"], sha), (f["per_sample"], f"{r['model']}/v{r['version']}"))
    for r in results:
        g = r.get("gpu")
        if not g or "unavailable" in g:
            continue
        peaks = (gpu_devices.get(g["device"]) or {}).get("gemm_peak") or {}
        if not peaks.get("tflops"):
            continue
        per_sample, origin = (r.get("flops") or {}).get("per_sample"), None
        if not per_sample:
            per_sample, origin = counted.get((r["model"], source_of.get(id(r))), (None, None))
        dtype = peak_dtype(r.get("precision"), r["backend"], g.get("fp32_matmul"))
        g["gemm_peak_tflops"] = peaks["tflops"]
        g["peak_dtype"] = dtype
        if not per_sample:
            g["fraction_of_peak"] = None
            g["fraction_note"] = "no FLOP count (FLOPs are counted from ONNX graphs)"
            continue
        g["flops_per_sample"] = per_sample
        if origin:
            g["flops_from"] = origin
        g["achieved_tflops"] = per_sample * r["throughput"] / 1e12
        g["fraction_of_peak"] = fraction_of_peak(per_sample, r["throughput"], dtype, peaks["tflops"])


EAGER = "pytorch-eager"


class _EagerSource:
    """The version's PyTorch source run eagerly (torch.inference_mode), behind the backend's
    `infer` so that it is measured exactly like the served variants."""

    def __init__(self, source: dict, config, threads: int):
        import torch

        from ..config import SourceSpec
        from ..errors import ServeKitError
        from ..optimize.source import load_source

        ref = source.get("ref") or ""
        spec = SourceSpec(factory=ref) if source.get("kind") == "torch" else SourceSpec(path=ref)
        try:
            self.source = load_source(spec, origin="manifest.json source")
        except (ServeKitError, ImportError, AttributeError, ValueError) as e:
            msg = e.render() if isinstance(e, ServeKitError) else f"{type(e).__name__}: {e}"
            raise _Unavailable(f"the source {ref!r} does not load here: {msg.splitlines()[0]}") from None
        if self.source.sha256 != source.get("sha256"):
            raise _Unavailable(f"the source {ref!r} loads, but not as the model that was optimized "
                               f"(sha256 {self.source.sha256[:12]} vs the manifest's {str(source.get('sha256'))[:12]}; "
                               "e.g. its weights were a separate file)")
        self.source.inputs = self.source.inputs or config.inputs
        self.source.outputs = self.source.outputs or config.outputs
        if threads > 0:
            torch.set_num_threads(threads)  # the server's width, as for the TorchScript backend

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.source.run(inputs)


class _Unavailable(Exception):
    """A backend that cannot run here (e.g. torch not installed)."""


def _batch_sizes(job: OfflineJob, config) -> list[int]:
    from ..errors import UsageError

    if config.max_batch_size == 0:
        if job.batch_sizes and job.batch_sizes != [1]:
            raise UsageError(f"model {config.name!r} does not batch (max_batch_size 0): only batch size 1",
                             value=job.batch_sizes, origin="--batch-sizes")
        return [1]
    if job.batch_sizes:
        over = [b for b in job.batch_sizes if b > config.max_batch_size]
        if over:
            raise UsageError(f"batch size {over[0]} is over model {config.name!r}'s max_batch_size "
                             f"{config.max_batch_size}", value=over[0], origin="--batch-sizes")
        return list(job.batch_sizes)
    return sorted({min(b, config.max_batch_size) for b in DEFAULT_BATCH_SIZES})


def _samples(config, version_dir: Path, synthetic: bool, what: str) -> tuple[dict[str, np.ndarray], bool]:
    """Batch-first real inputs from the version's samples.npz (a non-batching model's samples get
    a leading sample dimension), or random ones when asked for. Read like the server reads them
    (checked path, bounded, never unpickled)."""
    from ..config import TensorSpec
    from ..errors import DataError
    from ..optimize import calibration as cal
    from ..repository import Repository

    version_dir = Path(version_dir)
    repo = Repository(version_dir.parent.parent)
    info = repo.version(version_dir.parent.name, int(version_dir.name))

    batching = config.max_batch_size > 0
    specs = list(config.inputs) if batching else [TensorSpec(name=t.name, datatype=t.datatype, shape=[-1, *t.shape])
                                                  for t in config.inputs]
    read = repo.read_samples(info, inputs_only=True)
    if read is not None:
        stored = read[0]
        if not batching:
            # optimize stores an unbatched model's samples as one whole request (state [2, n, 128]
            # beside input [n, 576], scalars 0-d): that request is the one sample.
            ranks = {t.name: len(t.shape) for t in config.inputs}
            stored = {k: v[None] if k in ranks and v.ndim == ranks[k] else v for k, v in stored.items()}
        return cal.to_dataset(stored, specs, "labels", f"{what}/samples.npz").inputs, False
    if not synthetic:
        raise DataError(f"{what} has no samples.npz to measure with", value=what,
                        hint="versions written by `serve-kit optimize` have one; or measure on random inputs "
                             "with --synthetic")
    return cal.synthetic(specs, 16).inputs, True


def _batch(samples: dict[str, np.ndarray], b: int, batching: bool) -> dict[str, np.ndarray]:
    if not batching:
        return {k: np.ascontiguousarray(v[0]) for k, v in samples.items()}
    n = len(next(iter(samples.values())))
    idx = np.arange(b) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in samples.items()}


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that the next peak is this batch size's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure_version(spec: dict, emit: Callable[[dict], None]) -> dict:
    """The child's work: load one version like the server does and measure each batch size."""
    from ..repository import Repository
    from ..runtime.backends import backend_class, load_backend
    from ..runtime.models import available_cores, backend_options  # the server's backend options, exactly
    from . import stats

    repo = Repository(Path(spec["repository"]))
    config = repo.config(spec["model"])
    info = repo.version(spec["model"], spec["version"])
    backend_name = (info.manifest or {}).get("backend") or config.backend
    samples, synthetic = _samples(config, info.path, spec["synthetic"], f"{config.name}/{info.version}")
    batching = config.max_batch_size > 0
    opts = backend_options(config, available_cores())
    flops = None
    if spec["flops"] and backend_name == "onnxruntime":
        from .flops import count_flops

        one = _batch(samples, 1, batching)
        try:
            flops = count_flops(info.model_file, {k: list(v.shape) for k, v in one.items()})
        except Exception as e:  # noqa: BLE001 - a model we cannot count is still measured
            flops = {"flops": None, "error": f"{type(e).__name__}: {e}"}
    if spec.get("eager"):
        backend_name, flops = EAGER, None
    gpu, skip = _gpu_plan(backend_name, opts, spec)
    if skip:
        return {"unavailable": skip}
    try:
        import gc

        if spec.get("eager"):
            import torch  # noqa: F401 - imported before the baseline RSS, so the memory is the model's

            gc.collect()
            rss0 = _proc_status("VmRSS")
            backend = _EagerSource((info.manifest or {}).get("source") or {}, config,
                                   int(opts.get("intra_op_threads", 0)))
        else:
            backend_class(backend_name)  # imports its library now, so the memory below is the model's
            gc.collect()
            rss0 = _proc_status("VmRSS")
            backend = load_backend(backend_name, info.model_file, [o.name for o in config.outputs], opts)
    except ImportError as e:
        return {"unavailable": f"{e.name or e} is not installed"}
    except _Unavailable as e:
        return {"unavailable": str(e)}
    rss_loaded = _proc_status("VmRSS")
    gpu = _gpu_after_load(gpu, backend)
    on_gpu = gpu is not None and "unavailable" not in gpu
    rows = []
    for b in spec["sizes"]:
        inputs = _batch(samples, b, batching)
        peak_tracked = _reset_peak_rss()
        deadline = time.perf_counter() + spec["warmup_s"]
        n = 0
        while n < MIN_CALLS_PER_WINDOW or time.perf_counter() < deadline:
            backend.infer(inputs)
            n += 1
        windows, hist = [], stats.new_histogram()
        # Started after the warm-up, so utilization and power are those of the measured windows.
        # (Should a window raise, the child exits and takes the daemon sampler thread with it.)
        sampler = _gpu_window_start(gpu) if on_gpu else None
        while len(windows) < spec["max_windows"]:
            times = []
            t_start = time.perf_counter_ns()
            end = t_start + int(spec["window_s"] * 1e9)
            while len(times) < MIN_CALLS_PER_WINDOW or time.perf_counter_ns() < end:
                t0 = time.perf_counter_ns()
                backend.infer(inputs)
                times.append(time.perf_counter_ns() - t0)
            elapsed = (time.perf_counter_ns() - t_start) / 1e9
            wh = stats.new_histogram()
            stats.record_many(wh, times)
            hist.add(wh)
            ws = stats.summary(wh)
            windows.append({"calls": len(times), "seconds": elapsed, "p50_ms": ws["p50_ms"], "p99_ms": ws["p99_ms"],
                            "throughput": len(times) * b / elapsed})
            emit({"advance": 1})
            if len(windows) >= spec["min_windows"] and stats.is_stable(
                    [w["p50_ms"] for w in windows], [w["throughput"] for w in windows], spec["stability_pct"]):
                break
        gpu_row = _gpu_window_end(gpu, sampler, sum(w["calls"] for w in windows) * b) if on_gpu else None
        emit({"advance": spec["max_windows"] - len(windows)})
        peak = _proc_status("VmHWM")
        s = stats.summary(hist)
        stable = stats.is_stable([w["p50_ms"] for w in windows], [w["throughput"] for w in windows],
                                 spec["stability_pct"])
        calls = sum(w["calls"] for w in windows)
        seconds = sum(w["seconds"] for w in windows)
        key = f"{config.name}/v{info.version}{'/eager' if spec.get('eager') else ''}/b{b}"
        row = {
            "key": key, "model": config.name, "version": info.version, "backend": backend_name, "batch_size": b,
            "synthetic": synthetic, "calls": calls, "windows_measured": len(windows), "stable": stable,
            **{k: v for k, v in s.items() if k != "count"},
            "throughput": calls * b / seconds if seconds else 0.0,
            "per_window": {"throughput": [w["throughput"] for w in windows],
                           "p50_ms": [w["p50_ms"] for w in windows], "p99_ms": [w["p99_ms"] for w in windows]},
            "windows": windows,
            "memory": {"rss_before_load_bytes": rss0,
                       "load_rss_delta_bytes": (rss_loaded - rss0) if rss0 and rss_loaded else None,
                       "peak_rss_delta_bytes": (peak - rss0) if peak and rss0 and peak_tracked else None},
            "threads": {"intra_op": opts.get("intra_op_threads")},
            "histogram": stats.encode(hist),
            "warnings": [],
        }
        if flops is not None:
            row["flops"] = ({"per_sample": flops["flops"], "by_op": flops["by_op"], "complete": flops["complete"],
                             "uncounted": flops["uncounted"]} if flops.get("flops")
                            else {"per_sample": None, "error": flops.get("error", "no MatMul/Gemm/Conv counted")})
        if gpu_row is not None:
            row["gpu"] = gpu_row
        elif gpu is not None:
            row["gpu"] = dict(gpu)
        if not stable:
            row["warnings"].append(
                f"{key}: UNSTABLE: the last {stats.STABLE_WINDOWS} of {len(windows)} windows differ by more than "
                f"{spec['stability_pct']:g}% (p50 spread {stats.spread([w['p50_ms'] for w in windows[-3:]]):.1f}%, "
                f"throughput spread {stats.spread([w['throughput'] for w in windows[-3:]]):.1f}%)")
        rows.append(row)
    if on_gpu:
        # After every batch size's windows: torch (imported here for the events when the backend
        # did not need it) must not count in the memory figures above.
        _gpu_split(gpu, backend, rows, [_batch(samples, b, batching) for b in spec["sizes"]])
    return {"rows": rows}


def _gpu_plan(backend_name: str, opts: dict, spec: dict) -> tuple[dict | None, str | None]:
    """(the version's GPU entry, or None for a CPU version; a reason to skip it, or None).

    A version whose GPU cannot be used here is not measured (the server would refuse to load it),
    except an ONNX Runtime version that allows the CPU (`allow_cpu_fallback: true`): the server
    runs it on the CPU, so it is measured there, and its entry says why not on the GPU."""
    from .. import gpu as facts
    from .gpu import gpu_request

    req = None if spec.get("eager") else gpu_request(backend_name, opts)
    if req is None:
        return None, None
    probe = (spec.get("gpu_devices") or {}).get(req["device"]) or {}
    if backend_name == "onnxruntime":
        reason = facts.ort_provider_unavailable_reason(req["provider"])
        if reason and str(opts.get("allow_cpu_fallback")).strip().lower() in ("true", "1", "yes"):
            return {**req, "unavailable": f"{reason}; measured on the CPU (allow_cpu_fallback)"}, None
        if reason:
            return None, f"asks for {req['provider']} ({req['requested_by']}), but {reason}"
    else:
        reason = ((facts.tensorrt_unavailable_reason() if backend_name == "tensorrt" else None)
                  or probe.get("unavailable") or facts.cuda_unavailable_reason())
        if reason:
            return None, f"asks for {req['device']} ({req['requested_by']}), but {reason}"
    return {**req, "info": probe.get("info") or {}}, None


def _gpu_after_load(gpu: dict | None, backend) -> dict | None:
    """An ONNX Runtime session silently drops a provider it cannot initialise: say so."""
    session = getattr(backend, "session", None)
    if gpu is None or "unavailable" in gpu or "provider" not in gpu or session is None:
        return gpu
    took = session.get_providers()
    if gpu["provider"] in took:
        return gpu
    return {**gpu, "unavailable": f"the ONNX Runtime session did not take {gpu['provider']} (it runs on "
                                  f"{', '.join(took)})"}


def _torch_cuda():
    """torch, when this process already uses CUDA through it (else None: not imported for this)."""
    import sys

    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_initialized() else None


def _gpu_window_start(gpu: dict):
    from .gpu import NvmlSampler

    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats(gpu["device"])
    return NvmlSampler(gpu.get("info", {}).get("uuid") or gpu["device"]).start()


def _gpu_window_end(gpu: dict, sampler, items: int) -> dict:
    sampler.stop()
    row = {**gpu, "nvml": sampler.summary(work_items=items)}
    torch = _torch_cuda()
    if torch is not None:
        row["torch_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(gpu["device"]))
        row["fp32_matmul"] = torch.get_float32_matmul_precision()
    return row


def _gpu_split(gpu: dict, backend, rows: list[dict], inputs: list[dict[str, np.ndarray]]) -> None:
    from ..errors import ServeKitError
    from .gpu import split_backend

    for row, x in zip(rows, inputs):
        try:
            row["gpu"]["cuda_events"] = split_backend(backend, x, gpu["device"]).to_dict()
        except ServeKitError as e:  # e.g. ONNX Runtime on the GPU, but no CUDA build of torch here
            row["gpu"]["cuda_events"] = {"unavailable": e.message}


def _child_main() -> None:
    import json
    import sys

    from ..errors import ServeKitError

    spec = json.loads(sys.stdin.read())
    out = sys.stdout

    def emit(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        emit(_measure_version(spec, emit))
    except ServeKitError as e:
        emit({"error": e.to_dict()})


if __name__ == "__main__":
    _child_main()
