"""The per-model-version scheduler: a request queue, dynamic batching and a pool of instance threads.

Request path: router (models.ModelManager) -> scheduler (this module) -> backend instance.

The event loop only appends requests to a queue and awaits futures; everything that takes time
(concatenating a batch, running the backend, slicing the outputs) happens on one worker thread
per model instance, each owning its backend (backends are never shared between threads). Results
go back to the event loop with one `call_soon_threadsafe` per batch, so the loop never blocks on a
backend and a hung backend only holds its own thread.

Semantics follow Triton's dynamic batcher wherever Triton defines them:

* a batch is formed from queued requests of one shape (the non-batch dims of every input), up to
  `max_batch_size` rows; it is dispatched as soon as it reaches the largest preferred batch size
  (or `max_batch_size` without preferred sizes), otherwise when its oldest request has waited
  `max_queue_delay_microseconds`, cut to the largest preferred size available. With
  `adaptive_delay` (serve-kit's default) the delay is only waited while requests arrive at least
  one per two delays on average (over ~16 arrivals): a request that comes alone runs at once;
* requests of other shapes stay queued for their own batches: shapes are never mixed, unless
  the config declares bucketed padding safe (`padding`, with a mask input): then lengths of one
  bucket are padded to the longest of the batch and per-position outputs cut back per request;
* `max_queue_size` bounds the requests waiting (not running); beyond it `submit` raises
  Unavailable at once;
* a request's timeout (the model's default; a request may only shorten it) counts until its batch
  starts: an expired request is dropped from the queue and answered Timeout;
* priority 1 is the highest of `priority_levels`; 0, or a level out of range, means the model's
  `default_priority_level`. Higher levels are served first, FIFO within a level;
* a request that has waited `max_queue_time_us` (the server's --max-queue-ms) without starting is
  shed with Overloaded (503 + Retry-After), and one is refused at once when the queue ahead of it
  (queued rows / batch size x the moving average of an execution's time / instances) would already
  take longer: under overload clients get a fast 503 to retry elsewhere, not an answer after
  seconds. Triton has no such default (its queue policy's timeout is off unless configured);
* a backend exception fails only the requests that cause it: the batch is bisected down to the
  requests that fail alone (400 when the backend runs other inputs, 500 when it fails those too:
  see `_isolate`); the worker goes on.

With `dynamic_batching: null` (or `max_batch_size: 0`) each request runs alone, still through the
queue and the instance pool.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from ..config import ModelConfig
from ..repository import redact_paths
from .backends import Backend
from .types import BadRequest, InferError, Internal, Overloaded, Timeout, Unavailable

log = logging.getLogger("serve_kit.runtime")

# Histogram bucket upper bounds for queue and compute durations, in seconds (Prometheus `le`).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0)
_BUCKETS_NS = tuple(int(b * 1e9) for b in LATENCY_BUCKETS_S)
_NBUCKETS = len(_BUCKETS_NS) + 1  # the last one is +Inf

_QUEUED, _TAKEN, _DONE = 0, 1, 2

DEFAULT_MAX_QUEUE_TIME_US = 2_000_000
"""The queue-time bound's default (`serve-kit serve --max-queue-ms 2000`). Triton has none (its
queue policy times out only when configured), nor do HTTP servers; HAProxy's `timeout queue` is the
same mechanism (503 past it) and has no default of its own. 2 s: an answer later than that is worth
less to an interactive client than a fast 503 it can retry elsewhere, and it is far above the
queue time of a server that keeps up (milliseconds: a few executions), so only a backlog sheds."""

class LogGate:
    """At most one log line per `interval` seconds for a recurring event (a backend failing every
    batch must not flood the log, or block a server whose stderr nobody reads); `allow()` returns
    how many were suppressed since the last line, or None to stay quiet."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        n, self._suppressed = self._suppressed, 0
        return n


class SchedulerClosed(Unavailable):
    """The scheduler stopped accepting requests (draining for a reload, unload or shutdown).

    The router may retry such a request on the version that replaced this one."""


class Scheduler(Protocol):
    """What the router needs from a scheduler. Dynamic batching is one implementation; sequence
    or continuous-batching schedulers can slot in behind the same surface."""

    model: str
    version: int

    async def submit(self, inputs: dict[str, np.ndarray], priority: int = 0,
                     timeout_us: int = 0) -> dict[str, np.ndarray]: ...

    def submit_nowait(self, inputs: dict[str, np.ndarray], priority: int = 0,
                      timeout_us: int = 0) -> asyncio.Future: ...

    def close(self) -> None: ...

    def record_refused(self, status: int) -> None: ...

    async def drain(self, timeout: float | None = None) -> bool: ...

    def stats(self) -> "SchedulerStats": ...


