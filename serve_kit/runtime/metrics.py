"""Prometheus metrics in the text exposition format (version 0.0.4), rendered on each scrape.

Nothing is recorded here: the schedulers already count everything on their own threads without
locks (batcher.SchedulerStats), so a scrape reads those counters and formats them. That keeps the
request path free of metric-library calls and needs no dependency.

Metrics (labels `model`, `version`; counters are cumulative across reloads of a version):

    serve_kit_requests_total{status}            requests answered, by HTTP-like status (200, 400, 500, 503, 504)
    serve_kit_request_failures_total{status}    the non-200 part of the above
    serve_kit_inferences_total                  batch items (rows) inferred
    serve_kit_executions_total                  backend executions (batches)
    serve_kit_isolation_executions_total        extra executions that found the requests failing a batch
    serve_kit_queue_duration_seconds            histogram: time from arrival to the start of its batch
    serve_kit_compute_duration_seconds          histogram: its batch's compute time (input + infer + output)
    serve_kit_batch_size                        histogram: rows per execution
    serve_kit_queue_depth                       gauge: requests waiting
    serve_kit_inflight_requests                 gauge: requests accepted and not yet answered
    serve_kit_model_ready                       gauge: 1 when the version is serving
    serve_kit_breaker_state                     gauge: circuit breaker 0 closed, 1 open, 2 half_open
    serve_kit_breaker_transitions_total{to}     breaker state changes (to = closed | open | half_open)
    serve_kit_breaker_rejected_total            requests refused at once by an open breaker
    serve_kit_cache_{hits,misses,evictions}_total, serve_kit_cache_bytes, serve_kit_cache_entries
                                                response cache (versions with a breaker / cache
                                                configured; counters cumulative across reloads)
    process_cpu_seconds_total, process_resident_memory_bytes, process_virtual_memory_bytes,
    process_open_fds, process_start_time_seconds   (the names Prometheus client libraries use)
"""

from __future__ import annotations

import os
import resource
import sys
from typing import TYPE_CHECKING, Iterable

from .batcher import LATENCY_BUCKETS_S, SchedulerStats

if TYPE_CHECKING:
    from .models import ModelManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v == float("inf"):
        return "+Inf"
    return repr(float(v))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, labels: dict[str, str], bounds: Iterable[float], counts: list[int],
                  total: float) -> None:
        """`counts` per bucket (not cumulative), one more than `bounds` (the +Inf bucket)."""
        cum = 0
        for le, c in zip([*bounds, float("inf")], counts):
            cum += c
            self.sample(f"{name}_bucket", {**labels, "le": _num(le) if le != float("inf") else "+Inf"}, cum)
        self.sample(f"{name}_sum", labels, total)
        self.sample(f"{name}_count", labels, cum)


def _process_samples(w: _Writer) -> None:
    cpu = rss = vms = start = None
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        # Fields counted from `state` (the 3rd in proc(5)): utime 14, stime 15, starttime 22,
        # vsize 23, rss 24 (pages).
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        vms = int(fields[20])
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        start = btime + int(fields[19]) / ticks
    except (OSError, ValueError, IndexError, StopIteration):
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru.ru_utime + ru.ru_stime
        # Peak, not current, RSS where /proc is missing; kilobytes on Linux, bytes on macOS.
        rss = ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    w.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
    w.sample("process_cpu_seconds_total", {}, cpu)
    w.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
    w.sample("process_resident_memory_bytes", {}, rss)
    if vms is not None:
        w.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
        w.sample("process_virtual_memory_bytes", {}, vms)
    if start is not None:
        w.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
        w.sample("process_start_time_seconds", {}, start)
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    if fds is not None:
        w.family("process_open_fds", "gauge", "Number of open file descriptors.")
        w.sample("process_open_fds", {}, fds)


