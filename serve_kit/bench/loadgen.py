"""The online load generator: worker processes driving an Open Inference Protocol server.

Each worker is its own process (spawned: the parent may hold threads, gRPC state or a server),
running one asyncio loop (uvloop when installed). It sends pre-encoded requests, so the hot path
is a socket write and a C-level HTTP parse per request:

* HTTP/1.1: raw keep-alive connections (asyncio protocols, httptools' C response parser). Each
  request is the same bytes every time (head and body built once by the parent).
* gRPC: `inference.GRPCInferenceService/ModelInfer` on a grpc.aio channel with pre-serialized
  request bytes (no protobuf work per request).

Closed loop: `concurrency` connections (gRPC: callers), each sending its next request as soon
as the previous one is answered. Open loop: requests at scheduled times (Poisson or constant
arrivals), each measured from its INTENDED send time, so time a request spends waiting behind a
stalled server or a busy client counts (no coordinated omission). The schedule is kept by a
timer thread sleeping with nanosecond resolution (event loops only wake to the millisecond) and
handing due requests to the loop; a HTTP request finding no idle connection opens a new one, up
to `max_connections`, beyond which it waits in the client (still timed from its intended time).

Time is split into a warm-up (nothing recorded) and equal measurement windows aligned across
workers (CLOCK_MONOTONIC is system-wide). A request belongs to the window of its intended send
time; a window is reported to the parent once every request in it has been answered or has
timed out, with a losslessly encoded latency histogram, error counts by status, the send lag
(actual - intended send time) and the worker's own CPU use over the window.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from . import stats

GRPC_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
TICK_S = 0.005
"""Housekeeping period: closing windows, timeouts."""
SPIN_NS = 200_000
"""Open loop: the schedule thread stops sleeping this long before a send time (see Schedule)."""
SATURATED_CPU = 0.90
"""A worker busy more than this fraction of a core cannot be trusted to keep its schedule."""

mono_ns = time.monotonic_ns


@dataclass
class WorkerSpec:
    """Everything a worker process needs (picklable; built by the parent)."""

    index: int
    protocol: str
    """`http` or `grpc`."""
    host: str
    port: int
    payloads: list[bytes]
    """HTTP: complete request bytes (head + body); gRPC: serialized ModelInferRequest messages."""
    mode: str
    """`closed` or `open`."""
    concurrency: int = 1
    """Closed loop: connections (gRPC: concurrent callers) of this worker."""
    rate: float = 0.0
    """Open loop: this worker's share of the offered request rate (requests/s)."""
    arrival: str = "poisson"
    max_connections: int = 1024
    """Open loop, HTTP: most connections this worker opens; further requests wait in the client."""
    initial_connections: int = 4
    timeout_s: float = 30.0
    warmup_s: float = 1.0
    window_s: float = 1.0
    seed: int = 0
    use_uvloop: bool = True
    grpc_channels: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Window:
    __slots__ = ("index", "start_ns", "end_ns", "lat", "lag", "errors", "offered", "sent", "outstanding",
                 "closed", "cpu", "flushed")

    def __init__(self, index: int, start_ns: int, end_ns: int):
        self.index = index
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.lat: list[int] = []
        self.lag: list[int] = []
        self.errors: dict[str, int] = collections.defaultdict(int)
        self.offered = 0
        self.sent = 0
        self.outstanding = 0
        self.closed = False
        self.flushed = False
        self.cpu: dict[str, float] = {}


