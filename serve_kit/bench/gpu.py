"""GPU measurements for `serve-kit bench`: CUDA-event timing, NVML sampling, the GEMM peak.

Timing. Wall-clock time around a CUDA call measures when the host got control back, not what the
GPU did: kernels are queued asynchronously. `timed_phases` records a torch.cuda.Event at every
boundary of a pipeline (host-to-device copy, compute, device-to-host copy) on the current stream,
so each phase's time is read from the GPU's own clock. Boundary events (n + 1 for n phases, not a
pair per phase) make the phases tile the span: they add up to the whole GPU time by construction,
and host time spent before a phase's first kernel is counted in that phase, where it was lost.

Backends that take and return numpy arrays (the runtime's protocol) are split by `split_backend`,
in this order of preference:
  1. `backend.phase_timings()`: a backend on CUDA may time its own phases with CUDA events and
     return the last `infer` call's milliseconds, e.g. {"h2d": 0.02, "compute": 1.3, "d2h": 0.01}
     (method "backend").
  2. `backend.module`, a torch module whose parameters are on the device (TorchScript on CUDA,
     without CUDA graphs): the same three phases are timed here around that module (method
     "torch-module"), from pageable numpy memory as the backend copies it.
  3. anything else: the inputs' and outputs' bytes are copied to and from the device on their
     own (from pageable numpy memory, as the backend receives them), and compute is the backend's
     median wall time minus those copies (method "copy-estimate", flagged `estimated`).

NVML (nvidia-ml-py, imported as `pynvml`): `NvmlSampler` polls one device's utilization, memory
and power from a background thread while a measurement runs. Without NVML (no driver library, as
on a CPU machine) it does not fail: its summary is {"unavailable": reason}.

Peak: `gemm_peak` measures this GPU's matmul rate in FP32 (strict IEEE), TF32, FP16 and BF16
with CUDA events (each ~100 ms of back-to-back 8192^3 GEMMs, best of three), cached per process;
`fraction_of_peak` relates a model's FLOPs and throughput to it. `serve-kit bench` runs the
calibration in a separate process (`probe_in_subprocess`), so that the bench's own process never
holds a CUDA context (and its memory) while the versions are measured in theirs.

Every heavy import (torch, pynvml) is inside the function that needs it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ServeKitError

DTYPES = ("fp32", "tf32", "fp16", "bf16")
"""Matmul precisions the peak is calibrated for. fp32 is strict IEEE FP32 (no tensor cores)."""

DEFAULT_NVML_INTERVAL_S = 0.05
_CUDA_HINT = ("run on a machine with an NVIDIA GPU and its driver, with a CUDA build of PyTorch "
              "(https://pytorch.org/get-started/locally/)")


# ---------------------------------------------------------------------------------------------
# Which device a version runs on


def gpu_request(backend: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The CUDA device a version's backend is asked to run on (from the options the server gives
    it: config.yaml `parameters`), and what asked for it; None for a CPU version.

    TensorRT always runs on a GPU; ONNX Runtime when its providers (as the backend reads them:
    `providers`, or `device: cuda[:N]`) include a CUDA or TensorRT execution provider; other
    backends (TorchScript) when `device` is cuda[:N].
    """
    from ..gpu import cuda_device

    try:
        device = cuda_device(options.get("device"))
    except ValueError:
        device = None  # the backend reports a malformed device itself, when it loads
    if backend == "onnxruntime":
        from ..runtime.backends.onnxruntime import requested_providers

        try:
            providers = requested_providers(options)
        except ServeKitError:
            return None  # malformed: the backend says so when it loads
        gpu = [p for p in providers if "cuda" in p.lower() or "tensorrt" in p.lower()]
        if not gpu:
            return None
        why = "parameters.providers" if options.get("providers") else f"parameters.device ({options.get('device')})"
        return {"device": device or "cuda:0", "provider": gpu[0], "requested_by": f"{why}: {gpu[0]}"}
    if backend == "tensorrt":
        return {"device": device or "cuda:0", "requested_by": "backend tensorrt"}
    if device:
        return {"device": device, "requested_by": f"parameters.device ({options.get('device')})"}
    return None


