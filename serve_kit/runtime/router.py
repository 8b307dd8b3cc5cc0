"""The router: applies an endpoint's route (routing.py) to the model manager's schedulers.

For a request to an endpoint with a route (and no version in its URL), the router picks the target
(split, sticky or random), submits to its scheduler, and chains the answer: on a failure that a
fallback can cure (backend error, timeout, overload, an open breaker, a target not serving) the
next model of the fallback chain gets the request; on success a share is mirrored to the shadow
and, for split traffic a candidate answered, to the champion, and the pair's outputs are compared
off the request path (a comparison thread) with serve_kit/compare.py, the measures optimize's
gates use. Everything runs on the event loop except the comparison; the counters it keeps are
rendered by metrics.py.

Routes change atomically (one assignment of an immutable routing.Route); a request in flight keeps
the scheduler it was submitted to, so a switch never fails one.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..compare import compare_outputs
from ..config import RouteSpec
from ..errors import ServeKitError
from .batcher import LATENCY_BUCKETS_S, LogGate, SchedulerClosed
from .resilience import BreakerOpen
from .routing import Ref, Route, incompatibility
from .types import BadRequest, InferError, InferRequest, Internal, NotFound, Timeout, Unavailable

if TYPE_CHECKING:
    from .models import ModelManager

log = logging.getLogger("serve_kit.runtime")

COMPARE_QUEUE = 4096
"""Output pairs waiting for the comparison thread; beyond it a pair is dropped (counted as shed)."""
MIRROR_WINDOW_S = 0.01
"""How long mirrors (shadow, compare) are gathered into one batched request."""
COMPARE_EVERY_S = 0.25
"""How long the comparison thread gathers pairs before comparing them in one go."""


class Conflict(InferError):
    """A compare-and-set change of a route whose generation moved on (409)."""

    status = 409
    grpc_code = "ABORTED"


class TargetNotServing(Unavailable):
    """A route's target has no version serving (unloaded, failed to load, being replaced)."""


class Answering:
    """Who answers a routed request: filled in when the answer arrives (the frontends read it
    like a scheduler: `model`, `version`, `batching`)."""

    __slots__ = ("endpoint", "model", "version", "batching", "fallback", "routed")

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.model = endpoint
        self.version = 0
        self.batching = True
        self.fallback = False
        self.routed = True


def _code(e: BaseException | None) -> str:
    if e is None:
        return "200"
    return str(getattr(e, "status", 500))


def fallback_reason(e: BaseException) -> str | None:
    """Why a fallback may answer instead (a metric label), or None when the failure is the
    request's own (a 4xx: another model would refuse it too)."""
    if isinstance(e, BreakerOpen):
        return "breaker_open"
    if isinstance(e, (NotFound, SchedulerClosed, TargetNotServing)):
        return "not_ready"
    if isinstance(e, Timeout):
        return "timeout"
    if isinstance(e, Unavailable):
        return "overloaded"
    if isinstance(e, Internal) or not isinstance(e, InferError):
        return "backend_error"
    return None


@dataclass
class _Hist:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds


@dataclass
class _Summary:
    count: int = 0
    total: float = 0.0


