"""Online benchmark: load an Open Inference Protocol server and measure what its clients see.

One sweep point = one load (a closed-loop concurrency or an open-loop rate), measured in equal
windows after a warm-up until the last three windows agree (p50 and throughput within
`stability_pct`) or `max_windows` is reached (then the point is UNSTABLE). The point's numbers
cover every measured window (a window with a stall is never dropped); each window's own numbers
are in the report, and they are what a baseline comparison resamples.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InputError, UsageError
from ..progress import ProgressSink
from . import inputs as inp
from . import stats
from .loadgen import SATURATED_CPU, LoadRun, WorkerFailed, WorkerSpec, split

LAG_WARN_MS = 1.0
"""Open loop: a p99 send lag above this means the generator did not keep to its schedule."""


class OnlineJob(BaseModel):
    """An online benchmark (`serve-kit bench --url URL --model NAME`)."""

    model_config = ConfigDict(extra="forbid")

    url: str
    """Server base URL: http://HOST:PORT (HTTP/REST) or grpc://HOST:PORT (gRPC)."""
    model: str = Field(min_length=1)
    version: Optional[str] = None
    """Model version; None = the server's choice (latest)."""
    encoding: Literal["binary", "json"] = "binary"
    """HTTP tensor encoding: Triton's binary extension (inputs and outputs) or JSON."""
    concurrency: list[int] = Field(default_factory=list)
    """Closed loop: outstanding requests at each sweep point."""
    rates: list[float] = Field(default_factory=list)
    """Open loop: offered request rates (requests/s) at each sweep point."""
    arrival: Literal["poisson", "constant"] = "poisson"
    batch_size: int = Field(default=1, ge=1)
    """Rows per request (models that batch)."""
    data: Optional[Path] = None
    """A .npz/.npy file, a folder of them, or a model repository (its version's samples.npz)."""
    synthetic: bool = False
    """Random inputs (only on request; labelled SYNTHETIC everywhere)."""
    workers: int = Field(default=1, ge=1)
    """Load generator processes."""
    warmup_s: float = Field(default=1.0, ge=0)
    window_s: float = Field(default=1.0, gt=0)
    min_windows: int = Field(default=3, ge=1)
    max_windows: int = Field(default=10, ge=1)
    stability_pct: float = Field(default=10.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)
    """Per-request timeout; a request not answered in time counts as a `timeout` error."""
    max_connections: int = Field(default=1024, ge=1)
    """Open loop over HTTP: most connections per worker (each carries one request at a time)."""
    seed: int = 0

    @model_validator(mode="after")
    def _one_mode(self) -> "OnlineJob":
        if self.concurrency and self.rates:
            raise ValueError("give --concurrency (closed loop) or --rate (open loop), not both")
        if not self.concurrency and not self.rates:
            self.concurrency = [1]
        if self.max_windows < self.min_windows:
            raise ValueError(f"--max-windows {self.max_windows} is below --min-windows {self.min_windows}")
        return self

    @property
    def mode(self) -> str:
        return "open" if self.rates else "closed"


def run_online(job: OnlineJob, progress: ProgressSink | None = None) -> dict[str, Any]:
    from .report import environment

    progress = progress or ProgressSink()
    target = inp.parse_target(job.url, job.model, job.version)
    info = inp.fetch_model_info(target)
    if job.batch_size > 1 and not info.batching:
        raise UsageError(f"model {job.model!r} does not batch (max_batch_size 0), so --batch-size must be 1",
                         value=job.batch_size, origin="--batch-size")
    if info.batching and info.batch_source == "model config" and job.batch_size > info.max_batch_size:
        raise UsageError(f"--batch-size is over the model's max_batch_size {info.max_batch_size}",
                         value=job.batch_size, origin="--batch-size")
    data = inp.load_data(job.data, job.synthetic, info, job.model, job.version, job.seed)
    if data.synthetic:
        progress.warn("WARNING: SYNTHETIC random inputs (--synthetic): latency can differ from real data")
    request_inputs = inp.request_inputs(data, info, job.batch_size)
    if target.protocol == "grpc":
        payloads = inp.grpc_requests(target, info, request_inputs)
        encoding = "raw (gRPC)"
    else:
        payloads = inp.http_requests(target, info, request_inputs, binary=job.encoding == "binary")
        encoding = job.encoding
    outputs = inp.preflight(target, payloads[0], timeout=job.timeout_s)

    env = environment()
    points = []
    loads = job.concurrency if job.mode == "closed" else job.rates
    for load in loads:
        points.append(_run_point(job, target, payloads, load, progress))
    return {
        "format": "serve-kit/bench@1",
        "kind": "online",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "target": {"url": job.url, "protocol": target.protocol, "model": job.model, "version": job.version,
                   "encoding": encoding, "batch_size": job.batch_size, "platform": info.platform,
                   "max_batch_size": info.max_batch_size, "batch_source": info.batch_source,
                   "inputs": [t.describe() for t in info.inputs], "outputs": outputs},
        "inputs": {**data.describe(), "requests": len(payloads), "requests_sha256": inp.payload_sha256(payloads)},
        "synthetic": data.synthetic,
        "model_hashes": data.model_hashes,
        "settings": job.model_dump(mode="json"),
        "mode": job.mode,
        "results": points,
        "warnings": [w for p in points for w in p["warnings"]],
    }