def peak_dtype(precision: str | None, backend: str, fp32_matmul: str | None = None) -> str:
    """The calibrated matmul precision a version's compute is compared against.

    FP32 models compare with the TF32 peak where the runtime may use TF32 tensor cores for them
    (TensorRT's and ONNX Runtime CUDA's defaults; torch when its float32 matmul precision is not
    "highest"), else with strict FP32. INT8, FP8 and INT4 have no calibration of their own: they
    compare with FP16 (so their fraction can exceed 1). The report names the dtype it used.
    """
    p = (precision or "fp32").lower()
    if p in ("fp16", "bf16"):
        return p
    if p in ("int8", "fp8", "int4"):
        return "fp16"
    if backend in ("tensorrt", "onnxruntime"):
        return "tf32"
    return "tf32" if fp32_matmul in ("high", "medium") else "fp32"


def _require_cuda(device: str | None, what: str) -> Any:
    """The torch.device for `device`, or a ServeKitError saying why CUDA cannot be used here."""
    from ..gpu import cuda_device, cuda_unavailable_reason

    try:
        dev = cuda_device(device or "cuda")
    except ValueError as e:
        raise ServeKitError(str(e), value=device, origin=what, hint="cuda or cuda:N") from None
    reason = cuda_unavailable_reason()
    if reason:
        raise ServeKitError(f"{what} on {dev} needs a CUDA GPU: {reason}", value=dev, origin=what, hint=_CUDA_HINT)
    import torch

    d = torch.device(dev)
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ServeKitError(f"{what}: no such CUDA device (this machine has {torch.cuda.device_count()})",
                            value=dev, origin=what)
    return d


# ---------------------------------------------------------------------------------------------
# CUDA-event timing


def _stats(values_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values_ms, dtype=np.float64)
    if a.size == 0:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def timed_phases(phases: Sequence[tuple[str, Callable[[Any], Any]]], value: Any = None,
                 stream=None) -> tuple[Any, dict[str, float]]:
    """Run `phases` as a pipeline (each gets the previous one's result) on the current (or given)
    CUDA stream, with an event at each boundary; wait for the GPU, return the last result and the
    milliseconds of each phase. The phases add up to the GPU time from the first boundary to the
    last (see the module docstring)."""
    import torch

    stream = stream or torch.cuda.current_stream()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
    events[0].record(stream)
    for (_, fn), end in zip(phases, events[1:]):
        value = fn(value)
        end.record(stream)
    events[-1].synchronize()
    return value, {name: events[i].elapsed_time(events[i + 1]) for i, (name, _) in enumerate(phases)}


@dataclass
class PhaseTiming:
    """Per-phase CUDA-event times over repeated calls (milliseconds: p50/p90/p99/mean)."""

    method: str
    iterations: int
    phases_ms: dict[str, dict[str, float]]
    total_ms: dict[str, float]
    """The phases together (GPU time of a whole call)."""
    wall_ms: dict[str, float]
    """Host wall time of a whole call, including the wait for the GPU."""
    estimated: bool = False
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "iterations": self.iterations, "phases_ms": self.phases_ms,
             "total_ms": self.total_ms, "wall_ms": self.wall_ms, "estimated": self.estimated}
        if self.note:
            d["note"] = self.note
        d.update(self.extra)
        return d


def _repeat(call: Callable[[], dict[str, float]], warmup: int, min_iterations: int, min_seconds: float,
            max_iterations: int) -> tuple[dict[str, list[float]], list[float]]:
    for _ in range(warmup):
        call()
    per_phase: dict[str, list[float]] = {}
    wall: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while (len(wall) < min_iterations or time.perf_counter() < deadline) and len(wall) < max_iterations:
        t0 = time.perf_counter()
        ms = call()
        wall.append((time.perf_counter() - t0) * 1e3)
        for k, v in ms.items():
            per_phase.setdefault(k, []).append(v)
    return per_phase, wall


