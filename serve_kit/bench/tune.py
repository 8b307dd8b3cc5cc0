"""`serve-kit bench tune`: pick batching settings for serve-kit's runtime by measuring it.

1. Service time against batch size, in-process (the offline bench on the latest version): where
   the per-sample cost stops falling is where a larger max_batch_size stops paying.
2. A coordinate search over real runs of the runtime (`serve-kit serve` on 127.0.0.1, a copy of
   the model's folder whose config.yaml is rewritten per candidate): max_batch_size (delay 0),
   then max_queue_delay_microseconds for the best batch size, then instance_group.count. Each
   candidate is loaded closed-loop at rising concurrency; its score is the highest throughput
   whose p99 is within the budget (with --rate, it must also keep that budget under open-loop
   load at the rate, without errors).
3. max_queue_size is set so that a full queue drains within the budget at the measured rate
   (a request that cannot be served in time is refused at once with 503 instead of timing out).
4. The winner is verified by a fresh run (open loop at --rate, else closed loop at its best
   concurrency); only a verified configuration is written into config.yaml (ModelConfig).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GateFailed, InputError, UsageError
from ..progress import ProgressSink


@dataclass
class TuneJob:
    repository: Path
    model: str | None
    p99_budget_ms: float
    rate: float | None = None
    """Open-loop request rate the settings must sustain within the budget (None: best closed-loop)."""
    data: Path | None = None
    synthetic: bool = False
    write: bool = True
    warmup_s: float = 1.0
    window_s: float = 1.0
    windows: int = 3
    stability_pct: float = 10.0
    timeout_s: float = 30.0
    batch_sizes: list[int] | None = None
    """Candidate max_batch_size values (default: from the service-time curve)."""
    delays_us: list[int] | None = None
    """Candidate max_queue_delay_microseconds values (default: 0 and fractions of the service time)."""
    instances: list[int] | None = None
    """Candidate instance counts (default: 1, and 2 when the machine has more than 2 cores)."""
    concurrency: list[int] | None = None
    """Closed-loop concurrencies per candidate (default: 1, b/2, b, 2b for max_batch_size b)."""


@dataclass
class Candidate:
    max_batch_size: int
    delay_us: int
    instances: int
    points: list[dict] = field(default_factory=list)
    best: dict | None = None
    open_loop: dict | None = None
    feasible: bool = False
    error: str | None = None

    @property
    def label(self) -> str:
        return f"batch {self.max_batch_size}, delay {self.delay_us} us, {self.instances} instance(s)"

    def to_dict(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_queue_delay_microseconds": self.delay_us,
                "instances": self.instances, "feasible": self.feasible, "error": self.error,
                "best": self.best, "open_loop": self.open_loop,
                "points": [{k: p.get(k) for k in ("key", "throughput", "p50_ms", "p99_ms", "errors_total", "stable")}
                           for p in self.points]}


class _Server:
    """`serve-kit serve REPO --no-grpc` on a free port; the ready line gives the port."""

    def __init__(self, repository: Path, cores: str | None = None):
        cmd = [sys.executable, "-m", "serve_kit", "--json", "serve", str(repository), "--http-port", "0", "--no-grpc"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        if not box or not box[0]:
            self.stop()
            raise InputError("the runtime did not start for a tuning run", origin=str(repository),
                             hint=self.proc.stderr.read()[-1500:] if self.proc.stderr else None)
        info = json.loads(box[0])
        self.url = info["http"]
        failed = [m for m in info.get("models", []) if m.get("state") != "READY"]
        if failed:
            self.stop()
            raise InputError(f"the runtime could not load the model for a tuning run: {failed[0].get('reason')}",
                             origin=str(repository))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate(timeout=10)


def run_tune(job: TuneJob, progress: ProgressSink | None = None) -> dict[str, Any]:
    from ..repository import Repository, atomic_write_text, dump_config
    from .report import environment

    progress = progress or ProgressSink()
    repo = Repository(Path(job.repository))
    models = repo.models()
    if not models:
        raise InputError("no models in the repository", value=str(job.repository), origin="REPOSITORY")
    model = job.model or (models[0] if len(models) == 1 else None)
    if model is None:
        raise UsageError("the repository holds several models: say which with --model", origin="--model",
                         hint=f"models: {', '.join(models)}")
    if model not in models:
        raise UsageError("no such model in the repository", value=model, origin="--model",
                         hint=f"models: {', '.join(models)}")
    config = repo.config(model)
    if config.max_batch_size == 0:
        raise UsageError(f"model {model!r} does not batch (max_batch_size 0): nothing to tune", value=model,
                         origin="--model")
    latest = repo.version_numbers(model)[-1]
    budget = job.p99_budget_ms

    # 1. service time against batch size (the model accepts any batch: its batch dim is -1)
    sizes = sorted({b for b in (job.batch_sizes or [1, 2, 4, 8, 16, 32, 64]) if b >= 1})
    service = _service_curve(repo.root, model, latest, sizes, job, progress)
    per_sample = {r["batch_size"]: r["p50_ms"] / r["batch_size"] for r in service}
    best_per_sample = min(per_sample.values())
    # batch sizes worth trying: those within reach of the budget, around where the per-sample
    # cost comes within 15 % of its best
    fits = [b for b in sizes if _p50(service, b) <= budget / 2]
    if not fits:
        raise GateFailed(f"even batch size 1 takes {_p50(service, sizes[0]):.3f} ms in-process (p50), over half the "
                         f"p99 budget of {budget:g} ms: no setting can meet it", origin="--p99-budget-ms")
    knee = next(b for b in fits if per_sample[b] <= best_per_sample * 1.15) if any(
        per_sample[b] <= best_per_sample * 1.15 for b in fits) else fits[-1]
    if job.batch_sizes:
        batch_candidates = fits
    else:
        i = fits.index(knee)
        batch_candidates = sorted({fits[max(0, i - 1)], knee, fits[min(len(fits) - 1, i + 1)], 1})

    work = Path(tempfile.mkdtemp(prefix="serve-kit-tune-"))
    try:
        trial_repo = work / "repo"
        (trial_repo / model).mkdir(parents=True)
        shutil.copytree(repo.root / model / str(latest), trial_repo / model / str(latest))
        data = job.data if job.data is not None else (None if job.synthetic else trial_repo)
        env = environment()

        def evaluate(c: Candidate) -> Candidate:
            cfg = _candidate_config(config, c, queue_size=max(config.dynamic_batching.max_queue_size
                                                              if config.dynamic_batching else 256, 64))
            atomic_write_text(trial_repo / model / "config.yaml", dump_config(cfg))
            try:
                server = _Server(trial_repo)
            except InputError as e:
                c.error = e.message
                return c
            try:
                conc = job.concurrency or sorted({1, max(1, c.max_batch_size // 2), c.max_batch_size,
                                                  2 * c.max_batch_size})
                for n in conc:
                    point = _load(job, server.url, model, data, progress, concurrency=n)
                    c.points.append(point)
                    if point["p99_ms"] is not None and point["p99_ms"] > budget * 1.5:
                        break  # higher concurrency only queues longer
                ok = [p for p in c.points if p["p99_ms"] is not None and p["p99_ms"] <= budget
                      and p["errors_total"] == 0]
                c.best = max(ok, key=lambda p: p["throughput"]) if ok else None
                c.feasible = c.best is not None
                if job.rate and c.feasible:
                    c.open_loop = _load(job, server.url, model, data, progress, rate=job.rate)
                    c.feasible = (c.open_loop["p99_ms"] is not None and c.open_loop["p99_ms"] <= budget
                                  and c.open_loop["errors_total"] == 0)
            finally:
                server.stop()
            progress.log(f"  {c.label}: " + (f"{c.best['throughput']:,.0f} infer/s at p99 {c.best['p99_ms']:.2f} ms"
                                               if c.best else "no load within the budget")
                         + (f"; at {job.rate:g}/s p99 {c.open_loop['p99_ms']:.2f} ms" if c.open_loop else ""), "dim")
            return c

        def score(c: Candidate) -> float:
            return c.best["throughput"] if c.feasible and c.best else -1.0

        tried: list[Candidate] = []
        current = Candidate(config.max_batch_size,
                            config.dynamic_batching.max_queue_delay_microseconds if config.dynamic_batching else 0,
                            config.instance_group.count)
        with progress.task("measuring the current settings", None):
            before = evaluate(current)
        tried.append(before)
        with progress.task(f"max_batch_size: {', '.join(map(str, batch_candidates))}", len(batch_candidates)) as adv:
            stage = []
            for b in batch_candidates:
                stage.append(evaluate(Candidate(b, 0, 1)))
                adv(1)
        tried += stage
        best = max(stage, key=score)
        svc_us = _p50(service, best.max_batch_size) * 1000
        delays = [d for d in (job.delays_us or _delays(svc_us, budget)) if d != best.delay_us]
        with progress.task(f"max_queue_delay_microseconds: {', '.join(map(str, delays)) or 'none'}",
                           max(1, len(delays))) as adv:
            stage = [best]
            for d in delays:
                stage.append(evaluate(Candidate(best.max_batch_size, d, best.instances)))
                adv(1)
        tried += stage[1:]
        best = max(stage, key=score)
        from ..runtime.models import available_cores

        counts = job.instances or ([1, 2] if available_cores() > 2 else [1])
        counts = [n for n in counts if n != best.instances]
        with progress.task(f"instance count: {', '.join(map(str, counts)) or 'none'}", max(1, len(counts))) as adv:
            stage = [best]
            for n in counts:
                stage.append(evaluate(Candidate(best.max_batch_size, best.delay_us, n)))
                adv(1)
        tried += stage[1:]
        best = max(stage, key=score)

        result: dict[str, Any] = {
            "format": "serve-kit/bench@1", "kind": "tune", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": env, "repository": str(job.repository), "model": model, "version": latest,
            "p99_budget_ms": budget, "rate": job.rate, "service_time": [
                {"batch_size": r["batch_size"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                 "per_sample_ms": r["p50_ms"] / r["batch_size"]} for r in service],
            "candidates": [c.to_dict() for c in tried], "before": before.to_dict(), "written": False,
        }
        if not best.feasible:
            result["chosen"] = None
            result["reason"] = "no candidate met the p99 budget" + (f" at {job.rate:g} requests/s" if job.rate else "")
            return result
        queue = _queue_size(best, budget)
        chosen_cfg = _candidate_config(config, best, queue)
        atomic_write_text(trial_repo / model / "config.yaml", dump_config(chosen_cfg))
        with progress.task("verifying the chosen settings with a fresh run", None):
            server = _Server(trial_repo)
            try:
                verify = (_load(job, server.url, model, data, progress, rate=job.rate) if job.rate else
                          _load(job, server.url, model, data, progress,
                                concurrency=int(best.best["key"].split("=")[1])))
            finally:
                server.stop()
        verified = verify["p99_ms"] is not None and verify["p99_ms"] <= budget and verify["errors_total"] == 0
        result["chosen"] = {**best.to_dict(), "max_queue_size": queue}
        result["verification"] = {k: verify.get(k) for k in ("key", "throughput", "p50_ms", "p99_ms", "errors",
                                                             "errors_total", "stable")}
        result["verified"] = verified
        result["config_before"] = _settings(config)
        result["config_after"] = _settings(chosen_cfg)
        if verified and job.write:
            atomic_write_text(repo.root / model / "config.yaml", dump_config(chosen_cfg))
            result["written"] = True
            result["config_path"] = str(repo.root / model / "config.yaml")
        elif not verified:
            result["reason"] = (f"the verification run missed the budget: p99 {verify['p99_ms']} ms, "
                                f"{verify['errors_total']} errors")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _delays(service_us: float, budget_ms: float) -> list[int]:
    """Three delays from about half a batch's service time (at least 50 us) up to a quarter of
    the budget (at most 5 ms), geometrically spaced."""
    lo = max(50.0, service_us / 2)
    hi = min(budget_ms * 1000 / 4, 5000.0)
    if hi <= lo:
        return [int(lo)] if lo <= budget_ms * 1000 / 4 else []
    return sorted({int(lo), int(math.sqrt(lo * hi)), int(hi)})


def _p50(service: list[dict], b: int) -> float:
    return next(r["p50_ms"] for r in service if r["batch_size"] == b)


def _service_curve(root: Path, model: str, version: int, sizes: list[int], job: TuneJob,
                   progress: ProgressSink) -> list[dict]:
    from .offline import _run_child

    spec = {"repository": str(root), "model": model, "version": version, "sizes": sizes, "warmup_s": 0.2,
            "window_s": 0.3, "min_windows": 3, "max_windows": 5, "stability_pct": job.stability_pct,
            "synthetic": job.synthetic, "flops": False}
    out = _run_child(spec, progress, f"service time of {model} v{version} by batch size", len(sizes) * 5)
    if "unavailable" in out:
        raise InputError(f"cannot run the model here: {out['unavailable']}", value=model, origin=str(root))
    return out["rows"]


def _candidate_config(config, c: Candidate, queue_size: int):
    from ..config import DynamicBatching

    db = config.dynamic_batching or DynamicBatching()
    db = db.model_copy(update={"max_queue_delay_microseconds": c.delay_us, "max_queue_size": queue_size,
                               "preferred_batch_size": [b for b in db.preferred_batch_size if b <= c.max_batch_size]})
    return config.model_copy(update={"max_batch_size": c.max_batch_size, "dynamic_batching": db,
                                     "instance_group": config.instance_group.model_copy(update={"count": c.instances}),
                                     "warmup": config.warmup.model_copy(update={"batch_sizes": sorted(
                                         {min(b, c.max_batch_size) for b in config.warmup.batch_sizes})})})


def _queue_size(c: Candidate, budget_ms: float) -> int:
    """Requests that can wait and still be answered within the budget at the measured rate."""
    rate = c.best["requests_per_s"] if c.best else 0
    service = c.best["p50_ms"] if c.best else budget_ms
    room_s = max(budget_ms - service, 0.0) / 1000
    return max(c.max_batch_size * 2, math.ceil(rate * room_s))


def _settings(config) -> dict:
    db = config.dynamic_batching
    return {"max_batch_size": config.max_batch_size,
            "max_queue_delay_microseconds": db.max_queue_delay_microseconds if db else None,
            "max_queue_size": db.max_queue_size if db else None, "instances": config.instance_group.count}


def _load(job: TuneJob, url: str, model: str, data, progress: ProgressSink, *, concurrency: int | None = None,
          rate: float | None = None) -> dict:
    from .online import OnlineJob, run_online

    online = OnlineJob(url=url, model=model, data=data, synthetic=job.synthetic and data is None,
                       concurrency=[concurrency] if concurrency else [], rates=[rate] if rate else [],
                       warmup_s=job.warmup_s, window_s=job.window_s, min_windows=job.windows,
                       max_windows=job.windows, stability_pct=job.stability_pct, timeout_s=job.timeout_s)
    return run_online(online, _Quiet(progress))["results"][0]


class _Quiet(ProgressSink):
    """Keeps warnings, drops the per-window chatter of the many tuning runs."""

    def __init__(self, inner: ProgressSink):
        self.inner = inner

    def log(self, message: str, style: str = "") -> None:
        if style.startswith("bold yellow"):
            self.inner.log(message, style)


def render(result: dict, out) -> None:
    from rich.markup import escape
    from rich.table import Table

    svc = Table(title=f"service time of {escape(result['model'])} v{result['version']} (in-process)")
    for c in ("batch", "p50 ms", "p99 ms", "ms per sample"):
        svc.add_column(c, justify="right")
    for r in result["service_time"]:
        svc.add_row(str(r["batch_size"]), f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['per_sample_ms']:.4f}")
    out.print(svc)
    t = Table(title=f"candidates (p99 budget {result['p99_budget_ms']:g} ms"
                    + (f", at {result['rate']:g} requests/s" if result["rate"] else "") + ")")
    for c in ("max batch", "delay us", "instances", "best infer/s", "at p99 ms", "open-loop p99 ms", "within budget"):
        t.add_column(c, justify="right")
    for c in result["candidates"]:
        best = c["best"] or {}
        t.add_row(str(c["max_batch_size"]), str(c["max_queue_delay_microseconds"]), str(c["instances"]),
                  f"{best['throughput']:,.0f}" if best else "-", f"{best['p99_ms']:.2f}" if best else "-",
                  f"{c['open_loop']['p99_ms']:.2f}" if c.get("open_loop") and c["open_loop"].get("p99_ms") else "-",
                  "[green]yes[/]" if c["feasible"] else f"[red]{escape(c['error'] or 'no')}[/]")
    out.print(t)
    if result.get("chosen") is None:
        out.print(f"[red]nothing chosen[/]: {escape(result.get('reason', ''))}")
        return
    ba = Table(title="config.yaml: before / after")
    for c in ("setting", "before", "after"):
        ba.add_column(c, justify="left" if c == "setting" else "right")
    for k, v in result["config_after"].items():
        ba.add_row(k, str(result["config_before"][k]), str(v))
    before = result["before"].get("best") or {}
    after = result["chosen"].get("best") or {}
    ba.add_row("closed loop: best infer/s within the budget", f"{before['throughput']:,.0f}" if before else "none",
               f"{after['throughput']:,.0f}" if after else "none")
    ba.add_row("  its p99 ms", f"{before['p99_ms']:.2f}" if before else "-", f"{after['p99_ms']:.2f}" if after else "-")
    ver = result["verification"]
    if result["rate"]:
        ol = result["before"].get("open_loop") or {}
        ba.add_row(f"open loop at {result['rate']:g}/s: p99 ms", f"{ol['p99_ms']:.2f}" if ol.get("p99_ms") else "-",
                   (f"{ver['p99_ms']:.2f}" if ver.get("p99_ms") is not None else "-") + " (verification run)")
    else:
        ba.add_row(f"verification run ({ver['key']}): infer/s, p99 ms", "",
                   f"{ver['throughput']:,.0f}, {ver['p99_ms']:.2f}" if ver.get("p99_ms") is not None else "-")
    out.print(ba)
    if result["written"]:
        out.print(f"[green]wrote[/] {escape(result['config_path'])}")
    elif not result["verified"]:
        out.print(f"[red]not written[/]: {escape(result.get('reason', ''))}")
    else:
        out.print("not written (--no-write)")