@dataclass
class SchedulerStats:
    """Cumulative statistics of one scheduler (or the sum of several: reloads of one version).

    Durations are nanoseconds. `queue`, `compute_*` and `success` count requests; a request in a
    batch of n is counted with the batch's whole compute time (Triton's convention)."""

    success_count: int = 0
    success_ns: int = 0
    fail: dict[int, list[int]] = field(default_factory=dict)
    """HTTP-like status -> [count, ns]."""
    queue_count: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    compute_count: int = 0
    inference_count: int = 0
    """Rows (batch items) inferred."""
    execution_count: int = 0
    """Backend executions (batches)."""
    isolation_runs: int = 0
    """Extra backend executions spent finding which request of a failed batch causes the failure."""
    batches: dict[int, list[int]] = field(default_factory=dict)
    """Batch size in rows -> [executions, compute_input_ns, compute_infer_ns, compute_output_ns]."""
    queue_hist: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    """Requests per LATENCY_BUCKETS_S bucket (not cumulative; the last is +Inf)."""
    compute_hist: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    last_inference_ms: int = 0
    queue_depth: int = 0
    """Requests waiting now."""
    inflight: int = 0
    """Requests accepted and not answered yet (waiting or running)."""

    def __add__(self, other: "SchedulerStats") -> "SchedulerStats":
        fail = {k: list(v) for k, v in self.fail.items()}
        for k, (c, ns) in other.fail.items():
            f = fail.setdefault(k, [0, 0])
            f[0] += c
            f[1] += ns
        batches = {k: list(v) for k, v in self.batches.items()}
        for k, v in other.batches.items():
            b = batches.setdefault(k, [0, 0, 0, 0])
            for i in range(4):
                b[i] += v[i]
        return SchedulerStats(
            success_count=self.success_count + other.success_count,
            success_ns=self.success_ns + other.success_ns, fail=fail,
            queue_count=self.queue_count + other.queue_count, queue_ns=self.queue_ns + other.queue_ns,
            compute_input_ns=self.compute_input_ns + other.compute_input_ns,
            compute_infer_ns=self.compute_infer_ns + other.compute_infer_ns,
            compute_output_ns=self.compute_output_ns + other.compute_output_ns,
            compute_count=self.compute_count + other.compute_count,
            inference_count=self.inference_count + other.inference_count,
            execution_count=self.execution_count + other.execution_count, batches=batches,
            isolation_runs=self.isolation_runs + other.isolation_runs,
            queue_hist=[a + b for a, b in zip(self.queue_hist, other.queue_hist)],
            compute_hist=[a + b for a, b in zip(self.compute_hist, other.compute_hist)],
            last_inference_ms=max(self.last_inference_ms, other.last_inference_ms),
            queue_depth=self.queue_depth + other.queue_depth, inflight=self.inflight + other.inflight)

    @property
    def fail_count(self) -> int:
        return sum(c for c, _ in self.fail.values())


class _Request:
    __slots__ = ("inputs", "rows", "key", "level", "fut", "loop", "t0", "deadline", "state", "timer", "shed")

    def __init__(self, inputs, rows, key, level, fut, loop, t0, deadline, shed=False):
        self.inputs = inputs
        self.rows = rows
        self.key = key
        self.level = level
        self.fut = fut
        self.loop = loop
        self.t0 = t0
        self.deadline = deadline
        self.state = _QUEUED
        self.timer = None
        self.shed = shed
        """The deadline is the queue-time bound (answered Overloaded), not the request's timeout."""


class _Counters:
    """Counters written by exactly one thread (a worker, or the event loop), so no lock is taken
    on the hot path; readers copy them (a list or dict copy is atomic under the GIL)."""

    __slots__ = ("success_count", "success_ns", "fail", "queue_ns", "queue_count", "in_ns", "infer_ns",
                 "out_ns", "compute_count", "inference_count", "execution_count", "batches",
                 "queue_hist", "compute_hist", "last_ms", "isolation_runs")

    def __init__(self, max_rows: int):
        self.success_count = self.success_ns = self.queue_ns = self.queue_count = 0
        self.in_ns = self.infer_ns = self.out_ns = self.compute_count = 0
        self.inference_count = self.execution_count = self.last_ms = self.isolation_runs = 0
        self.fail: dict[int, list[int]] = {}
        # Preallocated so that the worker never grows a container a reader may be copying.
        self.batches = [[0, 0, 0, 0] for _ in range(max_rows + 1)]
        self.queue_hist = [0] * _NBUCKETS
        self.compute_hist = [0] * _NBUCKETS

    def failed(self, status: int, n: int, ns: int) -> None:
        f = self.fail.get(status)
        if f is None:
            f = self.fail[status] = [0, 0]
        f[0] += n
        f[1] += ns

    def snapshot(self) -> SchedulerStats:
        batches = {}
        for size, b in enumerate(list(self.batches)):
            b = list(b)
            if b[0]:
                batches[size] = b
        return SchedulerStats(
            success_count=self.success_count, success_ns=self.success_ns,
            fail={k: list(v) for k, v in self.fail.copy().items()},
            queue_count=self.queue_count, queue_ns=self.queue_ns, compute_input_ns=self.in_ns,
            compute_infer_ns=self.infer_ns, compute_output_ns=self.out_ns, compute_count=self.compute_count,
            inference_count=self.inference_count, execution_count=self.execution_count, batches=batches,
            isolation_runs=self.isolation_runs, queue_hist=list(self.queue_hist), compute_hist=list(self.compute_hist),
            last_inference_ms=self.last_ms)