def split_phases(phases: Sequence[tuple[str, Callable[[Any], Any]]], value: Any = None, *, warmup: int = 3,
                 min_iterations: int = 10, min_seconds: float = 0.2, max_iterations: int = 10_000,
                 method: str = "phases") -> PhaseTiming:
    """`timed_phases` repeated (after `warmup` calls) for at least `min_iterations` calls and
    `min_seconds`; each call waits for the GPU, so the wall time is a call's latency."""
    per_phase, wall = _repeat(lambda: timed_phases(phases, value)[1], warmup, min_iterations, min_seconds,
                              max_iterations)
    totals = [sum(v) for v in zip(*per_phase.values())]
    return PhaseTiming(method, len(wall), {k: _stats(v) for k, v in per_phase.items()}, _stats(totals), _stats(wall))


@dataclass
class CudaTiming:
    """A callable's per-call GPU time (CUDA events) and wall time, in milliseconds."""

    iterations: int
    gpu_ms: dict[str, float]
    wall_ms: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "gpu_ms": self.gpu_ms, "wall_ms": self.wall_ms}


def time_cuda(fn: Callable[..., Any], *args: Any, device: str | None = None, warmup: int = 3,
              min_iterations: int = 10, min_seconds: float = 0.2, max_iterations: int = 10_000,
              **kwargs: Any) -> CudaTiming:
    """Time `fn(*args, **kwargs)` (a torch module or function on CUDA tensors) with CUDA events
    on the current stream: warm-up calls first, then each call on its own, waiting for the GPU
    after it. Raises ServeKitError when CUDA cannot be used here."""
    import torch

    dev = _require_cuda(device, "CUDA-event timing")
    with torch.cuda.device(dev), torch.no_grad():  # not inference_mode: it breaks unfrozen TorchScript
        per_phase, wall = _repeat(lambda: timed_phases([("call", lambda _: fn(*args, **kwargs))])[1], warmup,
                                  min_iterations, min_seconds, max_iterations)
    return CudaTiming(len(wall), _stats(per_phase["call"]), _stats(wall))


def _tensors(result) -> list:
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _tensors(v)]
    if isinstance(result, (tuple, list)):
        return [t for v in result for t in _tensors(v)]
    return []


def module_device(module) -> Any:
    """The device of a torch module's first parameter or buffer (None when it has neither)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def split_module(module, inputs: dict[str, np.ndarray], device: str | None = None, *,
                 input_names: Sequence[str] | None = None, pinned: bool = True, float_dtype=None,
                 **repeat: Any) -> PhaseTiming:
    """H2D / compute / D2H of a torch module on CUDA, with CUDA events.

    H2D copies the numpy inputs (from pinned host memory unless `pinned=False`) to the device
    without blocking the host, then converts floating inputs to `float_dtype` when given (say,
    FP32 data into an FP16 module); compute calls `module(*tensors)` in `input_names` order (default: the
    dict's order); D2H copies every output tensor back into pinned buffers."""
    import torch

    dev = _require_cuda(device, "the H2D / compute / D2H split")
    names = list(input_names or inputs)
    host = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]
    if pinned:
        host = [t.pin_memory() for t in host]
    out_bufs: list = []

    def h2d(_):
        xs = [t.to(dev, non_blocking=pinned) for t in host]
        if float_dtype is not None:
            xs = [x.to(float_dtype) if x.is_floating_point() else x for x in xs]
        return xs

    def compute(xs):
        return module(*xs)

    def d2h(result):
        outs = _tensors(result)
        if not out_bufs:  # allocated once, outside the timed region's steady state (warm-up)
            out_bufs.extend(torch.empty(o.shape, dtype=o.dtype, pin_memory=pinned) for o in outs)
        for buf, o in zip(out_bufs, outs):
            buf.copy_(o, non_blocking=pinned)
        return out_bufs

    with torch.cuda.device(dev), torch.no_grad():  # not inference_mode: it breaks unfrozen TorchScript
        t = split_phases([("h2d", h2d), ("compute", compute), ("d2h", d2h)], method="torch-module", **repeat)
    t.extra["pinned"] = pinned
    return t


