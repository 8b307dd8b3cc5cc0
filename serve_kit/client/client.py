"""`AsyncClient` (asyncio) and `Client` (the same client driven from a private event-loop thread):
retries with backoff and full jitter under one deadline, one Idempotency-Key per call, a circuit
breaker per endpoint, least-outstanding balancing with outlier ejection, and optional hedging.

The sync client runs the async one on a loop thread instead of a second implementation over
urllib3: one code path for retries, hedging and cancellation (a hedge's loser is a cancelled task),
so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import (CircuitOpen, ClientError, ConnectionFailed, DeadlineExceeded, NoReplicaAvailable,
                     ServerError)
from .policy import (Balancer, BreakerPolicy, CircuitBreaker, EjectionPolicy, HedgePolicy, LatencyWindow,
                     Replica, RetryPolicy)
from .transport import Answer, GrpcTransport, HttpTransport

RETRYABLE_STATUS = frozenset({429, 503})
"""Answers worth retrying (elsewhere or later). Every other 4xx is the caller's mistake; a 500 is the
model failing on this input (retrying runs the same failure again); a 504 means the deadline we sent
has passed."""
REPLICA_FAILURE_STATUS = frozenset({500, 502, 503, 504})
"""Answers that count against a replica for ejection (with connection errors and per-try timeouts)."""


@dataclass
class InferResult:
    """One call's answer."""

    outputs: dict[str, np.ndarray]
    model: str
    """The endpoint as called (the server's `model_name`)."""
    version: int
    """The version that answered."""
    target: str | None
    """`model/version` that answered, as the server reported it (`serve-kit-target`)."""
    fallback: bool
    """A fallback target answered."""
    cache_hit: bool
    """The server answered from its response cache."""
    request_id: str
    """The call's Idempotency-Key, also the OIP request `id`."""
    attempts: int
    """Tries sent, hedges included."""
    replica: str
    """URL of the replica whose answer this is."""
    parameters: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def _protocol_of(url: str, protocol: str | None) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme not in (None, "http", "grpc"):
        raise ClientError(f"unsupported URL scheme {scheme!r} in {url!r}", hint="use http://host:port or grpc://host:port")
    chosen = protocol or scheme or "http"
    if chosen not in ("http", "grpc") or (scheme and protocol and scheme != protocol):
        raise ClientError(f"protocol {protocol!r} does not fit the URL {url!r}", hint='protocol="http" or "grpc"')
    return chosen


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a loser's failure is no news


def _bool(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "hit"))