class DynamicBatcher:
    """Dynamic-batching scheduler for one model version over `len(backends)` instance threads.

    `backends` are loaded (and warmed) backend instances of the same model, one per instance;
    each is used by exactly one worker thread from now on. Use from one event loop.
    `max_queue_time_us`: the queue-time bound (0 = off). `canary`: an input the backends are known
    to run (a warm-up input), to tell a broken backend from a bad request when a batch fails
    before anything succeeded; later the last input that succeeded takes its place.
    """

    def __init__(self, config: ModelConfig, backends: Sequence[Backend], *, model: str | None = None,
                 version: int = 1, max_queue_time_us: int = DEFAULT_MAX_QUEUE_TIME_US,
                 canary: dict[str, np.ndarray] | None = None):
        if not backends:
            raise ValueError("a scheduler needs at least one backend instance")
        self.config = config
        self.model = model or config.name
        self.version = version
        self._label = f"model {self.model!r} version {version}"
        self._failure_log = LogGate()
        self._input_names = [t.name for t in config.inputs]
        self._max_bs = config.max_batch_size
        db = config.dynamic_batching
        self._batching = db is not None and self._max_bs > 0
        # Queue policy applies with or without batching when the model configures it.
        self._max_queue = db.max_queue_size if db else 0
        self._default_timeout_us = db.default_timeout_microseconds if db else 0
        # The queue-time bound (0 = off): waiting longer than this is shed with Overloaded (503).
        self._shed_ns = max(0, int(max_queue_time_us)) * 1000
        self._batch_ns = 0.0  # moving average of an execution's time (workers write it)
        self._instances = len(backends)
        self._sweep: asyncio.TimerHandle | None = None
        self._first_canary = canary
        levels = db.priority_levels if db else 0
        self._levels = max(1, levels)
        default = db.default_priority_level if db else 0
        # Triton requires 1 <= default <= levels; an unset default (0) means the lowest level.
        self._default_level = (default if 1 <= default <= self._levels else self._levels) - 1
        if self._batching:
            self._delay_ns = db.max_queue_delay_microseconds * 1000
            self._adaptive = db.adaptive_delay and self._delay_ns > 0
            self._preferred = sorted({p for p in db.preferred_batch_size if 0 < p <= self._max_bs})
            self._target = self._preferred[-1] if self._preferred else self._max_bs
        else:
            self._delay_ns = 0
            self._adaptive = False
            self._preferred = []
            self._target = 1
        # Only inputs with a variable non-batch dim can differ in shape between requests; without
        # one (or without batching) a single key serves all requests and none is computed.
        self._keyed = [t.name for t in config.inputs
                       if self._batching and any(d == -1 for d in t.shape[1:])]
        pad = db.padding if self._batching else None
        # Bucketed padding: input -> (axis, pad value); outputs -> axis cut back per request.
        self._pad = {n: (axis, (pad.pad_values.get(n, 0))) for n, axis in pad.inputs.items()} if pad else {}
        self._crop = dict(pad.outputs) if pad else {}
        self._buckets = list(pad.buckets) if pad else []
        self._mask = (pad.mask_input, pad.inputs[pad.mask_input]) if pad else None

        self._cond = threading.Condition(threading.Lock())
        self._queues: list[deque[_Request]] = [deque() for _ in range(self._levels)]
        self._queued = 0
        self._level_rows = [0] * self._levels  # rows waiting per priority level
        self._rows: dict[Any, int] = {}
        self._idle = 0      # workers waiting for an empty queue
        self._forming = 0   # workers waiting for a batch to fill up (max_queue_delay)
        self._closing = False
        self._current: list[list[_Request] | None] = [None] * len(backends)

        # Moving average of the gaps between arrivals (ns), for adaptive_delay: written on the
        # loop thread, read by workers (a float read is atomic). It starts as "idle", each gap
        # counts as at most 4 delays, and it averages over ~16 arrivals: closed-loop clients send
        # in bursts (a batch's answers go out together), and a short average followed the bursts:
        # with 1/4 per arrival, mlp at concurrency 16 fell from 10.5k to 8.0k inf/s (batches cut
        # short after each quiet gap). A batch waits while the average gap is under 2 delays (an
        # arrival expected with even odds within the delay): at concurrency 1 the gap is a whole
        # round trip (~0.3 ms), at 16 a fraction of the delay.
        self._gap_cap = 4 * self._delay_ns
        self._gap_ns = float(self._gap_cap)
        self._gap_wait = 2 * self._delay_ns
        self._last_arrival = 0

        # Event-loop side (touched only on the loop thread).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._outstanding = 0
        self._drained: asyncio.Future | None = None
        self._loop_counters = _Counters(max(self._max_bs, 1))

        self._counters = [_Counters(max(self._max_bs, 1)) for _ in backends]
        self._threads = []
        for i, backend in enumerate(backends):
            t = threading.Thread(target=self._worker, args=(i, backend), daemon=True,
                                 name=f"sk-{self.model}-v{version}-{i}")
            self._threads.append(t)
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------------------------------
    # Event-loop side

    @property
    def batching(self) -> bool:
        """Whether requests are batched together (False: each runs alone)."""
        return self._batching

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def inflight(self) -> int:
        return self._outstanding

    async def submit(self, inputs: dict[str, np.ndarray], priority: int = 0,
                     timeout_us: int = 0) -> dict[str, np.ndarray]:
        """Run one request (batch-first arrays when the model batches) and return its outputs.

        Raises Unavailable (queue full, closing), Timeout (deadline passed before it ran),
        BadRequest (batch dimension out of range), Internal (the backend failed)."""
        req = self._enqueue(inputs, priority, timeout_us)
        try:
            return await req.fut
        except asyncio.CancelledError:
            self._cancel(req)
            raise

    def submit_nowait(self, inputs: dict[str, np.ndarray], priority: int = 0,
                      timeout_us: int = 0) -> asyncio.Future:
        """`submit` without a coroutine: queue the request and return the future of its outputs.

        For frontends that answer from a done-callback (the HTTP fast path): no task per request.
        Refusals (queue full, closing, bad batch size) raise here, at once; everything else
        (Timeout, Internal, Unavailable at a drain timeout) is the future's exception. Cancelling
        the future withdraws the request if it has not started."""
        req = self._enqueue(inputs, priority, timeout_us)
        req.fut.add_done_callback(lambda fut: fut.cancelled() and self._cancel(req))
        return req.fut

    def _enqueue(self, inputs: dict[str, np.ndarray], priority: int, timeout_us: int) -> "_Request":
        if self._closing:
            raise self._refuse(SchedulerClosed(f"{self._label} is not accepting requests (unloading or "
                                               "shutting down); retry"))
        # asyncio.get_running_loop() costs a getpid() system call (CPython checks for a fork), 5%
        # of the event loop's time at 10k requests/s: the bound loop is reused while it is the
        # one running on this thread.
        loop = self._loop
        if loop is None or self._loop_thread != threading.get_ident() or not loop.is_running():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._bind(loop)
        if self._max_bs > 0:
            try:
                rows = inputs[self._input_names[0]].shape[0] if len(self._input_names) == 1 else \
                    self._rows_of(inputs)
            except (KeyError, IndexError, AttributeError):
                raise self._refuse(BadRequest(f"{self._label}: inputs must be arrays named "
                                              f"{self._input_names} with a batch dimension")) from None
            if not 0 < rows <= self._max_bs:
                raise self._refuse(BadRequest(f"{self._label}: batch size {rows} is out of range "
                                              f"1..{self._max_bs} (max_batch_size)"))
        else:
            rows = 1
        if self._keyed:
            try:
                if self._pad:
                    key = tuple(self._bucketed(n, inputs[n].shape) for n in self._keyed)
                else:
                    key = tuple(inputs[n].shape[1:] for n in self._keyed)
            except (KeyError, AttributeError, IndexError):
                raise self._refuse(BadRequest(f"{self._label}: inputs must be arrays named "
                                              f"{self._input_names}")) from None
        else:
            key = None
        level = priority - 1 if 0 < priority <= self._levels else self._default_level
        t = self._default_timeout_us
        if timeout_us > 0 and (t == 0 or timeout_us < t):
            t = timeout_us
        t0 = time.monotonic_ns()
        if self._adaptive:
            gap = t0 - self._last_arrival
            self._last_arrival = t0
            self._gap_ns += ((gap if gap < self._gap_cap else self._gap_cap) - self._gap_ns) * 0.0625
        deadline = t0 + t * 1000 if t else 0
        shed = False
        if self._shed_ns and (not deadline or t0 + self._shed_ns < deadline):
            deadline = t0 + self._shed_ns
            shed = True
        fut = loop.create_future()
        req = _Request(inputs, rows, key, level, fut, loop, t0, deadline, shed)

        cond = self._cond
        with cond:
            if self._closing:
                raise self._refuse(SchedulerClosed(f"{self._label} is not accepting requests; retry"))
            if self._max_queue and self._queued >= self._max_queue:
                raise self._refuse(Unavailable(f"{self._label}: queue is full ({self._queued} requests "
                                               f"waiting, max_queue_size {self._max_queue}); retry later",
                                               retry_after=1))
            if self._shed_ns and self._batch_ns:
                # Shed early: the executions already queued ahead (at its priority or higher) would
                # outlast the bound, so this request would only wait to be shed or be answered late.
                ahead = sum(self._level_rows[:level + 1]) if level else self._level_rows[0]
                wait = ahead // self._target * self._batch_ns / self._instances
                if wait > self._shed_ns:
                    raise self._refuse(Overloaded(
                        f"{self._label} is overloaded: the queue ahead ({self._queued} requests, about "
                        f"{wait / 1e6:.0f} ms) exceeds the queue-time bound ({self._shed_ns / 1e6:.0f} ms, "
                        "--max-queue-ms); retry later", retry_after=max(1, -(-(wait - self._shed_ns) // 1e9))))
            self._queues[level].append(req)
            self._queued += 1
            self._level_rows[level] += rows
            pending = self._rows.get(key, 0) + rows
            self._rows[key] = pending
            # Wake a worker only when that changes something: nobody is forming a batch yet, or
            # this request completed one. Otherwise the forming worker's own timer covers it.
            if (self._idle and not self._forming) or pending >= self._target:
                cond.notify()
        self._outstanding += 1
        if t and not shed:
            req.timer = loop.call_later(t / 1e6, self._expire, req)
        if shed and self._sweep is None:
            self._sweep = loop.call_later(self._shed_ns / 1e9, self._sweep_queue)
        return req

    def _sweep_queue(self) -> None:
        """Shed the requests past the queue-time bound that no worker took (every instance busy
        or hung), on the loop; re-armed for the oldest request left. One timer per scheduler, not
        one per request: workers shed what they find past the bound when they form a batch."""
        self._sweep = None
        now = time.monotonic_ns()
        shed: list[_Request] = []
        oldest = 0
        with self._cond:
            for q in self._queues:
                while q:
                    r = q[0]
                    if r.state != _QUEUED:
                        q.popleft()
                    elif r.shed and now >= r.deadline:
                        q.popleft()
                        self._unqueue(r)
                        shed.append(r)
                    else:
                        # FIFO within a level: the first one left is the oldest of its level.
                        oldest = r.t0 if not oldest else min(oldest, r.t0)
                        break
        for r in shed:
            self._loop_counters.failed(Overloaded.status, 1, now - r.t0)
            self._finish(r, None, self._shed_error(r, now))
        if oldest and self._loop is not None and not self._loop.is_closed():
            self._sweep = self._loop.call_later(max(oldest + self._shed_ns - now, 1_000_000) / 1e9,
                                                self._sweep_queue)

    def _shed_error(self, r: _Request, now: int) -> Overloaded:
        return Overloaded(f"{self._label} is overloaded: the request waited {(now - r.t0) / 1e6:.0f} ms in the "
                          f"queue, over the queue-time bound ({self._shed_ns / 1e6:.0f} ms, --max-queue-ms); "
                          "retry later", retry_after=1)

    def _bucketed(self, name: str, shape: tuple) -> tuple:
        """An input's non-batch shape with its padded axis rounded up to its bucket (the batching
        key): requests of one bucket batch together. Past the largest bucket, the exact length."""
        pad = self._pad.get(name)
        if pad is None:
            return shape[1:]
        axis = pad[0]
        n = shape[axis]
        i = bisect.bisect_left(self._buckets, n)
        bucket = self._buckets[i] if i < len(self._buckets) else n
        return shape[1:axis] + (bucket,) + shape[axis + 1:]

    def _rows_of(self, inputs: dict[str, np.ndarray]) -> int:
        rows = {inputs[n].shape[0] for n in self._input_names}
        if len(rows) != 1:
            raise self._refuse(BadRequest(f"{self._label}: inputs disagree on the batch dimension: "
                                          f"{sorted(rows)}"))
        return rows.pop()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None and self._outstanding and not self._loop.is_closed():
            raise RuntimeError(f"{self._label}: scheduler used from two event loops at once")
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._drained = None

    def _refuse(self, err: InferError) -> InferError:
        self._loop_counters.failed(err.status, 1, 0)
        return err

    def record_refused(self, status: int) -> None:
        """Count a request that a frontend refused for this version before submitting it (a body
        that does not decode or fit the model) as a failure with `status`. Event-loop thread only."""
        self._loop_counters.failed(status, 1, 0)

    def _expire(self, req: _Request) -> None:
        with self._cond:
            if req.state != _QUEUED:
                return
            self._unqueue(req)
        req.timer = None
        self._loop_counters.failed(Timeout.status, 1, time.monotonic_ns() - req.t0)
        self._finish(req, None, Timeout(f"{self._label}: request timed out after waiting "
                                        f"{(time.monotonic_ns() - req.t0) / 1e6:.1f} ms in the queue"))

    def _cancel(self, req: _Request) -> None:
        # The caller went away (client disconnected, caller's own timeout): don't run it.
        with self._cond:
            if req.state != _QUEUED:
                return
            self._unqueue(req)
        self._finish(req, None, None)

    def _unqueue(self, req: _Request) -> None:
        """Mark a queued request gone (with the lock held); workers drop it from the deque lazily."""
        req.state = _DONE
        self._queued -= 1
        self._level_rows[req.level] -= req.rows
        left = self._rows[req.key] - req.rows
        if left:
            self._rows[req.key] = left
        else:
            del self._rows[req.key]  # shapes come and go (e.g. sequence lengths): don't keep them

    def _finish(self, req: _Request, result, error) -> None:
        req.state = _DONE
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        fut = req.fut
        if not fut.done():
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)
        self._outstanding -= 1
        if self._outstanding == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _deliver(self, batch: list[_Request], results: list | None, error: InferError | None) -> None:
        """On the loop: answer a batch (or its error). Requests abandoned by drain are skipped."""
        finish = self._finish
        if error is None:
            for req, res in zip(batch, results):
                if req.state == _TAKEN:
                    finish(req, res, None)
        else:
            for req in batch:
                if req.state == _TAKEN:
                    finish(req, None, error)

    def close(self) -> None:
        """Stop accepting requests (they get Unavailable); what is queued or running still runs,
        without waiting for batches to fill, and the worker threads exit when the queue is empty."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    async def drain(self, timeout: float | None = None) -> bool:
        """close(), then wait until every accepted request is answered. After `timeout` seconds the
        rest (queued, or stuck in a hung backend) are answered Unavailable; returns False then."""
        self.close()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if self._outstanding:
            if self._loop is not None and loop is not self._loop:
                raise RuntimeError(f"{self._label}: drain() must run on the loop that submitted requests")
            if self._drained is None or self._drained.done():
                self._drained = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except asyncio.TimeoutError:
                self._abandon()
                return False
        # Workers leave right after the last answer; waiting for them means their backends are
        # released when drain() returns.
        while self.threads_alive():
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.001)
        return True

    def _abandon(self) -> None:
        err = Unavailable(f"{self._label} did not finish the request before it was unloaded; retry")
        with self._cond:
            left = []
            for q in self._queues:
                while q:
                    req = q.popleft()
                    if req.state == _QUEUED:
                        self._unqueue(req)
                        left.append(req)
            running = [r for batch in self._current if batch for r in batch if r.state == _TAKEN]
        for req in left + running:
            self._loop_counters.failed(err.status, 1, time.monotonic_ns() - req.t0)
            self._finish(req, None, err)
        log.warning("%s: %d queued and %d running requests abandoned at drain timeout",
                    self._label, len(left), len(running))

    def threads_alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def stats(self) -> SchedulerStats:
        total = self._loop_counters.snapshot()
        for c in self._counters:
            total = total + c.snapshot()
        total.queue_depth = self._queued
        total.inflight = self._outstanding
        return total

    # ------------------------------------------------------------------------------------------
    # Worker side

    def _next_batch(self) -> tuple[list[_Request], list[_Request]] | None:
        """Block until a batch is due; return it and the requests found expired on the way (all
        marked taken: this worker answers them), or None when closed and empty."""
        cond = self._cond
        queues = self._queues
        with cond:
            while True:
                head = None
                expired: list[_Request] = []
                now = time.monotonic_ns()
                for q in queues:
                    while q:
                        r = q[0]
                        if r.state != _QUEUED:
                            q.popleft()
                        elif r.deadline and now >= r.deadline:
                            q.popleft()
                            self._unqueue(r)
                            r.state = _TAKEN
                            expired.append(r)
                        else:
                            head = r
                            break
                    if head is not None:
                        break
                if expired:
                    return [], expired
                if head is None:
                    if self._closing:
                        return None
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                    continue
                avail = self._rows[head.key]
                due = head.t0 + self._delay_ns
                if not (avail >= self._target or now >= due or self._closing) and len(self._rows) > 1:
                    # The oldest shape is still filling up, but another may already have a full
                    # batch: that one need not wait behind it.
                    for key, n in self._rows.items():
                        if n >= self._target:
                            head, avail = self._first_of(key), n
                            break
                if avail >= self._target or now >= due or self._closing or \
                        (self._adaptive and self._gap_ns > self._gap_wait):
                    batch = self._take(head, avail, now, expired)
                    if self._queued and self._idle:
                        cond.notify()  # more is queued: let an idle instance look at it
                    return batch, expired
                self._forming += 1
                cond.wait((due - now) / 1e9)
                self._forming -= 1

    def _first_of(self, key) -> _Request:
        for q in self._queues:
            for r in q:
                if r.state == _QUEUED and r.key == key:
                    return r
        raise AssertionError("a shape with queued rows has no queued request")  # pragma: no cover

    def _take(self, head: _Request, avail: int, now: int, expired: list[_Request]) -> list[_Request]:
        """Dequeue the batch that `head` starts (lock held): same shape key, FIFO by priority."""
        if not self._batching:
            self._queues[head.level].popleft()
            self._unqueue(head)
            head.state = _TAKEN
            return [head]
        limit = self._max_bs
        if self._preferred:
            fitting = [p for p in self._preferred if p <= avail]
            limit = fitting[-1] if fitting else min(avail, self._max_bs)
        key = head.key
        batch: list[_Request] = []
        rows = 0
        full = False
        for level in range(head.level, self._levels):
            q = self._queues[level]
            skipped: list[_Request] = []
            while q:
                r = q.popleft()
                if r.state != _QUEUED:
                    continue
                if r.key != key:
                    skipped.append(r)  # other shapes keep their place for their own batches
                    continue
                if r.deadline and now >= r.deadline:
                    self._unqueue(r)
                    r.state = _TAKEN
                    expired.append(r)
                    continue
                if batch and rows + r.rows > limit:
                    q.appendleft(r)
                    full = True
                    break
                self._unqueue(r)
                r.state = _TAKEN
                batch.append(r)
                rows += r.rows
                if rows >= limit:
                    full = True
                    break
            if skipped:
                q.extendleft(reversed(skipped))
            if full:
                break
        return batch

    def _execute(self, backend: Backend, batch: list[_Request]) -> tuple[list[dict], int, int, int]:
        """Run `batch` as one backend execution: (each request's outputs, rows, t_in, t_infer)."""
        n = len(batch)
        padded = False
        if n == 1:
            inputs = batch[0].inputs
            total = batch[0].rows
        elif self._pad:
            inputs = {}
            for k in self._input_names:
                parts = [r.inputs[k] for r in batch]
                pad = self._pad.get(k)
                if pad is not None and len({a.shape[pad[0]] for a in parts}) > 1:
                    inputs[k] = _pad_concatenate(parts, *pad)
                    padded = True
                else:
                    inputs[k] = np.concatenate(parts)
            total = sum(r.rows for r in batch)
        else:
            concatenate = np.concatenate
            inputs = {k: concatenate([r.inputs[k] for r in batch]) for k in self._input_names}
            total = sum(r.rows for r in batch)
        t_in = time.monotonic_ns()
        outputs = backend.infer(inputs)
        t_infer = time.monotonic_ns()
        if n == 1:
            return [outputs], total, t_in, t_infer
        for k, v in outputs.items():
            if v.shape[0] != total:
                raise ValueError(f"output {k!r} has {v.shape[0]} rows for a batch of {total}")
        results = []
        off = 0
        for r in batch:
            end = off + r.rows
            results.append({k: v[off:end] for k, v in outputs.items()})
            off = end
        if padded and self._crop:
            self._crop_outputs(batch, results)
        return results, total, t_in, t_infer

    def _succeeded(self, stats: _Counters, batch: list[_Request], total: int, t_start: int, t_in: int,
                   t_infer: int, t_end: int) -> None:
        """Count a successful execution (worker thread). Queue and compute statistics count
        successful requests only, as Triton's do."""
        n = len(batch)
        bounds = _BUCKETS_NS
        for r in batch:
            q = t_start - r.t0
            stats.queue_ns += q
            stats.queue_hist[bisect.bisect_left(bounds, q)] += 1
        stats.queue_count += n
        d_in, d_infer, d_out = t_in - t_start, t_infer - t_in, t_end - t_infer
        stats.in_ns += d_in * n
        stats.infer_ns += d_infer * n
        stats.out_ns += d_out * n
        stats.compute_count += n
        stats.compute_hist[bisect.bisect_left(bounds, t_end - t_start)] += n
        stats.success_count += n
        stats.success_ns += n * t_end - sum(r.t0 for r in batch)
        stats.inference_count += total
        stats.execution_count += 1
        b = stats.batches[total]
        b[0] += 1
        b[1] += d_in
        b[2] += d_infer
        b[3] += d_out
        stats.last_ms = time.time_ns() // 1_000_000
        # Moving average of an execution's time, for the queue-time bound's early shedding (a
        # float written by any worker; a lost update only delays the average a little).
        d = t_end - t_start
        self._batch_ns = d if not self._batch_ns else self._batch_ns + (d - self._batch_ns) * 0.125

    def _worker(self, index: int, backend: Backend) -> None:
        _tight_timer_slack()
        stats = self._counters[index]
        current = self._current
        monotonic_ns = time.monotonic_ns
        # The inputs of the last request that succeeded on this instance: a known-good input that
        # tells a broken backend (it fails too) from a request whose input the backend rejects.
        canary: dict[str, np.ndarray] | None = self._first_canary
        broken = False  # the canary failed: until a success, failures are the backend's
        while True:
            got = self._next_batch()
            if got is None:
                return
            batch, expired = got
            t_start = monotonic_ns()
            if expired:
                self._answer_expired(expired, stats, t_start)
            if not batch:
                continue
            current[index] = batch
            try:
                results, total, t_in, t_infer = self._execute(backend, batch)
            except Exception as e:  # noqa: BLE001 - whatever the backend raised fails at most this batch
                canary, broken = self._isolate(backend, stats, batch, e, t_start, canary, broken)
                current[index] = None
                continue
            t_end = monotonic_ns()
            current[index] = None
            canary = batch[0].inputs
            broken = False
            self._succeeded(stats, batch, total, t_start, t_in, t_infer, t_end)
            self._post(batch[0].loop, batch, results, None)

    def _isolate(self, backend: Backend, stats: _Counters, batch: list[_Request], first: Exception,
                 t_start: int, canary: dict | None, broken: bool) -> tuple[dict | None, bool]:
        """A batch failed as a whole: find the request(s) that cause it, so that only they fail.

        The batch is split in halves until each failing part is one request run alone (bisection:
        a batch of n with one bad request costs about 2 log2(n) executions, a request runs alone
        at most once). A request that fails alone while the backend runs other inputs (a part of
        this batch, or the canary: the last input that succeeded here) is the input's fault: 400.
        Otherwise the backend is at fault: 500, and the rest of the batch fails with it instead of
        being retried one by one (a broken backend must not turn each batch into n slow retries);
        until the next success, failures on this instance are answered 500 at once.
        Returns the (canary, broken) state for the next batch."""
        label = self._label
        loop = batch[0].loop
        n = len(batch)
        more = self._failure_log.allow()
        if more is not None:
            log.warning("%s: backend failed on a batch of %d request(s): %s: %s%s", label, n,
                        type(first).__name__, first, f" ({more} more failed batches since the last line)" if more else "")
        runs = 0

        def fail_internal(reqs: list[_Request], e: Exception) -> None:
            now = time.monotonic_ns()
            err = Internal(f"{label} failed: {type(e).__name__}: {redact_paths(str(e))}")
            stats.failed(err.status, len(reqs), len(reqs) * now - sum(r.t0 for r in reqs))
            self._post(loop, reqs, None, err)

        def fail_input(req: _Request, e: Exception) -> None:
            err = BadRequest(f"{label} cannot run this request's input (the model runs other inputs): "
                             f"{type(e).__name__}: {redact_paths(str(e))}")
            stats.failed(err.status, 1, time.monotonic_ns() - req.t0)
            self._post(loop, [req], None, err)

        healthy = False
        if broken:
            fail_internal(batch, first)
            return canary, True
        if canary is not None:
            runs += 1
            try:
                backend.infer(canary)
                healthy = True
            except Exception as e:  # noqa: BLE001 - the backend fails a known-good input: its fault
                if more is not None:
                    log.error("%s: the backend also fails an input it ran before (%s: %s): failing the batch",
                              label, type(e).__name__, e)
                stats.isolation_runs += runs
                fail_internal(batch, first)
                return canary, True
        unsure: tuple[_Request, Exception] | None = None  # failed alone before anything succeeded
        stack = [batch] if n == 1 else [batch[n // 2:], batch[:n // 2]]
        first_alone = n == 1  # a batch of one already ran alone
        while stack:
            group = stack.pop()
            if first_alone:
                first_alone = False
                e: Exception | None = first
            else:
                t0 = time.monotonic_ns()
                runs += 1
                try:
                    results, total, t_in, t_infer = self._execute(backend, group)
                except Exception as exc:  # noqa: BLE001
                    e = exc
                else:
                    e = None
                    self._succeeded(stats, group, total, t0, t_in, t_infer, time.monotonic_ns())
                    self._post(loop, group, results, None)
                    canary = group[0].inputs
                    healthy = True
            if e is None:
                continue
            if len(group) > 1:
                half = len(group) // 2
                stack += [group[half:], group[:half]]
            elif healthy:
                fail_input(group[0], e)
            elif unsure is None:
                unsure = (group[0], e)  # decided once something else runs (or fails) here
            else:
                # Two requests failed alone and nothing ran: the backend, not the inputs.
                stats.isolation_runs += runs
                fail_internal([unsure[0], group[0]] + [r for g in stack for r in g], e)
                return canary, True
        if unsure is not None:
            if healthy:
                fail_input(*unsure)
            else:
                fail_internal([unsure[0]], unsure[1])
        stats.isolation_runs += runs
        return canary, False

    def _crop_outputs(self, batch: list[_Request], results: list[dict]) -> None:
        """Cut the per-position outputs of a padded batch back to each request's own length (the
        length of its mask input)."""
        mask, mask_axis = self._mask
        for r, res in zip(batch, results):
            length = r.inputs[mask].shape[mask_axis]
            for k, axis in self._crop.items():
                v = res.get(k)
                if v is not None and v.shape[axis] > length:
                    index = [slice(None)] * v.ndim
                    index[axis] = slice(0, length)
                    res[k] = v[tuple(index)]

    def _answer_expired(self, expired: list[_Request], stats: _Counters, now: int) -> None:
        for r in expired:
            if r.shed:
                err: InferError = self._shed_error(r, now)
            else:
                err = Timeout(f"{self._label}: request timed out after waiting {(now - r.t0) / 1e6:.1f} ms "
                              "in the queue")
            stats.failed(err.status, 1, now - r.t0)
            self._post(r.loop, [r], None, err)

    def _post(self, loop: asyncio.AbstractEventLoop, batch: list[_Request], results, error) -> None:
        try:
            loop.call_soon_threadsafe(self._deliver, batch, results, error)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting for these answers any more


def _pad_concatenate(parts: list[np.ndarray], axis: int, value: float) -> np.ndarray:
    """Concatenate on axis 0 arrays that differ in length along `axis`, padding each with `value`
    up to the longest."""
    longest = max(a.shape[axis] for a in parts)
    shape = list(parts[0].shape)
    shape[0] = sum(a.shape[0] for a in parts)
    shape[axis] = longest
    out = np.full(shape, value, dtype=parts[0].dtype)
    row = 0
    for a in parts:
        index = [slice(row, row + a.shape[0])] + [slice(None)] * (a.ndim - 1)
        index[axis] = slice(0, a.shape[axis])
        out[tuple(index)] = a
        row += a.shape[0]
    return out


def _tight_timer_slack() -> None:
    """Let this thread's timed waits end on time: Linux lets a timed wait overrun by the thread's
    timer slack (50 us by default), which a lone request waiting out max_queue_delay (100 us by
    default) pays in full: a 100 us Condition.wait took 170 us (median) with the default slack,
    120 us with 1 us, on the 2-core dev machine. The worker sleeps in such waits once per batch
    at most, so the extra wake-up precision costs nothing measurable."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in nanoseconds; this thread only
    except (OSError, AttributeError):  # pragma: no cover - no prctl: keep the default slack
        pass