def split_backend(backend, inputs: dict[str, np.ndarray], device: str | None = None, *, warmup: int = 3,
                  min_iterations: int = 10, min_seconds: float = 0.3,
                  max_iterations: int = 10_000) -> PhaseTiming:
    """H2D / compute / D2H of a runtime backend (numpy in, numpy out) on CUDA: by the backend's own
    `phase_timings()`, around its torch `module`, or estimated from copies (module docstring)."""
    import torch

    dev = _require_cuda(device, "the H2D / compute / D2H split")
    repeat = {"warmup": warmup, "min_iterations": min_iterations, "min_seconds": min_seconds,
              "max_iterations": max_iterations}
    if callable(getattr(backend, "phase_timings", None)):
        def call():
            backend.infer(inputs)
            return dict(backend.phase_timings() or {})

        per_phase, wall = _repeat(call, **repeat)
        if per_phase:
            totals = [sum(v) for v in zip(*per_phase.values())]
            return PhaseTiming("backend", len(wall), {k: _stats(v) for k, v in per_phase.items()}, _stats(totals),
                               _stats(wall), note="the backend's own CUDA-event timings of each infer call")
    module = getattr(backend, "module", None)
    fallback_note = None
    if getattr(backend, "_graphs", None) is not None:
        # The TorchScript backend replays captured CUDA graphs: its module run eagerly is not what
        # it serves.
        fallback_note = "the backend replays CUDA graphs, so its module is not timed on its own"
    elif isinstance(module, torch.nn.Module):  # TorchScript modules are nn.Modules too
        where = _backend_device(backend, module)
        if where is not None and where.type == "cuda":
            names = list(getattr(backend, "input_names", None) or inputs)
            try:
                # The inputs as they are and pageable copies, as the backend makes them: the split
                # explains the backend's latency.
                return split_module(module, inputs, str(where), input_names=names, pinned=False, **repeat)
            except RuntimeError as e:  # the backend prepares inputs in a way we do not know
                fallback_note = f"timing its module directly failed ({str(e).strip().splitlines()[0]})"
    # A backend we cannot look into: time its calls, and the copies of the same bytes on their own.
    outputs = backend.infer(inputs)
    arrays_in = [np.ascontiguousarray(a) for a in inputs.values() if isinstance(a, np.ndarray) and a.dtype != object]
    on_device = [torch.empty(a.shape, dtype=torch.from_numpy(a).dtype, device=dev)
                 for a in outputs.values() if isinstance(a, np.ndarray) and a.dtype != object]

    with torch.cuda.device(dev):
        phases = [("h2d", lambda _: [torch.from_numpy(a).to(dev) for a in arrays_in]),
                  ("d2h", lambda _: [t.cpu().numpy() for t in on_device])]
        per_phase, _ = _repeat(lambda: timed_phases(phases)[1], **repeat)

        def infer():
            backend.infer(inputs)  # numpy out: the backend has waited for its GPU work
            return {}

        _, wall = _repeat(infer, **repeat)
    h2d, d2h, w = _stats(per_phase["h2d"]), _stats(per_phase["d2h"]), _stats(wall)
    compute = {k: max(w[k] - h2d[k] - d2h[k], 0.0) for k in ("p50", "mean")}
    note = ("the backend exposes no phase timings: H2D and D2H are copies of the same bytes timed on their own "
            "(pageable memory); compute = wall - copies")
    return PhaseTiming("copy-estimate", len(wall), {"h2d": h2d, "compute": compute, "d2h": d2h},
                       {k: w[k] for k in ("p50", "mean")}, w, estimated=True,
                       note=f"{fallback_note}; {note}" if fallback_note else note)