class Worker:
    """One process's load: windows, accounting, and the protocol client."""

    def __init__(self, spec: WorkerSpec, conn: Connection):
        self.spec = spec
        self.conn = conn
        self.windows: dict[int, Window] = {}
        self.running = False
        self.measure_start = 0
        self.window_ns = int(spec.window_s * 1e9)
        self.timeout_ns = int(spec.timeout_s * 1e9)
        self.stop_after: int | None = None
        self.stopped: asyncio.Future | None = None
        self.next_close = 0
        self.cpu_mark = (time.process_time(), mono_ns())
        self.warmup_errors: dict[str, int] = collections.defaultdict(int)
        self.max_pending = 0
        self.queued = 0
        self.connections_opened = 0
        self.stragglers = 0
        self.frontier = 0.0
        """Open loop: every request intended before this time has been handed to the client."""

    # -- accounting ------------------------------------------------------------------------
    def window_for(self, t_ns: int) -> Window | None:
        if t_ns < self.measure_start:
            return None
        k = (t_ns - self.measure_start) // self.window_ns
        w = self.windows.get(k)
        if w is None:
            if k < self.next_close:  # a straggler for a window already reported: counted apart
                self.stragglers += 1
                return None
            start = self.measure_start + k * self.window_ns
            w = self.windows[k] = Window(k, start, start + self.window_ns)
        return w

    def begin(self, window: Window | None) -> None:
        """A request is due (open loop: at its intended time, even if it must wait to be sent)."""
        if window is not None:
            window.offered += 1
            window.outstanding += 1

    def sent(self, window: Window | None, intended_ns: int, sent_ns: int) -> None:
        if window is not None:
            window.sent += 1
            window.lag.append(sent_ns - intended_ns)

    def complete(self, window: Window | None, intended_ns: int, status: str | None) -> None:
        """`status` None = success; otherwise the error key (HTTP status, gRPC code, timeout...)."""
        if window is None:
            if status is not None:
                self.warmup_errors[status] += 1
            return
        if status is None:
            window.lat.append(mono_ns() - intended_ns)
        else:
            window.errors[status] += 1
        window.outstanding -= 1
        if window.closed and window.outstanding <= 0:
            self.flush(window)

    def tick(self) -> None:
        now = mono_ns()
        while self.running or self.stop_after is not None:
            start = self.measure_start + self.next_close * self.window_ns
            end = start + self.window_ns
            # Open loop: only once every request intended before the end has reached the loop.
            if now < end or (self.spec.mode == "open" and self.frontier < end and self.running):
                break
            w = self.window_for(start)
            w.closed = True
            cpu, wall = time.process_time(), mono_ns()
            w.cpu = {"cpu_s": cpu - self.cpu_mark[0], "wall_s": (wall - self.cpu_mark[1]) / 1e9}
            self.cpu_mark = (cpu, wall)
            self.next_close += 1
            if w.outstanding <= 0:
                self.flush(w)
        self.client.expire(now)

    def flush(self, w: Window) -> None:
        if w.flushed:
            return
        w.flushed = True
        hist = stats.new_histogram()
        stats.record_many(hist, w.lat)
        lag = stats.new_histogram()
        stats.record_many(lag, w.lag)
        self.send(("window", self.spec.index, {
            "index": w.index, "ok": len(w.lat), "errors": dict(w.errors), "offered": w.offered, "sent": w.sent,
            "hist": stats.encode(hist), "lag": stats.encode(lag), "cpu_s": w.cpu.get("cpu_s", 0.0),
            "wall_s": w.cpu.get("wall_s", 0.0), "max_pending": self.max_pending}))
        del self.windows[w.index]

    def send(self, message) -> None:
        self.conn.send(message)

    # -- control -----------------------------------------------------------------------------
    def _on_parent(self) -> None:
        try:
            msg = self.conn.recv()
        except EOFError:  # the parent is gone: stop at once
            msg = ("abort", None)
        kind, arg = msg
        if kind == "go":
            self.go.set_result(arg)
        elif kind == "stop":
            self.stop_after = arg
            self.running = False
            if not self.stopped.done():
                self.stopped.set_result(None)
        elif kind == "abort":
            self.stop_after = -1
            self.running = False
            if not self.go.done():
                self.go.set_result(None)
            if not self.stopped.done():
                self.stopped.set_result(None)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.go = loop.create_future()
        self.stopped = loop.create_future()
        loop.add_reader(self.conn.fileno(), self._on_parent)
        spec = self.spec
        self.client = (HttpClient if spec.protocol == "http" else GrpcClient)(self)
        initial = spec.concurrency if spec.mode == "closed" else min(spec.initial_connections, spec.max_connections)
        await self.client.open(initial)
        self.send(("ready", spec.index, None))
        start_ns = await self.go
        if start_ns is None:
            return
        self.measure_start = start_ns + int(spec.warmup_s * 1e9)
        delay = (start_ns - mono_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        self.running = True
        self.cpu_mark = (time.process_time(), mono_ns())
        ticker = asyncio.ensure_future(self._ticker())
        timer = None
        if spec.mode == "closed":
            self.client.start_closed()
        else:
            timer = Schedule(self, start_ns)
            timer.start()
        await self.stopped
        if timer is not None:
            timer.stop()
        # Windows up to the last one the parent keeps must be complete: wait for their answers
        # (each ends at its timeout at the latest), then report.
        deadline = mono_ns() + self.timeout_ns + int(1e9)
        while self.stop_after is not None and self.stop_after >= 0 and mono_ns() < deadline:
            pending = [w for w in self.windows.values() if w.index <= self.stop_after and not w.flushed]
            if not pending and self.next_close > self.stop_after:
                break
            await asyncio.sleep(TICK_S)
        ticker.cancel()
        await self.client.close()
        self.send(("done", spec.index, {"warmup_errors": dict(self.warmup_errors),
                                        "connections_opened": self.connections_opened,
                                        "max_pending": self.max_pending, "queued": self.queued,
                                        "stragglers": self.stragglers}))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - reported to the parent, which fails the run
                self.send(("error", self.spec.index, traceback.format_exc()))
                raise


class Schedule(threading.Thread):
    """Open-loop arrivals: sleeps until each intended send time and hands due requests to the loop.

    Event loops time their sleeps to the millisecond; `Event.wait` sleeps to the microsecond, so
    send lag stays in microseconds while the worker keeps up. Requests due while the loop is
    busy are handed over together (one wake-up), each with its own intended time.
    """

    def __init__(self, worker: Worker, start_ns: int):
        super().__init__(name="bench-schedule", daemon=True)
        self.worker = worker
        self.start_ns = start_ns
        self.halt = threading.Event()
        self.rng = np.random.default_rng(worker.spec.seed)
        self.mean_gap_ns = 1e9 / worker.spec.rate
        # A thread's sleep ends 50-100 us late on a VM; the last stretch is waited out awake,
        # spending at most a tenth of the mean gap (so at most ~10 % of a core) doing so.
        self.spin_ns = min(SPIN_NS, 0.1 * self.mean_gap_ns)
        self.handoff: collections.deque = collections.deque()
        self.armed = False
        self.lock = threading.Lock()
        self.first = float(start_ns) + (self.rng.uniform(0, self.mean_gap_ns) if worker.spec.arrival == "constant"
                                        else self.rng.exponential(self.mean_gap_ns))
        self.handoff_frontier = self.first
        worker.frontier = self.first

    def gaps(self) -> np.ndarray:
        if self.worker.spec.arrival == "constant":
            return np.full(4096, self.mean_gap_ns)
        return self.rng.exponential(self.mean_gap_ns, 4096)

    def stop(self) -> None:
        self.halt.set()

    def run(self) -> None:
        loop = self.worker.loop
        # Workers share the rate; a random phase keeps constant-rate workers from sending in step.
        t = self.first
        gaps = self.gaps()
        gi = 0
        while not self.halt.is_set():
            now = mono_ns()
            due = []
            while t <= now:
                due.append(int(t))
                t += gaps[gi]
                gi += 1
                if gi == len(gaps):
                    gaps, gi = self.gaps(), 0
            if due:
                with self.lock:
                    self.handoff.extend(due)
                    self.handoff_frontier = t
                    wake = not self.armed
                    self.armed = True
                if wake:
                    try:
                        loop.call_soon_threadsafe(self.drain)
                    except RuntimeError:  # loop closed
                        return
                continue
            wait = t - now
            if wait > self.spin_ns:
                self.halt.wait((wait - self.spin_ns) / 1e9)
            else:
                time.sleep(0)  # lets the loop thread have the interpreter while we wait

    def drain(self) -> None:
        with self.lock:
            due = list(self.handoff)
            self.handoff.clear()
            self.armed = False
            frontier = self.handoff_frontier
        if not self.halt.is_set():
            issue = self.worker.client.issue
            for t in due:
                issue(t)
            self.worker.frontier = frontier


# ---------------------------------------------------------------------------------------------
# HTTP/1.1


class HttpConnection(asyncio.Protocol):
    __slots__ = ("client", "transport", "parser", "busy", "intended", "sent", "window", "closed")

    def __init__(self, client: "HttpClient"):
        import httptools

        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.intended = 0
        self.sent = 0
        self.window: Window | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # noqa: BLE001 - a malformed response: the request failed, drop the connection
            self.client.failed(self, "bad_response")

    def on_message_complete(self) -> None:
        self.client.answered(self, self.parser.get_status_code(), self.parser.should_keep_alive())

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.client.lost(self)


class HttpClient:
    def __init__(self, worker: Worker):
        self.worker = worker
        spec = worker.spec
        self.spec = spec
        self.payloads = spec.payloads
        self.n_payloads = len(spec.payloads)
        self.next_payload = 0
        self.idle: collections.deque[HttpConnection] = collections.deque()
        self.conns: set[HttpConnection] = set()
        self.connecting = 0
        self.pending: collections.deque = collections.deque()
        self.closing = False
        self.closed_mode = spec.mode == "closed"
        self.reconnect_wait = 0.0

    async def _connect(self) -> HttpConnection:
        loop = self.worker.loop
        _, proto = await loop.create_connection(lambda: HttpConnection(self), self.spec.host, self.spec.port)
        self.conns.add(proto)
        self.worker.connections_opened += 1
        return proto

    async def open(self, n: int) -> None:
        for _ in range(n):
            try:
                conn = await self._connect()
            except OSError as e:
                raise ConnectionError(f"cannot connect to {self.spec.host}:{self.spec.port}: {e.strerror or e}") \
                    from None
            self.idle.append(conn)

    def start_closed(self) -> None:
        while self.idle:
            self.send_now(self.idle.popleft())

    def send_now(self, conn: HttpConnection) -> None:
        """Closed loop: the connection's next request, due now."""
        now = mono_ns()
        w = self.worker.window_for(now)
        self.worker.begin(w)
        self.send(conn, now, w)

    def send(self, conn: HttpConnection, intended: int, w: Window | None) -> None:
        now = mono_ns()
        conn.busy = True
        conn.intended = intended
        conn.sent = now
        conn.window = w
        self.worker.sent(w, intended, now)
        i = self.next_payload
        self.next_payload = i + 1 if i + 1 < self.n_payloads else 0
        conn.transport.write(self.payloads[i])

    def answered(self, conn: HttpConnection, status: int, keep_alive: bool) -> None:
        conn.busy = False
        self.worker.complete(conn.window, conn.intended, None if status == 200 else str(status))
        if not keep_alive:
            self._drop(conn)
            self._replace()
            return
        self._next(conn)

    def _next(self, conn: HttpConnection) -> None:
        if self.closing or not self.worker.running:
            self.idle.append(conn)
            return
        if self.closed_mode:
            self.send_now(conn)
        elif self.pending:
            self.send(conn, *self.pending.popleft())
        else:
            self.idle.append(conn)

    def failed(self, conn: HttpConnection, reason: str) -> None:
        if conn.busy:
            conn.busy = False
            self.worker.complete(conn.window, conn.intended, reason)
        self._drop(conn)
        self._replace()

    def lost(self, conn: HttpConnection) -> None:
        if conn not in self.conns:
            return
        if conn.busy:
            conn.busy = False
            self.worker.complete(conn.window, conn.intended, "connection_closed")
        self._drop(conn)
        self._replace()

    def _drop(self, conn: HttpConnection) -> None:
        self.conns.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if conn.transport is not None and not conn.closed:
            conn.transport.abort()

    def _replace(self) -> None:
        """Closed loop: keep `concurrency` connections busy; open loop: serve waiting requests."""
        if self.closing or not self.worker.running:
            return
        if self.closed_mode or self.pending:
            asyncio.ensure_future(self._reopen())

    async def _reopen(self) -> None:
        if self.reconnect_wait:
            await asyncio.sleep(self.reconnect_wait)
        self.connecting += 1
        try:
            conn = await self._connect()
        except OSError:
            self.connecting -= 1
            # The server is gone or refusing: count it against the current window, back off.
            if self.closed_mode:  # the attempt stands for the request this connection would send
                w = self.worker.window_for(mono_ns())
                self.worker.begin(w)
                self.worker.complete(w, 0, "connect_failed")
            self.reconnect_wait = min(0.5, max(0.01, self.reconnect_wait * 2))
            if self.closed_mode or self.pending:
                asyncio.ensure_future(self._reopen())
            return
        self.connecting -= 1
        self.reconnect_wait = 0.0
        self._next(conn)

    def issue(self, intended: int) -> None:
        """Open loop: one request due at `intended`."""
        w = self.worker.window_for(intended)
        self.worker.begin(w)
        if self.idle:
            self.send(self.idle.popleft(), intended, w)
            return
        self.pending.append((intended, w))
        self.worker.queued += 1
        self.worker.max_pending = max(self.worker.max_pending, len(self.pending))
        if len(self.conns) + self.connecting < self.spec.max_connections:
            asyncio.ensure_future(self._reopen())

    def expire(self, now: int) -> None:
        limit = self.worker.timeout_ns
        for conn in [c for c in self.conns if c.busy and now - c.sent > limit]:
            conn.busy = False
            self.worker.complete(conn.window, conn.intended, "timeout")
            self._drop(conn)
            self._replace()
        while self.pending and now - self.pending[0][0] > limit:
            t, w = self.pending.popleft()
            self.worker.complete(w, t, "timeout")

    async def close(self) -> None:
        self.closing = True
        for t, w in list(self.pending):  # never sent: they count as the client's failures
            if w is not None and not w.flushed:
                self.worker.complete(w, t, "not_sent")
        self.pending.clear()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()
        self.conns.clear()


# ---------------------------------------------------------------------------------------------
# gRPC


class GrpcClient:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.spec = worker.spec
        self.payloads = self.spec.payloads
        self.n_payloads = len(self.payloads)
        self.next_payload = 0
        self.tasks: set[asyncio.Task] = set()
        self.channels: list = []
        self.calls: list = []

    async def open(self, n: int) -> None:
        import grpc
        from grpc import aio

        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                   ("grpc.use_local_subchannel_pool", 1)]
        target = f"{self.spec.host}:{self.spec.port}"
        for _ in range(max(1, self.spec.grpc_channels)):
            ch = aio.insecure_channel(target, options=options)
            try:
                await asyncio.wait_for(ch.channel_ready(), 10)
            except asyncio.TimeoutError:
                await ch.close()
                raise ConnectionError(f"cannot connect to {target} (gRPC channel not ready in 10 s)") from None
            self.channels.append(ch)
            # No serializers: the request is already serialized and the answer is not decoded.
            self.calls.append(ch.unary_unary(GRPC_INFER_METHOD))
            self.worker.connections_opened += 1
        self.grpc = grpc

    def _payload(self) -> bytes:
        i = self.next_payload
        self.next_payload = i + 1 if i + 1 < self.n_payloads else 0
        return self.payloads[i]

    async def _one(self, intended: int, w: Window | None, call) -> None:
        self.worker.sent(w, intended, mono_ns())
        status = None
        try:
            await call(self._payload(), timeout=self.spec.timeout_s)
        except self.grpc.aio.AioRpcError as e:
            code = e.code()
            status = "timeout" if code == self.grpc.StatusCode.DEADLINE_EXCEEDED else code.name
        except asyncio.CancelledError:
            status = "not_sent"
        self.worker.complete(w, intended, status)

    def start_closed(self) -> None:
        for i in range(self.spec.concurrency):
            t = asyncio.ensure_future(self._user(self.calls[i % len(self.calls)]))
            self.tasks.add(t)

    async def _user(self, call) -> None:
        while self.worker.running:
            t = mono_ns()
            w = self.worker.window_for(t)
            self.worker.begin(w)
            await self._one(t, w, call)

    def issue(self, intended: int) -> None:
        w = self.worker.window_for(intended)
        self.worker.begin(w)
        t = asyncio.ensure_future(self._one(intended, w, self.calls[self.next_payload % len(self.calls)]))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def expire(self, now: int) -> None:
        pass  # gRPC deadlines time calls out

    async def close(self) -> None:
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.spec.timeout_s + 1)
        for ch in self.channels:
            await ch.close()