class AsyncClient:
    """Resilient Open Inference Protocol client over one or more replicas of a serve-kit server.

    `urls`: one URL or several replicas (`http://host:port`, `grpc://host:port`; all the same
    protocol). `deadline`: default seconds per call (retries included). `per_try_timeout`: seconds
    one try may take before it counts as a failure of its replica (None: the rest of the deadline).
    """

    def __init__(self, urls: str | Sequence[str], *, protocol: str | None = None, deadline: float = 30.0,
                 per_try_timeout: float | None = None, retry: RetryPolicy | None = None,
                 breaker: BreakerPolicy | None = None, ejection: EjectionPolicy | None = None,
                 hedge: HedgePolicy | None = None, seed: int | None = None):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ClientError("no replica URL given")
        protocols = {_protocol_of(u, protocol) for u in urls}
        if len(protocols) != 1:
            raise ClientError(f"replicas mix protocols: {urls}")
        self.protocol = protocols.pop()
        self.urls = [u if "://" in u else f"{self.protocol}://{u}" for u in urls]
        self.deadline, self.per_try_timeout = deadline, per_try_timeout
        self.retry = retry or RetryPolicy()
        self.breaker_policy = breaker or BreakerPolicy()
        self.hedge = hedge
        self.rng = random.Random(seed)
        self.breakers: dict[str, CircuitBreaker] = {}
        self.latency = LatencyWindow()
        self._session = None
        self.balancer = Balancer([Replica(u) for u in self.urls], ejection or EjectionPolicy(), self.rng)

    def _transport(self, replica: Replica):
        if replica.transport is None:
            if self.protocol == "grpc":
                replica.transport = GrpcTransport(replica.url)
            else:
                import aiohttp

                if self._session is None:
                    self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
                replica.transport = HttpTransport(replica.url, self._session)
        return replica.transport

    def breaker(self, endpoint: str) -> CircuitBreaker:
        if endpoint not in self.breakers:
            self.breakers[endpoint] = CircuitBreaker(self.breaker_policy)
        return self.breakers[endpoint]

    # -----------------------------------------------------------------------------------------

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None = None,
                    outputs: Sequence[str] | None = None, headers: Mapping[str, str] | None = None,
                    deadline: float | None = None) -> InferResult:
        """Run `model` on `inputs` (name -> array). Retries, hedges and fails over within `deadline`
        seconds (default: the client's); every try carries the same Idempotency-Key."""
        breaker = self.breaker(model)
        if not breaker.allow():
            raise CircuitOpen(f"circuit breaker of {model!r} is open ({breaker.retry_after():.2g} s of cool-down left)",
                              retry_after=breaker.retry_after())
        try:
            result = await self._call(model, inputs, version, outputs, dict(headers or {}),
                                      self.deadline if deadline is None else deadline)
        except ServerError as e:
            breaker.record(e.status < 500 and e.status not in RETRYABLE_STATUS)
            raise
        except ClientError:
            breaker.record(False)
            raise
        except BaseException:
            breaker.release()  # cancelled by the caller: no verdict on the endpoint
            raise
        breaker.record(True)
        return result

    async def _try(self, replica: Replica, model, inputs, version, outputs, key, headers, end) -> Answer:
        left = end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"deadline passed before a try on {replica.url}", url=replica.url)
        try_timeout = min(left, self.per_try_timeout) if self.per_try_timeout else left
        replica.outstanding += 1
        start = time.monotonic()
        try:
            answer = await self._transport(replica).infer(model, inputs, version, outputs, key,
                                                          max(1, int(left * 1e6)), headers, try_timeout)
        except ServerError as e:
            if e.status == 404 and (model in replica.served or not await self._replica_ready(replica, end)):
                # A replica that answered this model before, or one still loading its models (just
                # restarted, shutting down, reloading), does not know the model for a moment:
                # transient, so it is retried like a 503. Any other 404 is final (a wrong name must
                # not wait out the deadline).
                e = ServerError(503, f"not serving it now ({e.server_message})", url=e.url, code=e.code)
            self.balancer.record(replica, e.status not in REPLICA_FAILURE_STATUS)
            if e.retry_after:
                replica.not_before = time.monotonic() + e.retry_after
            raise e from None
        except ConnectionFailed:
            self.balancer.record(replica, False)
            raise
        finally:
            replica.outstanding -= 1
        self.balancer.record(replica, True)
        self.latency.add(time.monotonic() - start)
        replica.served.add(model)
        return answer

    async def _replica_ready(self, replica: Replica, end: float) -> bool:
        try:
            return await self._transport(replica).ready(max(0.05, min(1.0, end - time.monotonic())))
        except (ConnectionFailed, ServerError):
            return False

    async def _attempt(self, model, inputs, version, outputs, key, headers, end, tried: list[Replica]):
        """One attempt: a try on one replica, plus hedges on others if it is slow. Returns
        (answer, replica, tries sent) or raises the last try's error."""
        first = self.balancer.pick(tried)
        if first is None:
            raise NoReplicaAvailable(f"every replica is ejected: {', '.join(self.urls)}")
        tried.append(first)
        tasks = {asyncio.ensure_future(self._try(first, model, inputs, version, outputs, key, headers, end)): first}
        hedges = 0
        last: BaseException | None = None
        try:
            while tasks:
                delay = None
                if self.hedge is not None and hedges < self.hedge.max_hedges:
                    delay = self.latency.hedge_delay(self.hedge)
                timeout = max(0.0, min(delay, end - time.monotonic())) if delay is not None else None
                done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    hedges += 1  # this hedge slot is used even when no other replica is free
                    other = self.balancer.pick(list(tasks.values()))
                    if other is not None and other not in tasks.values():
                        tried.append(other)
                        tasks[asyncio.ensure_future(self._try(other, model, inputs, version, outputs, key,
                                                              headers, end))] = other
                    continue
                for task in done:
                    replica = tasks.pop(task)
                    if task.exception() is None:
                        return task.result(), replica, 1 + hedges
                    last = task.exception()
                    if isinstance(last, ServerError) and last.status not in RETRYABLE_STATUS:
                        raise last  # a definite answer (a 4xx, a model failure): hedges cannot change it
            raise last
        finally:
            # The losers are cancelled, not awaited: a cancelled HTTP request closes its connection,
            # a gRPC one sends RST_STREAM; the answer must not wait on either.
            for task in tasks:
                task.cancel()
                task.add_done_callback(_consume)

    async def _call(self, model, inputs, version, outputs, headers, deadline) -> InferResult:
        end = time.monotonic() + deadline
        given = [k for k in headers if k.lower() == "idempotency-key"]
        key = (headers.pop(given[0]) if given else None) or uuid.uuid4().hex
        for k in given[1:]:
            headers.pop(k)
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        tried: list[Replica] = []
        attempts = sent = 0
        while True:
            attempts += 1
            try:
                answer, replica, n = await self._attempt(model, inputs, version, outputs, key, headers, end, tried)
                sent += n
                break
            except DeadlineExceeded as e:
                raise DeadlineExceeded(f"{model}: deadline of {deadline:g} s passed after {attempts - 1} tries "
                                       f"(last: {e.last or e})", url=e.url, last=e.last) from None
            except (ServerError, ConnectionFailed, NoReplicaAvailable) as e:
                retryable = isinstance(e, (ConnectionFailed, NoReplicaAvailable)) or e.status in RETRYABLE_STATUS
                sent += 1
                if not retryable:
                    raise
                if self.retry.max_attempts is not None and attempts >= self.retry.max_attempts:
                    raise
                # Retry-After holds for the replica that said it: another one is tried without waiting.
                pause = self.retry.backoff(attempts, self.rng, self.balancer.pushback_s() or None)
                if time.monotonic() + pause >= end:
                    raise DeadlineExceeded(f"{model}: deadline of {deadline:g} s passed after {attempts} tries "
                                           f"(last: {e})", url=e.url, last=e) from e
                await asyncio.sleep(pause)
                if len(tried) >= len(self.urls):
                    tried.clear()  # every replica had a go: start over, the balancer picks again
        p = answer.parameters
        h = answer.headers
        return InferResult(
            outputs=answer.outputs, model=answer.model, version=answer.version,
            target=h.get("serve-kit-target") or p.get("serve_kit_target"),
            fallback=_bool(h.get("serve-kit-fallback")) or _bool(p.get("serve_kit_fallback")),
            cache_hit=h.get("serve-kit-cache") == "hit" or _bool(p.get("serve_kit_cache_hit")),
            request_id=key, attempts=sent, replica=replica.url, parameters=dict(p))

    # -----------------------------------------------------------------------------------------

    async def _any(self, fn, timeout: float):
        last: BaseException | None = None
        for replica in self.balancer.available() or self.balancer.replicas:
            try:
                return await fn(self._transport(replica), timeout)
            except ClientError as e:
                last = e
        raise last

    async def ready(self, timeout: float = 5.0) -> bool:
        """True when at least one replica answers ready."""
        for replica in self.balancer.replicas:
            try:
                if await self._transport(replica).ready(timeout):
                    return True
            except ClientError:
                continue  # down, or answering errors: not ready
        return False

    async def metadata(self, model: str, timeout: float = 10.0) -> dict:
        """The model's OIP metadata (name, versions, platform, inputs, outputs) from a live replica."""
        return await self._any(lambda t, s: t.metadata(model, s), timeout)

    async def close(self) -> None:
        for replica in self.balancer.replicas:
            if replica.transport is not None:
                await replica.transport.close()
                replica.transport = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Client:
    """The synchronous client: the same options and API as AsyncClient, run on a private event
    loop thread. Safe to call from several threads at once."""

    def __init__(self, urls: str | Sequence[str], **options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="serve-kit-client", daemon=True)
        self._thread.start()
        self._async = self._run(self._make(urls, options))

    @staticmethod
    async def _make(urls, options) -> AsyncClient:
        return AsyncClient(urls, **options)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def aio(self) -> AsyncClient:
        """The AsyncClient underneath (its breakers, balancer and latency window)."""
        return self._async

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None = None,
              outputs: Sequence[str] | None = None, headers: Mapping[str, str] | None = None,
              deadline: float | None = None) -> InferResult:
        return self._run(self._async.infer(model, inputs, version, outputs, headers, deadline))

    def ready(self, timeout: float = 5.0) -> bool:
        return self._run(self._async.ready(timeout))

    def metadata(self, model: str, timeout: float = 10.0) -> dict:
        return self._run(self._async.metadata(model, timeout))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