def _backend_device(backend, module):
    """Where a backend's torch module runs: the backend's `device` (a frozen TorchScript module has
    its weights inlined as constants, so no parameter tells), else its first parameter's."""
    import torch

    d = getattr(backend, "device", None)
    if isinstance(d, (str, torch.device)) and str(d):
        try:
            return torch.device(d)
        except RuntimeError:
            pass
    return module_device(module)


# ---------------------------------------------------------------------------------------------
# NVML


def nvml_device_for(cuda: str | None) -> int | str:
    """The NVML device (index, or UUID string) behind a CUDA device string such as cuda:1.

    CUDA numbers the devices that CUDA_VISIBLE_DEVICES leaves, NVML numbers all of them; an entry
    of CUDA_VISIBLE_DEVICES is either an NVML index or a UUID. (With the variable unset the
    indexes agree on single-GPU and uniform machines; `serve-kit bench` passes the UUID that the
    probe read from the device, which is exact.)"""
    index = 0
    if cuda and cuda.startswith("cuda:"):
        index = int(cuda[5:])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        return index
    e = entries[index]
    return int(e) if e.isdigit() else e


def _nvml_error_text(e: BaseException) -> str:
    return str(e).strip() or type(e).__name__


def _handle_by_uuid(pynvml, uuid: str):
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
    except pynvml.NVMLError:
        # torch gives a bare UUID, which `probe` prefixes with GPU-; on a MIG slice it is the
        # slice's, which NVML knows as MIG-.
        if not uuid.startswith("GPU-"):
            raise
        return pynvml.nvmlDeviceGetHandleByUUID(("MIG-" + uuid[4:]).encode())