# ---------------------------------------------------------------------------------------------
# Process entry point


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Run one worker (the target of a spawned process)."""
    # The schedule thread must get the interpreter lock promptly when it wakes up.
    sys.setswitchinterval(0.0005)
    _precise_sleeps()
    if spec.use_uvloop and spec.protocol == "http":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
    worker = Worker(spec, conn)
    try:
        asyncio.run(worker.main())
    except ConnectionError as e:
        _safe_send(conn, ("error", spec.index, str(e)))
    except BaseException:  # noqa: BLE001 - a bug: the parent shows the traceback
        _safe_send(conn, ("error", spec.index, traceback.format_exc()))
    finally:
        conn.close()


def _precise_sleeps() -> None:
    """Linux rounds a thread's sleeps up by its timer slack (50 us by default); 1 us instead, for
    this process's threads (inherited by the schedule thread)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in ns
        except (OSError, AttributeError):
            pass


def _safe_send(conn: Connection, msg) -> None:
    try:
        conn.send(msg)
    except (OSError, EOFError):
        pass


# ---------------------------------------------------------------------------------------------
# Parent side


class WorkerFailed(Exception):
    """A worker could not run (cannot connect) or crashed; the message says which and why."""


@dataclass
class WindowResult:
    index: int
    ok: int
    errors: dict[str, int]
    offered: int
    sent: int
    hist: Any
    lag: Any
    cpu: list[float]
    """Per worker: CPU seconds / wall seconds over the window (1.0 = one core busy)."""
    max_pending: int