def _resilience_samples(w: _Writer, resilient: dict) -> None:
    """Circuit breaker and response cache samples of the versions wrapped in resilience.Resilient."""
    from .resilience import STATE_CODE

    keys = sorted(resilient)
    lab = {k: {"model": k[0], "version": str(k[1])} for k in keys}
    breakers = [(k, resilient[k].breaker) for k in keys if resilient[k].breaker is not None]
    caches = [(k, resilient[k].cache) for k in keys if resilient[k].cache is not None]
    if breakers:
        w.family("serve_kit_breaker_state", "gauge", "Circuit breaker state: 0 closed, 1 open, 2 half_open.")
        for k, b in breakers:
            w.sample("serve_kit_breaker_state", lab[k], STATE_CODE[b.state])
        w.family("serve_kit_breaker_transitions_total", "counter", "Circuit breaker state changes, by new state.")
        for k, b in breakers:
            for to, n in sorted(b.transitions.items()):
                w.sample("serve_kit_breaker_transitions_total", {**lab[k], "to": to}, n)
        w.family("serve_kit_breaker_rejected_total", "counter", "Requests refused at once by an open breaker.")
        for k, b in breakers:
            w.sample("serve_kit_breaker_rejected_total", lab[k], b.rejected)
    if caches:
        for name, kind, attr, text in (
                ("serve_kit_cache_hits_total", "counter", "hits", "Response cache hits."),
                ("serve_kit_cache_misses_total", "counter", "misses", "Response cache misses."),
                ("serve_kit_cache_evictions_total", "counter", "evictions", "Response cache LRU evictions."),
                ("serve_kit_cache_bytes", "gauge", "bytes", "Response cache size in bytes (keys + arrays)."),
                ("serve_kit_cache_entries", "gauge", "__len__", "Response cache entries.")):
            w.family(name, kind, text)
            for k, c in caches:
                w.sample(name, lab[k], len(c) if attr == "__len__" else getattr(c, attr))


def render_stats(stats: dict[tuple[str, int], SchedulerStats], ready: dict[tuple[str, int], bool] | None = None,
                 process: bool = True, resilient: dict | None = None) -> bytes:
    """The exposition text for per-(model, version) statistics."""
    w = _Writer()
    keys = sorted(stats)
    lab = {k: {"model": k[0], "version": str(k[1])} for k in keys}

    w.family("serve_kit_requests_total", "counter", "Inference requests answered, by status (HTTP code).")
    for k in keys:
        s = stats[k]
        w.sample("serve_kit_requests_total", {**lab[k], "status": "200"}, s.success_count)
        for status, (count, _) in sorted(s.fail.items()):
            w.sample("serve_kit_requests_total", {**lab[k], "status": str(status)}, count)
    w.family("serve_kit_request_failures_total", "counter", "Inference requests that failed, by status (HTTP code).")
    for k in keys:
        for status, (count, _) in sorted(stats[k].fail.items()):
            w.sample("serve_kit_request_failures_total", {**lab[k], "status": str(status)}, count)
    w.family("serve_kit_inferences_total", "counter", "Batch items (rows) inferred.")
    for k in keys:
        w.sample("serve_kit_inferences_total", lab[k], stats[k].inference_count)
    w.family("serve_kit_executions_total", "counter", "Backend executions (batches).")
    for k in keys:
        w.sample("serve_kit_executions_total", lab[k], stats[k].execution_count)
    w.family("serve_kit_isolation_executions_total", "counter",
             "Extra backend executions spent finding which requests of a failed batch cause the failure.")
    for k in keys:
        w.sample("serve_kit_isolation_executions_total", lab[k], stats[k].isolation_runs)

    w.family("serve_kit_queue_duration_seconds", "histogram",
             "Time a request waited in the queue before its batch started.")
    for k in keys:
        s = stats[k]
        w.histogram("serve_kit_queue_duration_seconds", lab[k], LATENCY_BUCKETS_S, s.queue_hist, s.queue_ns / 1e9)
    w.family("serve_kit_compute_duration_seconds", "histogram",
             "Compute time of the batch a request ran in (gather inputs, infer, split outputs).")
    for k in keys:
        s = stats[k]
        per_request_ns = s.compute_input_ns + s.compute_infer_ns + s.compute_output_ns
        w.histogram("serve_kit_compute_duration_seconds", lab[k], LATENCY_BUCKETS_S, s.compute_hist,
                    per_request_ns / 1e9)
    w.family("serve_kit_batch_size", "histogram", "Rows per backend execution.")
    for k in keys:
        counts = [0] * (len(BATCH_BUCKETS) + 1)
        total = 0
        for size, b in stats[k].batches.items():
            i = next((j for j, le in enumerate(BATCH_BUCKETS) if size <= le), len(BATCH_BUCKETS))
            counts[i] += b[0]
            total += size * b[0]
        w.histogram("serve_kit_batch_size", lab[k], BATCH_BUCKETS, counts, total)

    w.family("serve_kit_queue_depth", "gauge", "Requests waiting in the queue.")
    for k in keys:
        w.sample("serve_kit_queue_depth", lab[k], stats[k].queue_depth)
    w.family("serve_kit_inflight_requests", "gauge", "Requests accepted and not yet answered.")
    for k in keys:
        w.sample("serve_kit_inflight_requests", lab[k], stats[k].inflight)
    if ready is not None:
        w.family("serve_kit_model_ready", "gauge", "1 when the model version is loaded and serving.")
        for k in sorted(ready):
            w.sample("serve_kit_model_ready", {"model": k[0], "version": str(k[1])}, int(ready[k]))
    if resilient:
        _resilience_samples(w, resilient)
    if process:
        _process_samples(w)
    return ("\n".join(w.lines) + "\n").encode()


