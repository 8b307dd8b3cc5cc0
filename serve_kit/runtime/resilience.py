"""Graceful degradation around one version's scheduler: circuit breaker, response cache, and the
idempotency table the router uses.

`Resilient(inner, breaker, cache)` wraps a DynamicBatcher with the same Scheduler surface (a
decorator, not a special case in the batcher):

- `CircuitBreaker`: closed -> open when, over a rolling window of outcomes (a ring of time
  buckets, so recording is O(1) and memory fixed), at least `min_requests` outcomes were seen and
  the share of failures (500 backend error, 504 timeout, or slower than `max_latency_ms`) reached
  `max_error_rate`. Open refuses at once with `BreakerOpen` (503 + Retry-After) for `open_seconds`,
  then half-open lets `half_open_probes` requests through: all succeed -> closed, one fails ->
  open again. Client errors (4xx) and shedding (503) count as neither. The same vocabulary as
  resilience4j's time-based sliding window and Envoy's outlier detection. Every outcome carries the
  ticket of the state it was admitted under; an outcome of an older state is ignored (a slow
  request admitted while closed says nothing about the probes).
- `ResponseCache`: LRU bounded in bytes (keys + arrays), keyed by a blake2b digest of the version
  and the input tensors (names, dtypes, shapes, bytes). Entries are read-only copies; a hit is an
  already-done future whose result is a `CachedOutputs`. A hit is served even while the breaker is
  open: it costs the backend nothing.
- `IdempotencyTable`: (endpoint, Idempotency-Key) -> the request digest and the future / answer of
  its first attempt, for `ttl_s` after it finished, bounded in entries and bytes.

All of it is written by hand on purpose: the pieces are small, must stay cheap on the request path
(no per-request allocation beyond a tuple), and their semantics are this project's contract;
no library in the venv offers them for asyncio futures.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from .types import BadRequest, InferError, Internal, Timeout, Unavailable

log = logging.getLogger("serve_kit.runtime")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_CODE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
"""`serve_kit_breaker_state` gauge values."""


class BreakerOpen(Unavailable):
    """Refused at once: this version's circuit breaker is open (503, Retry-After = the cool-down
    left). The router falls back on it."""


class IdempotencyConflict(InferError):
    """The same Idempotency-Key was sent with a different request (422 / gRPC INVALID_ARGUMENT)."""

    status = 422
    grpc_code = "INVALID_ARGUMENT"


# ---------------------------------------------------------------------------------------------
# Counters


class Counts:
    """The cumulative counters of one (model, version)'s breaker and cache. The manager hands the
    same object to the breaker and cache of every reload of that version, so the metrics stay
    monotonic across reloads (as the scheduler counters do)."""

    __slots__ = ("transitions", "rejected", "hits", "misses", "evictions")

    def __init__(self) -> None:
        self.transitions = {CLOSED: 0, OPEN: 0, HALF_OPEN: 0}
        self.rejected = self.hits = self.misses = self.evictions = 0


# ---------------------------------------------------------------------------------------------
# Circuit breaker


class CircuitBreaker:
    """A thread-safe closed / open / half-open state machine over a rolling time window.

    The window is `buckets` slots of `window_seconds / buckets` each; a slot is reset when time
    reaches it again, so the window covers between (buckets-1)/buckets and all of `window_seconds`.
    `clock` returns seconds (monotonic); tests inject their own."""

    def __init__(self, window_seconds: float = 10.0, min_requests: int = 20, max_error_rate: float = 0.5,
                 max_latency_ms: float | None = None, open_seconds: float = 5.0, half_open_probes: int = 3,
                 *, buckets: int = 10, clock: Callable[[], float] = time.monotonic, label: str = "",
                 counts: Counts | None = None):
        if window_seconds <= 0 or min_requests < 1 or not 0 < max_error_rate <= 1 or open_seconds < 0 \
                or half_open_probes < 1 or buckets < 1 or (max_latency_ms is not None and max_latency_ms <= 0):
            raise ValueError("invalid circuit breaker settings")
        self.window_seconds = float(window_seconds)
        self.min_requests = int(min_requests)
        self.max_error_rate = float(max_error_rate)
        self.max_latency_s = None if max_latency_ms is None else max_latency_ms / 1000.0
        self.open_seconds = float(open_seconds)
        self.half_open_probes = int(half_open_probes)
        self.label = label
        self._clock = clock
        self._width = self.window_seconds / buckets
        # Per slot: [slot index in time, outcomes, failures].
        self._ring = [[-1, 0, 0] for _ in range(buckets)]
        self._lock = threading.Lock()
        self._state = CLOSED
        self._ticket = 0
        """+1 on every transition: outcomes admitted under an older ticket are ignored."""
        self._opened_at = 0.0
        self._probes = 0  # admitted in this half-open period, not yet answered or succeeded
        self._probe_ok = 0
        self.counts = counts or Counts()
        self.on_transition: Callable[[str, str], None] | None = None

    # -- reading ------------------------------------------------------------------------------

    @property
    def transitions(self) -> dict[str, int]:
        return self.counts.transitions

    @property
    def rejected(self) -> int:
        return self.counts.rejected

    @property
    def state(self) -> str:
        with self._lock:
            self._advance(self._clock())
            return self._state

    def retry_after(self) -> float:
        """Seconds left of the cool-down (0 unless open)."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            return max(0.0, self._opened_at + self.open_seconds - now) if self._state == OPEN else 0.0

    def window(self) -> tuple[int, int]:
        """(outcomes, failures) in the rolling window now."""
        with self._lock:
            return self._count(self._clock())

    def snapshot(self) -> dict[str, Any]:
        """The stats entry: {"state", "error_rate", "window_requests"}."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            n, f = self._count(now)
            return {"state": self._state, "error_rate": (f / n) if n else 0.0, "window_requests": n}

    # -- admission and outcomes ---------------------------------------------------------------

    def acquire(self) -> int | None:
        """Admit one request: its ticket, or None when refused (counted in `rejected`)."""
        with self._lock:
            self._advance(self._clock())
            if self._state == CLOSED:
                return self._ticket
            if self._state == HALF_OPEN and self._probes < self.half_open_probes:
                self._probes += 1
                return self._ticket
            self.counts.rejected += 1
            return None

    def record(self, ticket: int, ok: bool | None, latency_s: float = 0.0) -> None:
        """The outcome of a request admitted with `ticket`: True success, False failure, None
        neither (a client error or a shed request: it only frees its half-open probe slot)."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            if ticket != self._ticket:
                return
            if ok and self.max_latency_s is not None and latency_s > self.max_latency_s:
                ok = False
            if self._state == CLOSED:
                if ok is None:
                    return
                slot = self._slot(now)
                slot[1] += 1
                slot[2] += not ok
                n, f = self._count(now)
                if n >= self.min_requests and f >= self.max_error_rate * n:
                    self._move(OPEN, now)
            elif self._state == HALF_OPEN:
                if ok is None:
                    self._probes -= 1
                elif not ok:
                    self._move(OPEN, now)
                else:
                    self._probe_ok += 1
                    if self._probe_ok >= self.half_open_probes:
                        self._move(CLOSED, now)

    # -- internals (lock held) ----------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._state == OPEN and now >= self._opened_at + self.open_seconds:
            self._move(HALF_OPEN, now)

    def _move(self, to: str, now: float) -> None:
        prev, self._state = self._state, to
        self._ticket += 1
        self.counts.transitions[to] += 1
        if to == OPEN:
            self._opened_at = now
        if to == HALF_OPEN:
            self._probes = self._probe_ok = 0
        if to == CLOSED:  # a fresh window: the failures that opened it are history
            for slot in self._ring:
                slot[0] = -1
        if self.on_transition is not None:
            self.on_transition(prev, to)

    def _slot(self, now: float) -> list[int]:
        index = int(now // self._width)
        slot = self._ring[index % len(self._ring)]
        if slot[0] != index:
            slot[0], slot[1], slot[2] = index, 0, 0
        return slot

    def _count(self, now: float) -> tuple[int, int]:
        index = int(now // self._width)
        oldest = index - len(self._ring) + 1
        n = f = 0
        for i, c, e in self._ring:
            if oldest <= i <= index:
                n += c
                f += e
        return n, f


# ---------------------------------------------------------------------------------------------
# Response cache


class CachedOutputs(dict):
    """A cache hit's outputs (read-only arrays): the router answers `serve-kit-cache: hit`."""


def _array_nbytes(a: np.ndarray) -> int:
    if a.dtype == object:
        return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in a.flat) + 8 * a.size
    return a.nbytes


def _feed(h, a: np.ndarray) -> None:
    a = np.asarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    if a.dtype == object:  # BYTES tensors: the element bytes, each length-prefixed
        for v in a.flat:
            b = v if isinstance(v, bytes) else str(v).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    else:
        h.update(np.ascontiguousarray(a).data)


def tensors_digest(inputs: dict[str, np.ndarray], *prefix: object) -> bytes:
    """blake2b over `prefix` and each tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(prefix).encode())
    for name in sorted(inputs):
        h.update(name.encode())
        h.update(b"\0")
        _feed(h, inputs[name])
    return h.digest()


class ResponseCache:
    """LRU of full outputs keyed by (model, version, inputs), bounded in bytes (keys + arrays).

    Thread-safe (a lock around the dict); the hot path is one digest and one dict move."""

    def __init__(self, max_bytes: int, model: str = "", version: int = 0, counts: Counts | None = None):
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = int(max_bytes)
        self.model, self.version = model, version
        self._entries: OrderedDict[bytes, tuple[CachedOutputs, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.counts = counts or Counts()

    @property
    def hits(self) -> int:
        return self.counts.hits

    @property
    def misses(self) -> int:
        return self.counts.misses

    @property
    def evictions(self) -> int:
        return self.counts.evictions

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, inputs: dict[str, np.ndarray]) -> bytes:
        return tensors_digest(inputs, self.model, self.version)

    def get(self, key: bytes) -> CachedOutputs | None:
        """The entry (a fresh dict of the same read-only arrays), counted as a hit or a miss."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                self.counts.misses += 1
                return None
            self._entries.move_to_end(key)
            self.counts.hits += 1
        return CachedOutputs(e[0])

    def put(self, key: bytes, outputs: dict[str, np.ndarray]) -> bool:
        """Store read-only copies of `outputs`; False when the entry alone exceeds `max_bytes`."""
        frozen = CachedOutputs()
        size = len(key)
        for name, a in outputs.items():
            c = np.array(a, copy=True)
            c.setflags(write=False)
            frozen[name] = c
            size += len(name) + _array_nbytes(c)
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._entries[key] = (frozen, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, s) = self._entries.popitem(last=False)
                self.bytes -= s
                self.counts.evictions += 1
        return True


# ---------------------------------------------------------------------------------------------
# The scheduler decorator


def _outcome(fut: asyncio.Future) -> bool | None:
    """True success, False failure (500 backend error, 504 timeout), None neither."""
    if fut.cancelled():
        return None
    e = fut.exception()
    if e is None:
        return True
    if isinstance(e, (Internal, Timeout)):
        return False
    if isinstance(e, InferError):
        return None  # 4xx, or 503 shed / drained
    return False  # an unexpected error is answered 500


class Resilient:
    """One version's scheduler with a circuit breaker and/or a response cache in front of it.

    Same surface as DynamicBatcher; everything not overridden is the inner scheduler's."""

    def __init__(self, inner, breaker: CircuitBreaker | None = None, cache: ResponseCache | None = None):
        self.inner = inner
        self.breaker = breaker
        self.cache = cache
        self.model = inner.model
        self.version = inner.version
        self._clock = time.monotonic

    def __getattr__(self, name: str):  # config, threads_alive, ... of the inner scheduler
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def batching(self) -> bool:
        return self.inner.batching

    @property
    def accepting(self) -> bool:
        return self.inner.accepting

    @property
    def queue_depth(self) -> int:
        return self.inner.queue_depth

    @property
    def inflight(self) -> int:
        return self.inner.inflight

    @property
    def open(self) -> bool:
        """The breaker is open (the version reports not ready)."""
        return self.breaker is not None and self.breaker.state == OPEN

    def stats(self):
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    async def drain(self, timeout: float | None = None) -> bool:
        return await self.inner.drain(timeout)

    def record_refused(self, status: int) -> None:
        self.inner.record_refused(status)

    async def submit(self, inputs: dict[str, np.ndarray], priority: int = 0,
                     timeout_us: int = 0) -> dict[str, np.ndarray]:
        fut = self.submit_nowait(inputs, priority, timeout_us)
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()
            raise

    def submit_nowait(self, inputs: dict[str, np.ndarray], priority: int = 0,
                      timeout_us: int = 0) -> asyncio.Future:
        key = None
        if self.cache is not None:
            key = self.cache.key(inputs)
            hit = self.cache.get(key)
            if hit is not None:
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(hit)
                return fut
        ticket = None
        if self.breaker is not None:
            ticket = self.breaker.acquire()
            if ticket is None:
                self.inner.record_refused(BreakerOpen.status)
                raise BreakerOpen(f"model {self.model!r} version {self.version}: circuit breaker open "
                                  f"(too many failures); retry later",
                                  retry_after=self.breaker.retry_after() or 1.0)
        t0 = self._clock()
        try:
            fut = self.inner.submit_nowait(inputs, priority, timeout_us)
        except BaseException:
            if ticket is not None:
                self.breaker.record(ticket, None)
            raise
        if ticket is not None or key is not None:
            fut.add_done_callback(lambda f: self._done(f, ticket, key, t0))
        return fut

    def _done(self, fut: asyncio.Future, ticket: int | None, key: bytes | None, t0: float) -> None:
        ok = _outcome(fut)
        if ticket is not None:
            self.breaker.record(ticket, ok, self._clock() - t0)
        if ok and key is not None:
            self.cache.put(key, fut.result())


def wrap(inner, config, counts: Counts | None = None) -> Any:
    """`inner` wrapped as `config` (a ModelConfig) asks: a Resilient, or `inner` itself. `counts`:
    the version's counters carried over from its previous loads."""
    cb, rc = config.circuit_breaker, config.response_cache
    if cb is None and rc is None:
        return inner
    counts = counts or Counts()
    breaker = None if cb is None else CircuitBreaker(
        cb.window_seconds, cb.min_requests, cb.max_error_rate, cb.max_latency_ms, cb.open_seconds,
        cb.half_open_probes, label=f"{inner.model}:{inner.version}", counts=counts)
    cache = None if rc is None else ResponseCache(rc.max_bytes, inner.model, inner.version, counts)
    if breaker is not None:
        breaker.on_transition = lambda prev, to, b=breaker: _log_transition(b, prev, to)
    return Resilient(inner, breaker, cache)


def _log_transition(breaker: CircuitBreaker, prev: str, to: str) -> None:
    # Called under the breaker's lock: only the log line, no reading of the breaker here.
    if to == OPEN:
        log.warning("model %s: circuit breaker %s -> open for %.1f s (failure share reached %.0f %% "
                    "of at least %d answers in %.0f s)", breaker.label, prev, breaker.open_seconds,
                    breaker.max_error_rate * 100, breaker.min_requests, breaker.window_seconds)
    else:
        log.info("model %s: circuit breaker %s -> %s", breaker.label, prev, to)


# ---------------------------------------------------------------------------------------------
# Idempotency


MAX_KEY_LENGTH = 128


def check_key(key: object) -> str:
    """An Idempotency-Key as given, or BadRequest: 1..128 printable ASCII characters."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH \
            or any(not " " <= c <= "~" for c in key):
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return key


def request_digest(inputs: dict[str, np.ndarray], version: int | None,
                   outputs: list[str] | None) -> bytes:
    """What a retry must repeat to share an answer: the inputs, the version asked for and the
    requested outputs (None = all; their order does not matter)."""
    return tensors_digest(inputs, "idem", version, None if outputs is None else sorted(outputs))


def _size_of(answer: Any) -> int:
    outputs = getattr(answer, "outputs", answer)
    if isinstance(outputs, dict):
        return 64 + sum(len(k) + (_array_nbytes(v) if isinstance(v, np.ndarray) else sys.getsizeof(v))
                        for k, v in outputs.items())
    return sys.getsizeof(answer)


class _Entry:
    __slots__ = ("digest", "future", "answer", "size", "expires")

    def __init__(self, digest: bytes, future: asyncio.Future):
        self.digest = digest
        self.future = future
        self.answer: Any = None
        self.size = 0
        self.expires: float | None = None  # None while the first attempt runs


def relay(src: asyncio.Future, dst: asyncio.Future, transform: Callable[[Any], Any] | None = None) -> None:
    """When `src` is done, finish `dst` the same way (cancelled, its exception, or its result
    through `transform`), unless `dst` is done already."""

    def copy(f: asyncio.Future) -> None:
        if dst.done():
            return
        if f.cancelled():
            dst.cancel()
        elif f.exception() is not None:
            dst.set_exception(f.exception())
        else:
            dst.set_result(f.result() if transform is None else transform(f.result()))

    if src.done():
        copy(src)
    else:
        src.add_done_callback(copy)


class IdempotencyTable:
    """(endpoint, key) -> the first attempt of a request, for the router.

        fut, replayed = table.claim(endpoint, key, digest, start)

    `start()` runs the request and returns the future of its answer; it is called only when no
    attempt with this key is known. A retry while that attempt runs gets a future of the same
    answer (the work runs once); a retry after it succeeded, within `ttl_s`, gets an already-done
    future of the same answer and `replayed` True (counted in `replays[endpoint]`). A failed first
    attempt is forgotten, so its retry runs again. The same key with another digest raises
    IdempotencyConflict. Finished answers are bounded by `max_entries` and `max_bytes` (oldest
    first). Event-loop thread only."""

    def __init__(self, ttl_s: float = 300.0, max_entries: int = 10_000, max_bytes: int = 64 << 20,
                 *, clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0 or max_entries < 1 or max_bytes < 1:
            raise ValueError("invalid idempotency table bounds")
        self.ttl_s, self.max_entries, self.max_bytes = float(ttl_s), int(max_entries), int(max_bytes)
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._finished_order: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.bytes = 0
        self.replays: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, endpoint: str, key: str, digest: bytes,
              start: Callable[[], asyncio.Future]) -> tuple[asyncio.Future, bool]:
        now = self._clock()
        self._expire(now)
        k = (endpoint, key)
        e = self._entries.get(k)
        if e is not None and e.digest != digest:
            raise IdempotencyConflict("Idempotency-Key reused for a different request")
        loop = asyncio.get_running_loop()
        if e is not None and e.expires is not None:
            self.replays[endpoint] = self.replays.get(endpoint, 0) + 1
            done = loop.create_future()
            done.set_result(e.answer)
            return done, True
        if e is not None:
            return self._follow(loop, e.future), False
        fut = start()
        e = _Entry(digest, fut)
        self._entries[k] = e
        fut.add_done_callback(lambda f: self._finished(k, e, f))
        self._bound()
        # The caller gets its own future: a client that goes away cancels only its wait, never the
        # work another retry is waiting on.
        return self._follow(loop, fut), False

    @staticmethod
    def _follow(loop: asyncio.AbstractEventLoop, src: asyncio.Future) -> asyncio.Future:
        out = loop.create_future()
        relay(src, out)
        return out

    def _finished(self, k: tuple[str, str], e: _Entry, f: asyncio.Future) -> None:
        if self._entries.get(k) is not e:
            return  # evicted meanwhile
        if f.cancelled() or f.exception() is not None:
            del self._entries[k]
            return
        e.answer = f.result()
        e.size = len(k[0]) + len(k[1]) + len(e.digest) + _size_of(e.answer)
        if e.size > self.max_bytes:
            del self._entries[k]
            return
        e.expires = self._clock() + self.ttl_s
        e.future = None
        self._finished_order[k] = None  # finished order = expiry order (one ttl for all)
        self.bytes += e.size
        self._bound()

    def _expire(self, now: float) -> None:
        order = self._finished_order
        while order:
            k = next(iter(order))
            if self._entries[k].expires > now:
                return
            self._drop(k)

    def _bound(self) -> None:
        # Oldest finished answers go first; running attempts only when nothing else is left (a
        # dropped running attempt only loses sharing: its retry runs again).
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._finished_order)) if self._finished_order else next(iter(self._entries)))

    def _drop(self, k: tuple[str, str]) -> None:
        e = self._entries.pop(k)
        if e.expires is not None:
            del self._finished_order[k]
            self.bytes -= e.size


__all__ = ["relay", "BreakerOpen", "CachedOutputs", "CircuitBreaker", "Counts", "IdempotencyConflict", "IdempotencyTable",
           "ResponseCache", "Resilient", "check_key", "request_digest", "tensors_digest", "wrap",
           "CLOSED", "OPEN", "HALF_OPEN", "STATE_CODE"]