class LoadRun:
    """Starts the workers, gathers their windows, merges them, and stops them on request.

    Workers are fresh interpreters (`python -m serve_kit.bench.loadgen FD`) talking over a socket
    pair, not multiprocessing children: nothing of the parent (threads, a server, gRPC state, a
    main script without a `__main__` guard) is inherited or re-imported.
    """

    def __init__(self, specs: list[WorkerSpec]):
        self.specs = specs
        self.procs: list = []
        self.logs: list = []
        self.conns: list[Connection] = []
        self.partial: dict[int, dict[int, dict]] = collections.defaultdict(dict)
        self.done: dict[int, dict] = {}
        self.next_window = 0

    def start(self, ready_timeout: float = 60.0) -> None:
        import socket
        import subprocess
        import tempfile
        from pathlib import Path

        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        for spec in self.specs:
            mine, theirs = socket.socketpair()
            log = tempfile.TemporaryFile()
            p = subprocess.Popen([sys.executable, "-m", "serve_kit.bench.loadgen", str(theirs.fileno())],
                                 pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=env)
            theirs.close()
            conn = Connection(mine.detach())
            conn.send(spec)
            self.procs.append(p)
            self.logs.append(log)
            self.conns.append(conn)
        ready = set()
        deadline = time.monotonic() + ready_timeout
        while len(ready) < len(self.specs):
            msg = self._recv_any(deadline - time.monotonic())
            if msg is None:
                raise WorkerFailed(f"load generator workers not ready in {ready_timeout:.0f} s")
            kind, idx, arg = msg
            if kind == "ready":
                ready.add(idx)
            elif kind == "error":
                raise WorkerFailed(arg)
        start_ns = mono_ns() + int(0.05e9)
        for c in self.conns:
            c.send(("go", start_ns))
        self.start_ns = start_ns

    def _recv_any(self, timeout: float):
        from multiprocessing.connection import wait

        if timeout <= 0:
            return None
        live = [c for c in self.conns if not c.closed]
        got = wait(live, timeout)
        for c in got:
            try:
                return c.recv()
            except (EOFError, ConnectionResetError):
                i = self.conns.index(c)
                c.close()
                if i not in self.done:
                    code = self.procs[i].wait(5)
                    self.logs[i].seek(0)
                    tail = self.logs[i].read()[-2000:].decode("utf-8", "replace").strip()
                    raise WorkerFailed(f"load generator worker {i} exited (exit code {code})"
                                       + (f": {tail}" if tail else "")) from None
        return None

    def next(self, timeout: float) -> WindowResult | None:
        """The next window merged over all workers, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while True:
            k = self.next_window
            if len(self.partial.get(k, {})) == len(self.specs):
                parts = self.partial.pop(k)
                self.next_window += 1
                return self._merge(k, list(parts.values()))
            msg = self._recv_any(deadline - time.monotonic())
            if msg is None:
                return None
            self._handle(msg)

    def _handle(self, msg) -> None:
        kind, idx, arg = msg
        if kind == "window":
            self.partial[arg["index"]][idx] = arg
        elif kind == "done":
            self.done[idx] = arg
        elif kind == "error":
            raise WorkerFailed(arg)

    @staticmethod
    def _merge(k: int, parts: list[dict]) -> WindowResult:
        errors: dict[str, int] = collections.defaultdict(int)
        for p in parts:
            for key, n in p["errors"].items():
                errors[key] += n
        return WindowResult(
            index=k, ok=sum(p["ok"] for p in parts), errors=dict(errors),
            offered=sum(p["offered"] for p in parts), sent=sum(p["sent"] for p in parts),
            hist=stats.merge(p["hist"] for p in parts), lag=stats.merge(p["lag"] for p in parts),
            cpu=[p["cpu_s"] / p["wall_s"] if p["wall_s"] else 0.0 for p in parts],
            max_pending=max(p["max_pending"] for p in parts))

    def stop(self, last_window: int, timeout: float) -> dict[int, dict]:
        """Stop sending; windows after `last_window` are discarded. Returns each worker's totals."""
        for c in self.conns:
            if not c.closed:
                try:
                    c.send(("stop", last_window))
                except (OSError, BrokenPipeError):
                    pass
        deadline = time.monotonic() + timeout
        while len(self.done) < len(self.specs):
            msg = self._recv_any(deadline - time.monotonic())
            if msg is None:
                break
            self._handle(msg)
        return self.done

    def close(self) -> None:
        for c in self.conns:
            if not c.closed:
                try:
                    c.send(("abort", None))
                except (OSError, BrokenPipeError):
                    pass
        import subprocess

        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for c in self.conns:
            c.close()
        for log in self.logs:
            log.close()


def split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as integers allow."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def default_workers() -> int:
    return 1


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


ProgressFn = Callable[[WindowResult], None]


if __name__ == "__main__":
    _conn = Connection(int(sys.argv[1]))
    worker_main(_conn.recv(), _conn)