class Metrics:
    """The `/metrics` endpoint's body for a ModelManager: `render()` on each scrape."""

    content_type = CONTENT_TYPE

    def __init__(self, manager: "ModelManager"):
        self.manager = manager

    def render(self) -> bytes:
        stats = self.manager.scheduler_stats()
        ready = {k: state == "READY" for k, state in self.manager.version_states().items()}
        return render_stats(stats, ready, resilient=self.manager.resilient()) + render_routes(self.manager.router)


def render_routes(router) -> bytes:
    """The router's metrics (runtime/router.py): per endpoint and the target that answered."""
    w = _Writer()
    c = router.counters

    def lab(key: tuple, *names: str) -> dict[str, str]:
        return dict(zip(names, key))

    w.family("serve_kit_route_requests_total", "counter",
             "Requests to routed endpoints by the target that answered, its role (primary, fallback, shadow, "
             "compare) and the status (HTTP code).")
    for k in sorted(c.requests):
        w.sample("serve_kit_route_requests_total", lab(k, "endpoint", "model", "version", "role", "code"), c.requests[k])
    w.family("serve_kit_route_request_duration_seconds", "histogram",
             "Time from routing a request to its target's answer (queue and compute), by target and role.")
    for k in sorted(c.durations):
        h = c.durations[k]
        w.histogram("serve_kit_route_request_duration_seconds", lab(k, "endpoint", "model", "version", "role"),
                    LATENCY_BUCKETS_S, h.counts, h.total)
    routes = router.all()
    w.family("serve_kit_route_weight", "gauge", "Share (0..1) of an endpoint's requests its route sends to a target.")
    for r in routes:
        for t, share in zip(r.targets, r.shares):
            w.sample("serve_kit_route_weight", {"endpoint": r.endpoint, "model": t.model,
                                                "version": str(t.version) if t.version is not None else "latest"}, share)
    w.family("serve_kit_route_generation", "gauge", "Changes made to an endpoint's route (its generation).")
    for r in routes:
        w.sample("serve_kit_route_generation", {"endpoint": r.endpoint}, r.generation)
    labels4 = ("endpoint", "model", "version", "source")
    with c.lock:
        for name, table, text in (
                ("serve_kit_shadow_agreement", c.agreement,
                 "Rows compared between a mirrored target and the reference (_count) and the rows that agree "
                 "(_sum): top-1 decision for class scores, else cosine."),
                ("serve_kit_shadow_cosine", c.cosine, "Cosine similarity with the reference, summed over compared rows."),
                ("serve_kit_shadow_max_abs_error", c.max_abs_error,
                 "Largest absolute error against the reference per compared batch, summed over its rows.")):
            w.family(name, "summary", text)
            for k in sorted(table):
                w.sample(f"{name}_sum", lab(k, *labels4), table[k].total)
                w.sample(f"{name}_count", lab(k, *labels4), table[k].count)
    w.family("serve_kit_shadow_dropped_total", "counter",
             "Mirrored requests not compared: shed (bound reached, target refused) or error (the target failed).")
    for k in sorted(c.dropped):
        w.sample("serve_kit_shadow_dropped_total", lab(k, "endpoint", "model", "version", "reason"), c.dropped[k])
    w.family("serve_kit_fallbacks_total", "counter", "Requests a fallback answered, by fallback target and reason.")
    for k in sorted(c.fallbacks):
        w.sample("serve_kit_fallbacks_total", lab(k, "endpoint", "model", "version", "reason"), c.fallbacks[k])
    w.family("serve_kit_idempotent_replays_total", "counter",
             "Retried requests (same Idempotency-Key) answered from the first attempt without running again.")
    for k in sorted(c.replays):
        w.sample("serve_kit_idempotent_replays_total", {"endpoint": k}, c.replays[k])
    return ("\n".join(w.lines) + "\n").encode()


def render(manager: "ModelManager") -> bytes:
    return Metrics(manager).render()