class NvmlSampler:
    """Sample one GPU's utilization, memory and power every `interval_s` in a background thread.

    Use as a context manager around the work to observe (or `start()` / `stop()`), then
    `summary()`. The first and last samples are taken synchronously at start and stop, so a
    working NVML always yields at least two. Without NVML the sampler does nothing and
    `summary()` is {"unavailable": reason}.

    `device`: an NVML index, a UUID ("GPU-..."/"MIG-..."), or a CUDA device string ("cuda:1",
    mapped with `nvml_device_for`).

    NVML's utilization is the share of its last sample period (1/6 s to 1 s, by product) in which
    any kernel ran, not how much of the GPU it used; power on recent GPUs is itself an average
    over about a second. Energy therefore comes from the driver's energy counter when the GPU has
    one, and is only integrated from the power samples when it has not. Memory used is the whole
    device's, other processes included.
    """

    def __init__(self, device: int | str = 0, interval_s: float = DEFAULT_NVML_INTERVAL_S):
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self.device = nvml_device_for(device) if isinstance(device, str) and device.startswith("cuda") else device
        self.interval_s = interval_s
        self.unavailable: str | None = None
        self.samples: list[tuple[float, float | None, float | None, int | None, float | None]] = []
        """(seconds since start, GPU util %, memory-controller util %, memory used bytes, power W)"""
        self._errors: dict[str, str] = {}
        self._static: dict[str, Any] = {}
        self._nvml = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._t1 = 0.0
        self._energy0: int | None = None
        self._energy1: int | None = None

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "NvmlSampler":
        try:
            import pynvml
        except ImportError:
            self.unavailable = "NVML: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self.unavailable = f"NVML: {_nvml_error_text(e)}"
            return self
        try:
            if isinstance(self.device, str):
                self._handle = _handle_by_uuid(pynvml, self.device)
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(self.device))
            name = pynvml.nvmlDeviceGetName(self._handle)
            self._static = {"name": name.decode() if isinstance(name, bytes) else name,
                            "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)}
        except pynvml.NVMLError as e:
            self.unavailable = f"NVML: device {self.device!r}: {_nvml_error_text(e)}"
            pynvml.nvmlShutdown()
            return self
        self._nvml = pynvml
        self._t0 = time.perf_counter()
        self._energy0 = self._energy()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        if self._nvml is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._sample()
            self._energy1 = self._energy()
            self._t1 = time.perf_counter()
            self._nvml.nvmlShutdown()
            self._nvml = None
        return self.summary()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _read(self, what: str, fn: Callable[[], Any]) -> Any:
        if what in self._errors:
            return None
        try:
            return fn()
        except self._nvml.NVMLError as e:  # e.g. NotSupported on a MIG slice or a virtual GPU
            self._errors[what] = _nvml_error_text(e)
            return None

    def _energy(self) -> int | None:
        return self._read("energy", lambda: int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)))

    def _sample(self) -> None:
        n, h = self._nvml, self._handle
        util = self._read("utilization", lambda: n.nvmlDeviceGetUtilizationRates(h))
        mem = self._read("memory", lambda: int(n.nvmlDeviceGetMemoryInfo(h).used))
        power_mw = self._read("power", lambda: n.nvmlDeviceGetPowerUsage(h))
        self.samples.append((time.perf_counter() - self._t0, None if util is None else float(util.gpu),
                             None if util is None else float(util.memory), mem,
                             None if power_mw is None else power_mw / 1000.0))

    def summary(self, work_items: int | None = None) -> dict[str, Any]:
        """Mean/max GPU utilization, max memory used, mean/max power, energy (J) and the sample
        count; with `work_items` (samples inferred during the run) also joules per item."""
        if self.unavailable:
            return {"unavailable": self.unavailable}
        if not self.samples:
            return {"unavailable": "NVML: the sampler was not started"}

        def col(i: int) -> list:
            return [s[i] for s in self.samples if s[i] is not None]

        util, mem_util, mem, power = col(1), col(2), col(3), col(4)
        out: dict[str, Any] = {
            "device": self.device, **self._static,
            "samples": len(self.samples), "interval_s": self.interval_s,
            "duration_s": (self._t1 or time.perf_counter()) - self._t0,
            "util_mean_pct": float(np.mean(util)) if util else None,
            "util_max_pct": float(max(util)) if util else None,
            "mem_util_mean_pct": float(np.mean(mem_util)) if mem_util else None,
            "memory_used_max_bytes": int(max(mem)) if mem else None,
            "memory_used_min_bytes": int(min(mem)) if mem else None,
            "power_mean_w": float(np.mean(power)) if power else None,
            "power_max_w": float(max(power)) if power else None,
            "energy_j": None, "energy_method": None,
        }
        if self._energy0 is not None and self._energy1 is not None:
            out["energy_j"], out["energy_method"] = (self._energy1 - self._energy0) / 1000.0, "counter"
        elif len(power) >= 2:
            ts = [s[0] for s in self.samples if s[4] is not None]
            out["energy_j"] = float(sum((ts[i + 1] - ts[i]) * (power[i] + power[i + 1]) / 2
                                        for i in range(len(ts) - 1)))
            out["energy_method"] = "integrated"
        if work_items and out["energy_j"] is not None:
            out["joules_per_item"] = out["energy_j"] / work_items
        if self._errors:
            out["unsupported"] = dict(self._errors)
        return out


# ---------------------------------------------------------------------------------------------
# GEMM peak


_PEAK_CACHE: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}