def _specs(job: OnlineJob, target: inp.Target, payloads: list[bytes], load: float) -> list[WorkerSpec]:
    common = dict(protocol=target.protocol, host=target.host, port=target.port, payloads=payloads, mode=job.mode,
                  arrival=job.arrival, timeout_s=job.timeout_s, warmup_s=job.warmup_s, window_s=job.window_s,
                  max_connections=job.max_connections)
    if job.mode == "closed":
        shares = [c for c in split(int(load), min(job.workers, int(load))) if c > 0]
        return [WorkerSpec(index=i, concurrency=c, seed=job.seed + i, **common) for i, c in enumerate(shares)]
    n = job.workers
    # Enough open connections from the start for the expected concurrency at 5 ms per request.
    initial = max(2, min(64, math.ceil(load / n * 0.005) + 2))
    return [WorkerSpec(index=i, rate=load / n, seed=job.seed + 7919 * i, initial_connections=initial, **common)
            for i in range(n)]


def point_key(mode: str, load: float, batch_size: int) -> str:
    return f"concurrency={int(load)}" if mode == "closed" else f"rate={load:g}"


def _run_point(job: OnlineJob, target: inp.Target, payloads: list[bytes], load: float,
               progress: ProgressSink) -> dict[str, Any]:
    key = point_key(job.mode, load, job.batch_size)
    run = LoadRun(_specs(job, target, payloads, load))
    windows: list[dict[str, Any]] = []
    merged = stats.new_histogram()
    lag = stats.new_histogram()
    totals: dict[str, Any] = {}
    try:
        try:
            run.start()
        except WorkerFailed as e:
            raise InputError(f"the load generator could not start: {e}", origin=job.url) from None
        wait = job.warmup_s + job.window_s + job.timeout_s + 10
        with progress.task(f"{key}: warm-up {job.warmup_s:g} s, windows of {job.window_s:g} s",
                           job.max_windows) as advance:
            while len(windows) < job.max_windows:
                try:
                    w = run.next(wait)
                except WorkerFailed as e:
                    raise InputError(f"the load generator failed: {e}", origin=job.url) from None
                if w is None:
                    raise InputError(f"no measurement window completed within {wait:.0f} s", origin=job.url,
                                     hint="the server may be hung; see --timeout")
                wait = job.window_s + job.timeout_s + 10
                merged.add(w.hist)
                lag.add(w.lag)
                windows.append(_window_doc(w, job))
                advance(1)
                last = windows[-1]
                progress.log(f"  {key} window {len(windows)}: {last['throughput']:,.0f} infer/s, "
                             f"p50 {_ms(last['p50_ms'])}, p99 {_ms(last['p99_ms'])}"
                             + (f", {last['errors_total']} errors" if last["errors_total"] else ""), "dim")
                if len(windows) >= job.min_windows and _stable(windows, job.stability_pct):
                    break
            advance(job.max_windows - len(windows))
        totals = run.stop(len(windows) - 1, timeout=job.timeout_s + 10)
    finally:
        run.close()
    return _point_doc(job, key, load, windows, merged, lag, totals)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _window_doc(w, job: OnlineJob) -> dict[str, Any]:
    s = stats.summary(w.hist)
    errors = sum(w.errors.values())
    return {"index": w.index, "ok": w.ok, "errors": w.errors, "errors_total": errors, "offered": w.offered,
            "sent": w.sent, "throughput": w.ok * job.batch_size / job.window_s, "requests_per_s": w.ok / job.window_s,
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"],
            "lag_p99_ms": stats.summary(w.lag)["p99_ms"], "generator_cpu": w.cpu, "max_pending": w.max_pending,
            "hist": stats.encode(w.hist)}