@dataclass
class RouteCounters:
    """What the router counts (rendered by metrics.py). Keys are label tuples."""

    requests: dict[tuple[str, str, str, str, str], int] = field(default_factory=dict)
    """(endpoint, model, version, role, code) -> requests."""
    durations: dict[tuple[str, str, str, str], _Hist] = field(default_factory=dict)
    """(endpoint, model, version, role) -> route-to-answer seconds."""
    fallbacks: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(endpoint, model, version, reason) -> fallback answers."""
    dropped: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(endpoint, model, version, reason) -> mirrored requests dropped."""
    agreement: dict[tuple[str, str, str, str], _Summary] = field(default_factory=dict)
    cosine: dict[tuple[str, str, str, str], _Summary] = field(default_factory=dict)
    max_abs_error: dict[tuple[str, str, str, str], _Summary] = field(default_factory=dict)
    replays: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards the comparison summaries (written by the comparison thread)."""

    def count(self, endpoint: str, model: str, version: int | str, role: str, error: BaseException | None,
              seconds: float) -> None:
        v = str(version)
        key = (endpoint, model, v, role, _code(error))
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.durations.get((endpoint, model, v, role))
        if hist is None:
            hist = self.durations[(endpoint, model, v, role)] = _Hist()
        hist.add(seconds)

    def bump(self, table: dict, key: tuple) -> None:
        table[key] = table.get(key, 0) + 1


class Router:
    """Routes of endpoints: static ones (config.yaml `route:`, the repository's routes.yaml) and
    those set through the management API, which win until deleted."""

    def __init__(self, manager: "ModelManager"):
        self.manager = manager
        self.routes: dict[str, Route] = {}
        """Active routes by endpoint (read on every request; replaced, never mutated)."""
        self._static: dict[str, tuple[RouteSpec, str]] = {}
        self._generation: dict[str, int] = {}
        self._configs: dict[str, object] = {}
        self.counters = RouteCounters()
        self._shadow_inflight: dict[str, int] = {}
        self._mirrors: dict[tuple, list] = {}
        """Mirrors gathered per (endpoint, target, role, candidate) until their batch is sent."""
        self._comparer: _Comparer | None = None

    # ------------------------------------------------------------------------------------------
    # Route table

    def load_static(self, model: str | None = None) -> None:
        """(Re)read static routes: all of them, or only `model`'s config.yaml route after a reload.
        A route that does not validate is logged and not applied (the endpoint keeps its default)."""
        found: dict[str, tuple[RouteSpec, str]] = {}
        if model is None:
            try:
                routes_file = self.manager.repository.routes()
            except ServeKitError as e:  # a broken routes.yaml must not stop serving the models
                log.error("routes.yaml not applied: %s", e.render())
                routes_file = None
            for spec in routes_file.routes if routes_file else []:
                found[spec.endpoint] = (spec, "routes.yaml")
        for name, m in list(self.manager._models.items()):
            if model is not None and name != model:
                continue
            if m.config is not None and m.config.route is not None and name not in found:
                found[name] = (m.config.route, "config.yaml")
        if model is not None and model not in found and self._static.get(model, (None, ""))[1] == "config.yaml":
            del self._static[model]
            if self.routes.get(model) is not None and self.routes[model].source == "config.yaml":
                self._install(model, None, "default")
        for endpoint, (spec, source) in found.items():
            self._static[endpoint] = (spec, source)
            current = self.routes.get(endpoint)
            if current is not None and current.source == "api":
                continue  # the API's route wins until it is deleted
            try:
                self.set(endpoint, spec, source=source)
            except InferError as e:
                log.error("route %s (%s) not applied: %s", endpoint, source, e.message)

    def get(self, endpoint: str) -> Route:
        route = self.routes.get(endpoint)
        if route is not None:
            return route
        if self._served(endpoint):
            return Route.default(endpoint, generation=self._generation.get(endpoint, 0))
        raise NotFound(f"no route and no model called {endpoint!r}; endpoints: "
                       f"{', '.join(self.endpoints()) or 'none'}")

    def _served(self, model: str) -> bool:
        """A model with a version loaded (ready or not: an open breaker does not remove a route)."""
        m = self.manager._models.get(model)
        return m is not None and bool(m.routes)

    def endpoints(self) -> list[str]:
        served = [n for n, m in self.manager._models.items() if m.routes]
        return sorted(set(served) | set(self.routes))

    def all(self) -> list[Route]:
        return [self.get(e) for e in self.endpoints()]

    def set(self, endpoint: str, spec: RouteSpec, *, source: str = "api", if_generation: int | None = None) -> Route:
        """Validate and install a route in one step; on any problem raise BadRequest (or Conflict)
        and change nothing."""
        if spec.endpoint is not None and spec.endpoint != endpoint:
            raise BadRequest(f"the route names endpoint {spec.endpoint!r} but is set on {endpoint!r}")
        current = self._generation.get(endpoint, 0)
        if if_generation is not None and if_generation != current:
            raise Conflict(f"route {endpoint!r} is at generation {current}, not {if_generation}: someone else "
                           "changed it; read it again (GET /v2/routes/{endpoint}) and retry")
        return self._install(endpoint, spec, source, self._check(endpoint, spec))

    def clear(self, endpoint: str) -> Route:
        """Drop the API's route: back to the static route, or the default one."""
        if endpoint not in self.routes and not self._served(endpoint):
            raise NotFound(f"no route for endpoint {endpoint!r}")
        static = self._static.get(endpoint)
        if static is not None:
            try:
                return self._install(endpoint, static[0], static[1], self._check(endpoint, static[0]))
            except InferError as e:
                log.error("route %s: the %s route is not valid now (%s); using the default", endpoint,
                          static[1], e.message)
        return self._install(endpoint, None, "default")

    def _install(self, endpoint: str, spec: RouteSpec | None, source: str, config=None) -> Route:
        """Make `spec` the endpoint's route (None: its default); `config` is the signature
        `_check` found for it (requests to the endpoint are decoded with it)."""
        gen = self._generation.get(endpoint, 0) + 1
        self._generation[endpoint] = gen
        if spec is None:
            self.routes.pop(endpoint, None)
            route = self.get(endpoint) if self._served(endpoint) else None
            log.info("route %s: generation %d: default (latest version)", endpoint, gen)
            return route
        route = Route.build(endpoint, spec.model_copy(update={"endpoint": endpoint}), generation=gen, source=source)
        self._configs[endpoint] = config
        self.routes[endpoint] = route  # the switch: every request from here on sees the new route
        log.info("route %s: generation %d (%s): %s", endpoint, gen, source, route.describe())
        return route

    def _check(self, endpoint: str, spec: RouteSpec):
        """Every target, the shadow and the fallbacks serve now and fit the endpoint's signature;
        returns the endpoint's config (the signature requests are decoded with)."""
        refs = [("target", Ref(t.model, t.version)) for t in spec.targets if t.weight > 0]
        refs += [("target", Ref(t.model, t.version)) for t in spec.targets if t.weight == 0]
        if spec.shadow:
            refs.append(("shadow", Ref(spec.shadow.model, spec.shadow.version)))
        refs += [("fallback", Ref(f.model, f.version)) for f in spec.fallback]
        base = self._endpoint_config(endpoint, spec)
        for role, ref in refs:
            try:
                self.manager.resolve(ref.model, ref.version)
            except InferError as e:
                raise BadRequest(f"route {endpoint!r}: {role} {ref} is not ready: {e.message}. Hint: load it "
                                 "first (config.yaml version_policy must serve both versions, e.g. "
                                 "`latest: 2` or `specific: [1, 2]`)") from None
            why = incompatibility(base, self.manager.config(ref.model))
            if why:
                raise BadRequest(f"route {endpoint!r}: {role} {ref} has an incompatible signature: {why}")
        if spec.shadow and any(Ref(t.model, t.version) == Ref(spec.shadow.model, spec.shadow.version)
                               and t.weight > 0 for t in spec.targets):
            raise BadRequest(f"route {endpoint!r}: the shadow {Ref(spec.shadow.model, spec.shadow.version)} is "
                             "also a target with weight > 0; a shadow is compared with the answer, not part of it")
        return base

    def _endpoint_config(self, endpoint: str, spec: RouteSpec):
        """The signature requests to the endpoint are decoded with: its own model's config when it
        is a model serving, else the first target's."""
        for name in (endpoint, spec.targets[0].model):
            m = self.manager._models.get(name)
            if m is not None and m.routes and m.config is not None:
                return m.config
        raise BadRequest(f"route {endpoint!r}: target {spec.targets[0].label()} is not ready: "
                         f"{self.manager._unknown(spec.targets[0].model)}")

    def endpoint_config(self, endpoint: str):
        """The config requests to a routed endpoint are decoded with, as of the route's last change
        (its targets were checked against it then)."""
        return self._configs.get(endpoint) if endpoint in self.routes else None

    # ------------------------------------------------------------------------------------------
    # Requests

    def infer_nowait(self, req: InferRequest, route: Route) -> tuple[Answering, asyncio.Future]:
        loop = asyncio.get_running_loop()
        i = route.pick(route.key_of(req.headers, req.parameters))
        ans = Answering(route.endpoint)
        out = loop.create_future()
        t0 = time.perf_counter()
        try:
            sched, fut = self._submit(req, route.targets[i])
        except InferError as e:
            # Refused at once (queue full, open breaker, not serving): a fallback may take it; else
            # the frontend answers the refusal now.
            ref = route.targets[i]
            self.counters.count(route.endpoint, ref.model, _version_label(ref), "primary", e, 0.0)
            self._fall_back(req, route, i, 0, e, ans, out, sync=True)
            return ans, out
        ans.model, ans.version, ans.batching = sched.model, sched.version, sched.batching
        fut.add_done_callback(lambda f: self._done(f, req, route, i, -1, sched, ans, out, t0))
        return ans, out

    def _submit(self, req: InferRequest, ref: Ref):
        try:
            sched = self.manager.resolve(ref.model, ref.version)
        except (NotFound, Unavailable) as e:  # unloaded, or failed to load
            raise TargetNotServing(f"endpoint target {ref} is not serving: {e.message}") from None
        self.manager.check_request(ref.model, req)
        return sched, sched.submit_nowait(req.inputs, req.priority, req.timeout_us)

    def _done(self, fut: asyncio.Future, req: InferRequest, route: Route, index: int, fb: int, sched,
              ans: Answering, out: asyncio.Future, t0: float) -> None:
        err = _exception(fut)
        role = "primary" if fb < 0 else "fallback"
        self.counters.count(route.endpoint, sched.model, sched.version, role, err, time.perf_counter() - t0)
        if out.done():
            return
        if err is None:
            outputs = fut.result()
            ans.model, ans.version, ans.batching, ans.fallback = sched.model, sched.version, sched.batching, fb >= 0
            out.set_result(outputs)
            if fb < 0:
                self._after(req, route, index, sched, outputs)
            return
        self._fall_back(req, route, index, fb + 1, err, ans, out, sync=False)

    def _fall_back(self, req: InferRequest, route: Route, index: int, nxt: int, err: BaseException,
                   ans: Answering, out: asyncio.Future, sync: bool) -> None:
        """Start the first fallback from `nxt` on that takes the request; when none can (or the
        failure is the request's own), the error is the answer: raised when `sync`, else set."""
        reason = fallback_reason(err)
        while reason is not None and nxt < len(route.fallback):
            ref = route.fallback[nxt]
            t1 = time.perf_counter()
            try:
                fsched, ffut = self._submit(req, ref)
            except InferError as e:
                self.counters.count(route.endpoint, ref.model, _version_label(ref), "fallback", e, 0.0)
                reason, err, nxt = fallback_reason(e), e, nxt + 1
                continue
            self.counters.bump(self.counters.fallbacks, (route.endpoint, fsched.model, str(fsched.version), reason))
            ans.model, ans.version, ans.batching = fsched.model, fsched.version, fsched.batching
            ffut.add_done_callback(lambda f, s=fsched, k=nxt: self._done(f, req, route, index, k, s, ans, out, t1))
            return
        if sync:
            raise err
        out.set_exception(err)

    def _after(self, req: InferRequest, route: Route, index: int, sched, outputs: dict) -> None:
        """A primary answered: mirror to the shadow, or to the champion for split traffic."""
        if route.shadow is not None and route.mirror():
            self._mirror(req, route, route.shadow, "shadow", outputs, None)
        if index > 0 and route.spec.compare > 0 and route.compares():
            self._mirror(req, route, route.targets[0], "compare", outputs, (sched.model, sched.version))

    def _mirror(self, req: InferRequest, route: Route, ref: Ref, role: str, outputs: dict,
                candidate: tuple[str, int] | None) -> None:
        """Run `req` on `ref` too, off the client's path, and compare the pair. `candidate` None: `ref`
        is the shadow, compared with the primary's `outputs`; else `ref` is the champion, the
        reference for the candidate's `outputs`.

        Mirrors are gathered for MIRROR_WINDOW_S and sent as one batched request (up to the
        target's max_batch_size rows): a mirror per request would wake the target's model thread
        and the event loop once per request, which on a small CPU costs the primary more than
        the shadow's compute does."""
        endpoint = route.endpoint
        bound = route.spec.shadow.max_inflight if route.spec.shadow else 32
        label = (ref.model, _version_label(ref)) if candidate is None \
            else (candidate[0], str(candidate[1]))
        if self._shadow_inflight.get(endpoint, 0) >= bound:
            self.counters.bump(self.counters.dropped, (endpoint, *label, "shed"))
            return
        self._shadow_inflight[endpoint] = self._shadow_inflight.get(endpoint, 0) + 1
        key = (endpoint, ref, role, candidate)
        buf = self._mirrors.get(key)
        if buf is None:
            buf = self._mirrors[key] = []
            asyncio.get_running_loop().call_later(MIRROR_WINDOW_S, self._flush_mirrors, key, buf)
        buf.append((req.inputs, outputs))
        if len(buf) >= bound:
            self._flush_mirrors(key, buf)

    def _flush_mirrors(self, key: tuple, buf: list) -> None:
        if self._mirrors.get(key) is not buf:
            return  # flushed already (full)
        del self._mirrors[key]
        endpoint, ref, role, candidate = key
        label = (ref.model, _version_label(ref)) if candidate is None \
            else (candidate[0], str(candidate[1]))
        try:
            sched = self.manager.resolve(ref.model, ref.version)
        except InferError:
            self._shadow_inflight[endpoint] -= len(buf)
            for _ in buf:
                self.counters.bump(self.counters.dropped, (endpoint, *label, "shed"))
            return
        limit = sched.config.max_batch_size if sched.batching else 1
        groups: dict[tuple, list] = {}
        for inputs, outputs in buf:
            shape = (tuple((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()),
                     tuple((k, np.shape(v)[1:]) for k, v in outputs.items()))
            groups.setdefault(shape, []).append((inputs, outputs))
        for items in groups.values():
            chunk: list = []
            rows = 0
            for item in items:
                n = len(next(iter(item[0].values())))
                if chunk and rows + n > limit:
                    self._send_mirrors(sched, endpoint, role, candidate, label, chunk)
                    chunk, rows = [], 0
                chunk.append(item)
                rows += n
            if chunk:
                self._send_mirrors(sched, endpoint, role, candidate, label, chunk)

    def _send_mirrors(self, sched, endpoint: str, role: str, candidate, label, items: list) -> None:
        n = len(items)
        if n == 1:
            inputs, reference = items[0]
        else:
            inputs = {k: np.concatenate([i[k] for i, _ in items]) for k in items[0][0]}
            reference = {k: np.concatenate([o[k] for _, o in items]) for k in items[0][1]}
        try:
            fut = sched.submit_nowait(inputs, 0, 0)
        except InferError:
            self._shadow_inflight[endpoint] -= n
            for _ in items:
                self.counters.bump(self.counters.dropped, (endpoint, *label, "shed"))
            return
        t0 = time.perf_counter()

        def done(f: asyncio.Future) -> None:
            self._shadow_inflight[endpoint] -= n
            err = _exception(f)
            seconds = time.perf_counter() - t0
            for _ in range(n):
                self.counters.count(endpoint, sched.model, sched.version, role, err, seconds)
            labels = (endpoint, sched.model, str(sched.version), role) if candidate is None \
                else (endpoint, label[0], label[1], role)
            if err is not None:
                for _ in range(n):
                    self.counters.bump(self.counters.dropped, (*labels[:3], "error"))
                return
            if candidate is None:
                self.comparer.add(labels, reference, f.result())
            else:
                self.comparer.add(labels, f.result(), reference)

        fut.add_done_callback(done)

    @property
    def comparer(self) -> "_Comparer":
        if self._comparer is None:
            self._comparer = _Comparer(self.counters)
        return self._comparer

    def close(self) -> None:
        if self._comparer is not None:
            self._comparer.stop()


def _version_label(ref: Ref) -> str:
    return str(ref.version) if ref.version is not None else "latest"


def _exception(f: asyncio.Future) -> BaseException | None:
    if f.cancelled():
        return Unavailable("the request was withdrawn (server shutting down)")
    return f.exception()


class _Comparer:
    """Compares output pairs off the event loop, batched: one compare_outputs call per group of
    pairs with the same labels and shapes (the per-pair cost would be paid on the loop otherwise)."""

    def __init__(self, counters: RouteCounters):
        self.counters = counters
        self._log = LogGate()
        self._queue: queue.Queue = queue.Queue(COMPARE_QUEUE)
        self._thread = threading.Thread(target=self._run, name="serve-kit-compare", daemon=True)
        self._thread.start()

    def add(self, labels: tuple[str, str, str, str], reference: dict, got: dict) -> None:
        try:
            self._queue.put_nowait((labels, reference, got))
        except queue.Full:
            endpoint, model, version, _ = labels
            self.counters.bump(self.counters.dropped, (endpoint, model, version, "shed"))

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        # Gather for COMPARE_EVERY_S after the first pair, then compare all of them at once: one
        # compare_outputs call per group and period, not per pair (each call holds the GIL that
        # the event loop needs; per pair, a 100 % shadow at 1,000 requests/s would cost the
        # primary's latency about as much as the shadow's own execution).
        while True:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            time.sleep(COMPARE_EVERY_S)
            while len(items) < COMPARE_QUEUE:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._flush(items)
                    return
                items.append(nxt)
            self._flush(items)

    def _flush(self, items: list) -> None:
        groups: dict[tuple, list] = {}
        for labels, ref, got in items:
            shape_key = tuple(sorted((k, np.shape(v)[1:]) for k, v in ref.items()))
            groups.setdefault((labels, shape_key), []).append((ref, got))
        for (labels, _), pairs in groups.items():
            try:
                figures = measure_pairs(pairs)
            except Exception as e:  # noqa: BLE001 - outputs that cannot be compared: counted, not fatal
                if self._log.allow() is not None:
                    log.warning("shadow comparison of %s failed: %s: %s", labels, type(e).__name__, e)
                endpoint, model, version, _ = labels
                self.counters.bump(self.counters.dropped, (endpoint, model, version, "error"))
                continue
            with self.counters.lock:
                for table, (value, n) in zip((self.counters.agreement, self.counters.cosine,
                                              self.counters.max_abs_error), figures):
                    s = table.get(labels)
                    if s is None:
                        s = table[labels] = _Summary()
                    s.count += n
                    s.total += value * n


def measure_pairs(pairs: list[tuple[dict, dict]]) -> tuple[tuple[float, int], ...]:
    """(agreement, rows), (cosine, rows), (max abs error, rows) of the candidate outputs against the
    references over the rows of `pairs`; the worst output decides each.

    Agreement is the share of rows whose decision matches (argmax for class scores, the threshold
    for probabilities, equality for integers: compare.py's `flip_rate`), else the mean cosine, else
    (a one-element regression output) 1 - relative L2 error."""
    names = [k for k in pairs[0][0] if all(k in g for _, g in pairs)]
    ref = {k: np.concatenate([np.asarray(r[k]) for r, _ in pairs], axis=0) for k in names}
    got = {k: np.concatenate([np.asarray(g[k]) for _, g in pairs], axis=0) for k in names}
    rows = len(next(iter(ref.values()))) if ref else 0
    measures = compare_outputs(ref, got)
    agreement = cosine = 1.0
    max_abs = 0.0
    for m in measures.values():
        if m.get("flip_rate") is not None:
            a = 1.0 - m["flip_rate"]
        elif m.get("cosine_mean") is not None:
            a = m["cosine_mean"]
        else:
            a = 1.0 - min(1.0, m["rel_l2"] if m.get("rel_l2") is not None else 1.0)
        agreement = min(agreement, a)
        c = m.get("cosine_mean")
        if c is None:
            c = m.get("cosine_across")
        if c is not None:
            cosine = min(cosine, c)
        max_abs = max(max_abs, float(m["max_abs_error"]))
    return (agreement, rows), (cosine, rows), (max_abs, rows)