def gemm_peak(device: str | None = None, dtypes: Sequence[str] = DTYPES, target_ms: float = 100.0,
              size: int | None = None) -> dict[str, Any]:
    """This GPU's measured matmul rate per precision, in TFLOP/s.

    Each precision: C = A @ B with square `size` matrices (8192, or 4096 on GPUs under 8 GiB),
    enough back-to-back GEMMs for ~`target_ms` between two CUDA events, best of three. The
    process's float32 matmul setting is restored afterwards. Cached per device and precisions
    for the process. Raises ServeKitError when CUDA cannot be used here."""
    import torch

    dev = _require_cuda(device, "the GPU GEMM peak calibration")
    key = (str(dev), tuple(dtypes))
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"dtype {unknown[0]!r} is not one of {', '.join(DTYPES)}")
    props = torch.cuda.get_device_properties(dev)
    n = size or (8192 if props.total_memory >= 8 * 2**30 else 4096)
    saved = torch.get_float32_matmul_precision()
    tflops: dict[str, float | None] = {}
    what: dict[str, str] = {}
    errors: dict[str, str] = {}
    try:
        with torch.cuda.device(dev), torch.inference_mode():
            for name in dtypes:
                torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                               "bf16": torch.bfloat16}[name]
                torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
                try:
                    rate, iters = _gemm_rate(n, torch_dtype, dev, target_ms)
                except RuntimeError as e:  # e.g. BF16 on a GPU without it
                    tflops[name] = None
                    errors[name] = str(e).strip().splitlines()[0]
                    continue
                tflops[name] = rate / 1e12
                what[name] = f"{n}x{n}x{n} matmul, {iters} per timing, best of 3"
    finally:
        torch.set_float32_matmul_precision(saved)
    result = {"device": str(dev), "name": props.name, "tflops": tflops, "what": what,
              "method": "CUDA events around back-to-back torch.matmul"}
    if errors:
        result["errors"] = errors
    _PEAK_CACHE[key] = result
    return result


def _gemm_rate(n: int, dtype, dev, target_ms: float) -> tuple[float, int]:
    import torch

    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    for _ in range(3):  # cuBLAS picks its kernel and the clocks ramp up
        torch.matmul(a, b, out=c)
    _, one = timed_phases([("gemm", lambda _: torch.matmul(a, b, out=c))])
    iters = max(1, min(10_000, round(target_ms / max(one["gemm"], 1e-3))))

    def many(_):
        for _ in range(iters):
            torch.matmul(a, b, out=c)

    best = min(timed_phases([("gemm", many)])[1]["gemm"] for _ in range(3))
    return 2.0 * n ** 3 * iters / (best / 1e3), iters


def fraction_of_peak(flops_per_sample: float, samples_per_s: float, dtype: str = "fp16",
                     peaks: dict[str, float | None] | None = None, device: str | None = None) -> float | None:
    """Achieved FLOP/s (FLOPs per sample x samples per second) over the measured peak of `dtype`
    (TFLOP/s in `peaks`, default: this process's `gemm_peak(device)`, measured on first use).
    None when that dtype has no peak."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if peaks is None:
        peaks = gemm_peak(device)["tflops"]
    peak = peaks.get(dtype)
    if not peak:
        return None
    return flops_per_sample * samples_per_s / (peak * 1e12)


# ---------------------------------------------------------------------------------------------
# The probe `serve-kit bench` runs in its own process


def probe(device: str = "cuda:0", calibrate: bool = True) -> dict[str, Any]:
    """What the bench needs to know about a CUDA device: gpu_info, its NVML UUID and, when asked,
    the GEMM peak; {"device", "unavailable": reason} when CUDA cannot be used."""
    from ..gpu import gpu_info

    try:
        dev = _require_cuda(device, "the GPU probe")
    except ServeKitError as e:
        from ..gpu import cuda_unavailable_reason

        return {"device": device, "unavailable": cuda_unavailable_reason() or e.message}
    import torch

    info = dict(gpu_info(dev.index or 0))
    uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
    if uuid is not None:
        s = str(uuid)
        info["uuid"] = s if s.startswith(("GPU-", "MIG-")) else f"GPU-{s}"
    out: dict[str, Any] = {"device": str(dev), "info": info}
    if calibrate:
        out["gemm_peak"] = gemm_peak(str(dev))
    return out


def probe_in_subprocess(device: str = "cuda:0", calibrate: bool = True, timeout_s: float = 600) -> dict[str, Any]:
    """`probe` in a fresh interpreter: the caller never creates a CUDA context of its own."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "serve_kit.bench.gpu", device, "1" if calibrate else "0"],
                              capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"device": device, "unavailable": f"the GPU probe did not finish within {timeout_s:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the GPU probe failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else "cuda:0",
                           calibrate=(sys.argv[2] != "0") if len(sys.argv) > 2 else True)), flush=True)