def _stable(windows: list[dict], pct: float) -> bool:
    return stats.is_stable([w["p50_ms"] for w in windows], [w["throughput"] for w in windows], pct)


def _point_doc(job: OnlineJob, key: str, load: float, windows: list[dict], merged, lag,
               totals: dict[int, dict]) -> dict[str, Any]:
    n = len(windows)
    duration = n * job.window_s
    ok = sum(w["ok"] for w in windows)
    errors: dict[str, int] = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    n_err = sum(errors.values())
    offered = sum(w["offered"] for w in windows)
    sent = sum(w["sent"] for w in windows)
    summary = stats.summary(merged)
    lag_summary = stats.summary(lag)
    # CPU per worker averaged over the windows (1.0 = a whole core).
    per_worker = [sum(w["generator_cpu"][i] for w in windows) / n for i in range(len(windows[0]["generator_cpu"]))] \
        if n else []
    stable = n >= stats.STABLE_WINDOWS and _stable(windows, job.stability_pct)
    warnings = []
    saturated = any(c > SATURATED_CPU for c in per_worker)
    if saturated and job.mode == "closed":
        warnings.append(f"{key}: the load generator used {max(per_worker):.0%} of a core: it may be the "
                        f"bottleneck; add workers (--workers) or run it on another machine")
    lag_p99 = lag_summary["p99_ms"] or 0.0
    if job.mode == "open" and lag_p99 > LAG_WARN_MS:
        queue = max((w["max_pending"] for w in windows), default=0)
        why = (f"up to {queue} requests waited for a free connection (--max-connections)" if queue
               else "the generator or its machine is busy: add workers (--workers) or lower the rate")
        warnings.append(f"{key}: requests left the generator up to {lag_p99:.2f} ms (p99) after their intended "
                        f"time (counted in the latencies): {why}")
        saturated = True
    if not stable:
        warnings.append(f"{key}: UNSTABLE: the last {stats.STABLE_WINDOWS} of {n} windows differ by more than "
                        f"{job.stability_pct:g}% (p50 spread {stats.spread([w['p50_ms'] for w in windows[-3:]]):.1f}%, "
                        f"throughput spread {stats.spread([w['throughput'] for w in windows[-3:]]):.1f}%)")
    if n_err:
        top = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))
        warnings.append(f"{key}: {n_err} of {ok + n_err} requests failed ({top})")
    return {
        "key": key,
        "mode": job.mode,
        "concurrency": int(load) if job.mode == "closed" else None,
        "offered_rate": load if job.mode == "open" else None,
        "arrival": job.arrival if job.mode == "open" else None,
        "batch_size": job.batch_size,
        "windows_measured": n,
        "window_s": job.window_s,
        "duration_s": duration,
        "stable": stable,
        "requests": ok + n_err,
        "ok": ok,
        "errors": errors,
        "errors_total": n_err,
        "error_rate": n_err / (ok + n_err) if ok + n_err else 0.0,
        "timeouts": errors.get("timeout", 0),
        "throughput": ok * job.batch_size / duration if duration else 0.0,
        "requests_per_s": ok / duration if duration else 0.0,
        "offered_per_s": offered / duration if duration else 0.0,
        "sent_per_s": sent / duration if duration else 0.0,
        **{k: v for k, v in summary.items() if k != "count"},
        "send_lag": {k: v for k, v in lag_summary.items() if k in ("p50_ms", "p99_ms", "max_ms")},
        "generator": {"workers": len(per_worker), "cpu_per_worker": per_worker, "saturated": saturated,
                      "max_client_queue": max((w["max_pending"] for w in windows), default=0),
                      "connections_opened": sum(t.get("connections_opened", 0) for t in totals.values()),
                      "late_requests_not_counted": sum(t.get("stragglers", 0) for t in totals.values()),
                      "warmup_errors": _sum_dicts(t.get("warmup_errors", {}) for t in totals.values())},
        "per_window": {"throughput": [w["throughput"] for w in windows], "p50_ms": [w["p50_ms"] for w in windows],
                       "p99_ms": [w["p99_ms"] for w in windows]},
        "windows": [{k: v for k, v in w.items() if k != "hist"} for w in windows],
        "histogram": stats.encode(merged),
        "warnings": warnings,
    }


def _sum_dicts(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
