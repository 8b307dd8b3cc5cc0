"""The router: which models and versions are loaded, and which scheduler a request goes to.

`ModelManager` loads each model's versions from a repository (per `version_policy`), verifies every
version's sha256s against its manifest before loading it, loads `instance_group.count` backend
instances per version, warms each one up (`warmup`) and only then routes requests to it.

Reloading a model builds the complete new set of versions first, swaps the routing entry in one
assignment on the event loop, and then drains the old schedulers: requests already accepted finish
on the old version, new ones go to the new version, none fails. A reload that fails leaves the old
versions serving and raises with the reason.

Future routing policies (traffic split, shadow copies, fallbacks, ensembles) belong in `resolve`;
the schedulers and backends below it do not change for them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ModelLoadError, RepositoryError, ServeKitError
from ..repository import Limits, Repository, check_model_name, is_model_name, redact_paths
from . import resilience
from .backends import Backend, load_backend
from .batcher import DynamicBatcher, SchedulerClosed, SchedulerStats
from .router import Answering, Router
from .types import BadRequest, InferRequest, InferResponse, NotFound, Unavailable

log = logging.getLogger("serve_kit.runtime")


class ModelLoadFailed(ModelLoadError, BadRequest):
    """A load or reload that failed, with the reason: a ServeKitError for the CLI and a 400 for
    the frontends (Triton answers a failed load request with 400)."""

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class _Version:
    version: int
    scheduler: DynamicBatcher | None
    state: str
    reason: str = ""


@dataclass
class _Model:
    """One model's routing entry. Replaced whole (never mutated) when the model is reloaded."""

    name: str
    config: ModelConfig | None
    versions: dict[int, _Version] = field(default_factory=dict)
    reason: str = ""
    """Why the model (as a whole) is unavailable: bad config, no versions, unloaded."""
    unloaded: bool = False
    required: bool = True
    """Counts for readiness: loaded at start, or loaded successfully since. A failed load() of a
    model that was not serving is shown in the index but does not make the server unready."""

    def __post_init__(self) -> None:
        self.routes = {v: e.scheduler for v, e in self.versions.items() if e.state == READY and e.scheduler}
        self.latest = max(self.routes) if self.routes else None
        self.check = _InputCheck(self.config) if self.config else None
        self.output_names = {o.name for o in self.config.outputs} if self.config else set()

    @property
    def complete(self) -> bool:
        """Every version the policy asks for is serving."""
        return not self.reason and bool(self.versions) and all(v.state == READY for v in self.versions.values())

    @property
    def failures(self) -> list[str]:
        out = [self.reason] if self.reason else []
        out += [f"version {v.version}: {v.reason}" for v in self.versions.values() if v.state != READY]
        return out

    def schedulers(self) -> list[DynamicBatcher]:
        return [v.scheduler for v in self.versions.values() if v.scheduler is not None]


class _InputCheck:
    """Checks request inputs against config.yaml (names, dtypes, ranks, fixed dims) in a few
    microseconds, so a bad request is a 400 for it alone and never a failed batch for others."""

    def __init__(self, config: ModelConfig):
        self.names = [t.name for t in config.inputs]
        self.name_set = set(self.names)
        self.specs = []
        for t in config.inputs:
            # With max_batch_size > 0 the configured shape includes the batch dim (-1) already.
            fixed = tuple((i, d) for i, d in enumerate(t.shape) if d != -1)
            self.specs.append((t.name, t.dtype, len(t.shape), fixed, t.describe()))

    def __call__(self, model: str, inputs: dict[str, Any]) -> None:
        if len(inputs) != len(self.names) or inputs.keys() != self.name_set:
            missing = [n for n in self.names if n not in inputs]
            extra = sorted(set(inputs) - self.name_set)
            raise BadRequest(f"model {model!r} expects inputs {self.names}: missing {missing}, unexpected {extra}")
        for name, dtype, ndim, fixed, desc in self.specs:
            a = inputs[name]
            if not isinstance(a, np.ndarray):
                raise BadRequest(f"input {name!r} of model {model!r} is not an array")
            if a.dtype != dtype:
                raise BadRequest(f"input {name!r} of model {model!r} has dtype {a.dtype}, expected {desc}")
            shape = a.shape
            if len(shape) != ndim or any(shape[i] != d for i, d in fixed):
                raise BadRequest(f"input {name!r} of model {model!r} has shape {list(shape)}, expected {desc}")


def default_intra_op_threads(cores: int, instances: int) -> int:
    """Backend threads per instance: the cores shared by the instances, less one core kept for
    the event loop (frontend and scheduler), which needs a whole core at high request rates.

    Measured on 2 cores, 512x512 MLP (benchmarks/runtime_inprocess.py), 1 thread vs 2: 66-104k
    vs 47-53k req/s at concurrency 16, p99 0.08-0.15 ms vs 2.2-4.9 ms at concurrency 1, because
    ONNX Runtime's spinning pool thread took the core the event loop needed."""
    return max(1, (cores - 1) // max(1, instances))


def backend_options(config: ModelConfig, cores: int) -> dict[str, Any]:
    """The options the server loads a version's backend with (config.yaml `parameters`, and the
    intra-op thread count from the cores and instances); `serve-kit bench` uses the same."""
    opts: dict[str, Any] = {}
    for k, v in config.parameters.items():
        # config.yaml parameters are strings (Triton's convention); backends expect flags as bools.
        opts[k] = {"true": True, "false": False}.get(v.lower(), v) if isinstance(v, str) else v
    # Instances running at once must not oversubscribe the cores (each ORT session starts its own
    # intra-op pool, and a spinning pool steals the CPU the other instances need).
    opts.setdefault("intra_op_threads", default_intra_op_threads(cores, config.instance_group.count))
    # TorchScript forward() arguments are positional: map them to config.yaml's input order.
    opts.setdefault("input_names", [t.name for t in config.inputs])
    return opts


def _warmup_inputs(config: ModelConfig, repository: Repository, info) -> list[dict[str, np.ndarray]]:
    """The inputs to run on each instance before it is ready (config.warmup). Only the sample rows
    warm-up runs are read (a batching model: the largest warm-up batch), within the repository's
    samples limit, never unpickled."""
    samples: dict[str, np.ndarray] | None = None
    batching = config.max_batch_size > 0
    sizes = sorted({min(max(b, 1), config.max_batch_size) for b in config.warmup.batch_sizes}) if batching \
        else [1][:len(config.warmup.batch_sizes)]  # `batch_sizes: []` turns warm-up off
    if config.warmup.source == "samples" and sizes:
        # A non-batching model's samples are one whole request (its full shape): read them whole.
        stored = repository.read_samples(info, max(sizes) if batching else None, inputs_only=True)
        if stored is not None:
            got = {t.name: stored[0][t.name] for t in config.inputs if t.name in stored[0]}
            # .size, not len(): a scalar input's samples may be a 0-d array.
            if len(got) == len(config.inputs) and all(a.size for a in got.values()):
                samples = got
        if samples is None:
            log.warning("%s: no usable samples in version %s; warming up with zeros", config.name, info.version)
    runs = []
    limit = repository.limits.max_samples_bytes
    for b in sizes:
        # config.yaml is repository input: a warm-up batch of 10^9 rows must be a refused load,
        # not an allocation (the same bound as the samples read for it).
        need = 0
        for t in config.inputs:
            if samples is not None:
                a = samples[t.name]
                elems = (a.size // max(len(a), 1)) * b if batching and a.ndim else a.size
            else:
                elems = math.prod(d if d != -1 else 1 for d in t.shape[1 if batching else 0:]) * (b if batching else 1)
            need += elems * np.dtype(t.dtype).itemsize
        if need > limit:
            raise ModelLoadError(f"warm-up batch {b} needs {need} bytes of inputs, over the limit of {limit}",
                                 hint="lower warmup.batch_sizes / max_batch_size in config.yaml, or raise "
                                      "`serve-kit serve --max-samples-mb`")
        inputs = {}
        for t in config.inputs:
            if samples is not None:
                a = samples[t.name]
                if not batching:
                    a = a[0] if a.ndim == len(t.shape) + 1 else a
                else:
                    a = np.concatenate([a] * math.ceil(b / len(a)))[:b]
                inputs[t.name] = np.asarray(a.astype(t.dtype, copy=False), order="C")
            else:
                dims = [d if d != -1 else 1 for d in t.shape]
                if batching:
                    dims[0] = b
                inputs[t.name] = np.zeros(dims, dtype=t.dtype)
        runs.append(inputs)
    return runs


class ModelManager:
    """Loads models from a repository and routes requests to their schedulers.

    `models`: the model names to load at `start()` (None = every model in the repository).
    `cores`: CPU cores the instances share (default: those this process may run on).
    `drain_timeout`: seconds an old version may take to finish its requests after a reload or
    unload before the rest are answered Unavailable.
    Use from one event loop: `await start()`, then `infer()`; `await shutdown()` at the end.
    """

    def __init__(self, repository: str | Path, models: list[str] | None = None, *, cores: int | None = None,
                 drain_timeout: float = 30.0, limits: Limits | None = None, scheduler_options: dict | None = None):
        self.repository = Repository(repository, limits)
        self.scheduler_options = dict(scheduler_options or {})
        """Keyword arguments for every DynamicBatcher (server-wide queue policy, e.g. max_queue_time_us)."""
        self._wanted = list(models) if models is not None else None
        self.cores = cores or available_cores()
        self.drain_timeout = drain_timeout
        self._models: dict[str, _Model] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining: list[DynamicBatcher] = []
        self._retired: dict[tuple[str, int], SchedulerStats] = {}
        self._resilience_counts: dict[tuple[str, int], resilience.Counts] = {}
        """Breaker / cache counters per (model, version), kept across reloads."""
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._stopping = False
        self._stopped = False
        self.router = Router(self)
        """Endpoint routes (split, shadow, fallback) over the models' versions: runtime/router.py."""
        self.idempotency = resilience.IdempotencyTable()
        """Requests by Idempotency-Key: a retry shares or replays the first attempt's answer."""
        self.router.counters.replays = self.idempotency.replays

    async def __aenter__(self) -> "ModelManager":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown(self.drain_timeout)

    # ------------------------------------------------------------------------------------------
    # Health

    @property
    def live(self) -> bool:
        """The process is up and answering (until shutdown finished)."""
        return not self._stopped

    @property
    def ready(self) -> bool:
        """Every model (not unloaded on purpose) has every version its policy names loaded and
        warmed up, and the manager is not shutting down."""
        return (self._started and not self._stopping
                and all(m.complete for m in self._models.values() if m.required and not m.unloaded))

    def model_ready(self, model: str, version: int | None = None) -> bool:
        m = self._models.get(model)
        if m is None or not m.routes:
            if version is None and model in self.router.routes:  # an endpoint of its own name
                return any(self.model_ready(t.model, t.version) for t in self.router.routes[model].targets)
            return False
        # A version whose circuit breaker is open is not ready (as if unloaded) until half-open.
        if version is None:
            return any(not getattr(s, "open", False) for s in m.routes.values())
        s = m.routes.get(version)
        return s is not None and not getattr(s, "open", False)

    def config(self, model: str) -> ModelConfig:
        """The config.yaml the model's serving versions were loaded with (for an endpoint that is
        not a model, that of its route's first target: every target shares its signature)."""
        m = self._models.get(model)
        if m is None or m.config is None or not m.routes:
            if model in self.router.routes:
                config = self.router.endpoint_config(model)
                if config is not None:
                    return config
            raise NotFound(self._unknown(model))
        return m.config

    def versions(self, model: str) -> list[int]:
        """The model's versions that are serving, ascending."""
        m = self._models.get(model)
        return sorted(m.routes) if m is not None else []

    # ------------------------------------------------------------------------------------------
    # Loading

    async def start(self, strict: bool = False) -> None:
        """Load the models (concurrently, off the event loop). A model that fails is reported by
        `index()` as UNAVAILABLE with its reason and keeps `ready` false; with `strict`, start
        raises ModelLoadFailed naming every failure instead."""
        names = self._wanted if self._wanted is not None else self.repository.models()
        bad = [n for n in names if not is_model_name(n)]
        if bad:
            raise ModelLoadFailed("not a model name", value=", ".join(map(repr, bad)), origin="--model",
                                  hint="model names are folder names in the repository: letters, digits and _ . -")
        built = await asyncio.gather(*(asyncio.to_thread(self._build, n) for n in names))
        for m in built:
            self._models[m.name] = m
        self._started = True
        failures = [f"{m.name}: {f}" for m in built for f in m.failures]
        for f in failures:
            log.error("not serving %s", f)
        self.router.load_static()
        if strict and failures:
            raise ModelLoadFailed("models failed to load: " + "; ".join(failures), origin=str(self.repository.root),
                                 hint="`serve-kit inspect` verifies the repository")

    async def load(self, model: str) -> None:
        """Load a model, or reload it if loaded (new config.yaml, new versions). The new version
        set is built and warmed up completely before it replaces the old one in one step; the old
        versions then finish their queued and running requests in the background. On any failure
        the old versions keep serving and ModelLoadFailed says why."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        self._check_name(model)
        if model not in self._models and model not in self.repository.models():
            # Never entered in the index: only models of the repository are listed there.
            raise ModelLoadFailed(f"model {model!r} has no config.yaml in the repository",
                                  origin="load", hint=f"models: {', '.join(self.repository.models()) or 'none'}")
        async with self._lock(model):
            new = await asyncio.to_thread(self._build, model)
            old = self._models.get(model)
            if not new.complete:
                for s in new.schedulers():
                    s.close()
                serving = old is not None and bool(old.routes)
                if not serving:
                    # Nothing to keep: show the reason in the index.
                    new.required = old is not None and old.required and not old.unloaded
                    self._models[model] = new
                raise ModelLoadFailed(
                    f"model {model!r} failed to load: " + "; ".join(new.failures)
                    + ("; the previously loaded versions keep serving" if serving else ""),
                    origin=f"repository model {model}")
            self._models[model] = new  # the swap: every request from here on routes to `new`
            log.info("model %s: serving versions %s", model, sorted(new.routes))
            self.router.load_static(model)
            if old is not None:
                self._retire(old.schedulers())

    async def unload(self, model: str) -> None:
        """Stop routing to a model and drain its versions (waits up to `drain_timeout`)."""
        if not is_model_name(model):
            raise NotFound(f"unknown model {model[:80]!r}: not a model name")
        async with self._lock(model):
            old = self._models.get(model)
            if old is None or old.unloaded:
                if model not in self.repository.models():
                    raise NotFound(self._unknown(model))
                self._models[model] = _Model(model, None, reason="unloaded", unloaded=True)
                return
            self._models[model] = _Model(model, None, reason="unloaded", unloaded=True)
            old_schedulers = old.schedulers()
            self._draining.extend(old_schedulers)
            await asyncio.gather(*(self._drain_one(s) for s in old_schedulers))

    @staticmethod
    def _check_name(model: object) -> None:
        """Names are model names (the repository's rule), never paths: refused here, once, for
        every frontend (HTTP and gRPC load/unload call this manager)."""
        try:
            check_model_name(model, "load")
        except RepositoryError as e:
            raise ModelLoadFailed(e.message, value=e.value, origin="load", hint=e.hint) from None

    def _public(self, reason: str) -> str:
        """A failure reason as shown to every client (the repository index is unauthenticated):
        one line, paths relative to the repository, any other server path redacted."""
        return redact_paths(reason.replace("\n", " "), self.repository.root)

    def _lock(self, model: str) -> asyncio.Lock:
        lock = self._locks.get(model)
        if lock is None:
            lock = self._locks[model] = asyncio.Lock()
        return lock

    def _retire(self, schedulers: list[DynamicBatcher]) -> None:
        # Listed as draining in the same step as the swap, so their counters never drop out of
        # the statistics (a dip would look like a counter reset to Prometheus).
        self._draining.extend(schedulers)
        for s in schedulers:
            task = asyncio.get_running_loop().create_task(self._drain_one(s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain_one(self, s: DynamicBatcher) -> None:
        """Drain a scheduler already listed in `_draining`, then fold its counters into `_retired`."""
        try:
            if not await s.drain(self.drain_timeout):
                log.warning("model %s version %s did not drain within %.0f s", s.model, s.version,
                            self.drain_timeout)
        finally:
            key = (s.model, s.version)
            # Keep the counters monotonic across reloads: a version's statistics include those of
            # the schedulers it replaced.
            prev = self._retired.get(key)
            final = s.stats()
            final.queue_depth = final.inflight = 0
            self._retired[key] = final if prev is None else prev + final
            self._draining.remove(s)

    def _build(self, name: str) -> _Model:
        """Load every version the policy names (blocking; runs in a worker thread)."""
        try:
            config = self.repository.config(name)
        except ServeKitError as e:
            return _Model(name, None, reason=self._public(e.render()))
        if config.name != name:
            return _Model(name, None, reason=f"config.yaml names model {config.name!r}, but its directory is {name!r}")
        numbers = self.repository.version_numbers(name)
        policy = config.version_policy
        wanted = policy.select(numbers)
        if not wanted:
            return _Model(name, config, reason="no versions to serve"
                          + (f" (version_policy {policy.model_dump(exclude_defaults=True)})" if numbers else ""))
        versions = {}
        for v in wanted:
            try:
                sched = self._load_version(config, v, numbers)
                versions[v] = _Version(v, sched, READY)
            except ServeKitError as e:
                versions[v] = _Version(v, None, UNAVAILABLE, self._public(e.message))
                log.error("model %s version %d: %s", name, v, e.render())
            except Exception as e:  # noqa: BLE001 - one broken version must not stop the others loading
                versions[v] = _Version(v, None, UNAVAILABLE,
                                       self._public(f"unexpected error: {type(e).__name__}: {e}"))
                log.exception("model %s version %d failed to load", name, v)
        return _Model(name, config, versions)

    def _load_version(self, config: ModelConfig, v: int, numbers: list[int]) -> DynamicBatcher:
        name = config.name
        if v not in numbers:
            raise ModelLoadError(f"not in the repository (versions: "
                                 f"{', '.join(map(str, numbers)) or 'none'})")
        info = self.repository.version(name, v)
        problems = self.repository.verify_version(info)
        if problems:
            raise ModelLoadError("failed verification, refusing to load it: " + "; ".join(problems),
                                 origin=str(info.path))
        backend = (info.manifest or {}).get("backend") or config.backend
        model_file = info.model_file
        if model_file is None:
            raise ModelLoadError("manifest.json names no model_file", origin=str(info.path))
        opts = backend_options(config, self.cores)
        t0 = time.perf_counter()
        instances: list[Backend] = []
        try:
            runs = _warmup_inputs(config, self.repository, info)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read warm-up samples: {e}", origin=str(info.path)) from None
        for _ in range(config.instance_group.count):
            try:
                b = load_backend(backend, model_file, [o.name for o in config.outputs], opts)
            except ServeKitError as e:
                raise ModelLoadError(e.message, origin=str(model_file), hint=e.hint) from None
            except Exception as e:  # noqa: BLE001 - a backend's own failure to load is reported, not fatal
                raise ModelLoadError(f"{backend} cannot load the model: {type(e).__name__}: {e}",
                                     origin=str(model_file)) from None
            for inputs in runs:
                try:
                    out = b.infer(inputs)
                except Exception as e:  # noqa: BLE001
                    shape = {k: list(a.shape) for k, a in inputs.items()}
                    raise ModelLoadError(f"warm-up failed on inputs {shape}: {type(e).__name__}: {e}",
                                         origin=str(model_file)) from None
                missing = [o.name for o in config.outputs if o.name not in out]
                if missing:
                    raise ModelLoadError(f"the model does not produce outputs {missing} named in config.yaml "
                                         f"(it produces {sorted(out)})", origin=str(model_file))
            instances.append(b)
        log.info("model %s version %d: %d x %s loaded and warmed up in %.2f s", name, v, len(instances),
                 backend, time.perf_counter() - t0)
        batcher = DynamicBatcher(config, instances, model=name, version=v, canary=runs[0] if runs else None,
                                 **self.scheduler_options)
        # A breaker / response cache when config.yaml asks; counters carried over from earlier loads.
        counts = self._resilience_counts.setdefault((name, v), resilience.Counts())
        return resilience.wrap(batcher, config, counts)

    # ------------------------------------------------------------------------------------------
    # Routing

    def _unknown(self, model: str) -> str:
        served = sorted(n for n, m in self._models.items() if m.routes)
        return f"unknown model {model!r}; models: {', '.join(served) or 'none'}"

    def resolve(self, model: str, version: int | None = None) -> DynamicBatcher:
        """The scheduler for a request: the given version, or the latest version serving."""
        m = self._models.get(model)
        if m is None or not m.routes:
            if m is not None and m.reason == "unloaded":
                raise NotFound(f"model {model!r} is unloaded; " + self._unknown(model).split("; ", 1)[1])
            if m is not None and m.failures:
                raise Unavailable(f"model {model!r} is not available: " + "; ".join(m.failures))
            raise NotFound(self._unknown(model))
        if version is None:
            return m.routes[m.latest]
        s = m.routes.get(version)
        if s is None:
            raise NotFound(f"model {model!r} has no version {version} serving; versions: "
                           f"{', '.join(map(str, sorted(m.routes)))}")
        return s

    async def infer(self, req: InferRequest) -> InferResponse:
        """Route, check and run one request; only the requested outputs are returned."""
        sched, fut = self.infer_nowait(req)
        return self.response(req, sched, await fut)

    def infer_nowait(self, req: InferRequest) -> tuple[DynamicBatcher, asyncio.Future]:
        """`infer` without a coroutine: route, check and queue `req`; return the scheduler that
        took it and the future of its raw outputs (turn them into the answer with `response`).

        Routing and input errors, and refusals (queue full, unknown version), raise here."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        key = req.headers.get("idempotency-key") if req.headers else None
        if key is not None:
            return self._idempotent(req, resilience.check_key(key))
        return self._route_nowait(req)

    def _idempotent(self, req: InferRequest, key: str):
        """`infer_nowait` for a request with an Idempotency-Key: its first attempt runs; a retry
        while it runs shares its answer, a retry after it succeeded replays it (neither runs nor
        is counted again); the same key with another request is refused (422)."""
        loop = asyncio.get_running_loop()
        digest = resilience.request_digest(req.inputs, req.version,
                                           None if req.outputs is None else [o.name for o in req.outputs])

        def start() -> asyncio.Future:
            sched, fut = self._route_nowait(req)
            first = loop.create_future()
            resilience.relay(fut, first, lambda outputs: _Answer(sched, outputs))
            return first

        shared, _ = self.idempotency.claim(req.model, key, digest, start)
        handle = Answering(req.model)
        handle.routed = False
        out = loop.create_future()

        def unwrap(answer: "_Answer") -> dict:
            for attr in ("model", "version", "batching", "fallback", "routed"):
                setattr(handle, attr, getattr(answer.handle, attr))
            return answer.outputs

        resilience.relay(shared, out, unwrap)
        return handle, out

    def _route_nowait(self, req: InferRequest):
        if req.version is None:
            route = self.router.routes.get(req.model)
            if route is not None:
                return self.router.infer_nowait(req, route)
        sched = self.resolve(req.model, req.version)
        self.check_request(req.model, req)
        try:
            return sched, sched.submit_nowait(req.inputs, req.priority, req.timeout_us)
        except SchedulerClosed:
            # Routed just before a reload swapped the version out: the replacement takes it.
            retry = self.resolve(req.model, req.version)
            if retry is sched:
                raise
            return retry, retry.submit_nowait(req.inputs, req.priority, req.timeout_us)

    def check_request(self, model: str, req: InferRequest) -> None:
        """`req`'s inputs fit `model`'s config and its requested outputs exist (400 otherwise)."""
        m = self._models[model]
        m.check(req.model, req.inputs)
        if req.outputs is not None:
            unknown = [o.name for o in req.outputs if o.name not in m.output_names]
            if unknown:
                raise BadRequest(f"model {req.model!r} has no outputs {unknown}; outputs: "
                                 f"{sorted(m.output_names)}")

    @staticmethod
    def response(req: InferRequest, sched, outputs: dict) -> InferResponse:
        """The answer to `req` from the outputs its scheduler (or the router's Answering) returned:
        the requested ones only, and for a routed request who answered (contract: response
        parameters `serve_kit_target`, `serve_kit_fallback`)."""
        params: dict[str, Any] = {}
        if getattr(sched, "routed", False):
            params["serve_kit_target"] = f"{sched.model}/{sched.version}"
            if sched.fallback:
                params["serve_kit_fallback"] = True
        if isinstance(outputs, resilience.CachedOutputs):
            params["serve_kit_cache_hit"] = True
        if req.outputs is not None:
            outputs = {o.name: outputs[o.name] for o in req.outputs}
        return InferResponse(model=req.model, version=sched.version, outputs=outputs, id=req.id, parameters=params)

    # ------------------------------------------------------------------------------------------
    # Introspection

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index: every model in the repository (and every model asked for),
        one entry per version with its state and, when not READY, the reason."""
        names = sorted(set(self.repository.models()) | set(self._models))
        out = []
        for name in names:
            m = self._models.get(name)
            if m is None:
                out.append({"name": name, "state": UNAVAILABLE, "reason": "not loaded"})
                continue
            if not m.versions:
                out.append({"name": name, "state": UNAVAILABLE, "reason": m.reason or "not loaded"})
                continue
            for v in sorted(m.versions):
                e = m.versions[v]
                out.append({"name": name, "version": str(v), "state": e.state, "reason": e.reason})
        return out

    def version_states(self) -> dict[tuple[str, int], str]:
        """(model, version) -> READY / UNAVAILABLE for every version the manager knows of."""
        return {(name, v): e.state for name, m in self._models.items() for v, e in m.versions.items()}

    def scheduler_stats(self) -> dict[tuple[str, int], SchedulerStats]:
        """Cumulative statistics per (model, version), over reloads, for every version ever served."""
        out: dict[tuple[str, int], SchedulerStats] = {k: v for k, v in self._retired.items()}
        live = [s for m in self._models.values() for s in m.schedulers()] + list(self._draining)
        for s in live:
            key = (s.model, s.version)
            out[key] = out[key] + s.stats() if key in out else s.stats()
        return out

    def resilient(self) -> dict[tuple[str, int], "resilience.Resilient"]:
        """(model, version) -> the serving versions wrapped with a breaker and/or response cache."""
        return {(name, v): s for name, m in self._models.items() for v, s in m.routes.items()
                if isinstance(s, resilience.Resilient)}

    def stats(self, model: str | None = None, version: int | None = None) -> dict[str, Any]:
        """Triton's statistics extension (`GET v2/models[/{model}[/versions/{v}]]/stats`): counts
        and cumulative durations in nanoseconds for the loaded versions."""
        if model is not None:
            m = self._models.get(model)
            if m is None or not m.routes:
                raise NotFound(self._unknown(model))
            if version is not None and version not in m.routes:
                raise NotFound(f"model {model!r} has no version {version} serving; versions: "
                               f"{', '.join(map(str, sorted(m.routes)))}")
        all_stats = self.scheduler_stats()
        entries = []
        for name in sorted(self._models):
            if model is not None and name != model:
                continue
            for v in sorted(self._models[name].routes):
                if version is not None and v != version:
                    continue
                entries.append(_triton_stats(name, v, all_stats.get((name, v), SchedulerStats()),
                                             self._models[name].routes[v]))
        return {"model_stats": entries}

    # ------------------------------------------------------------------------------------------
    # Shutdown

    def begin_shutdown(self) -> None:
        """Report not ready and refuse new requests (Unavailable) from now on; `shutdown()` then
        drains. Separate so a server can flip readiness before it stops its listeners."""
        self._stopping = True

    async def shutdown(self, timeout: float = 30.0) -> bool:
        """Not ready at once; new requests get Unavailable; queued and running requests finish
        within `timeout` seconds (the rest are answered Unavailable). Returns True if all finished."""
        self._stopping = True
        schedulers = [s for m in self._models.values() for s in m.schedulers()]
        results = await asyncio.gather(*(s.drain(timeout) for s in schedulers), *(
            s.drain(timeout) for s in list(self._draining)))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(timeout, 0.001))
        self.router.close()
        self._stopped = True
        return all(results)


class _Answer:
    """A finished first attempt, as the idempotency table keeps it: who answered and the outputs."""

    __slots__ = ("handle", "outputs")

    def __init__(self, handle, outputs: dict):
        snap = Answering(getattr(handle, "endpoint", handle.model))
        snap.model, snap.version, snap.batching = handle.model, handle.version, handle.batching
        snap.fallback, snap.routed = getattr(handle, "fallback", False), getattr(handle, "routed", False)
        self.handle, self.outputs = snap, outputs


def _cn(count: int, ns: int) -> dict[str, int]:
    return {"count": int(count), "ns": int(ns)}


def _triton_stats(name: str, version: int, s: SchedulerStats, sched=None) -> dict[str, Any]:
    fail_count = sum(c for c, _ in s.fail.values())
    fail_ns = sum(ns for _, ns in s.fail.values())
    cache = getattr(sched, "cache", None)
    breaker = getattr(sched, "breaker", None)
    entry = {
        "name": name,
        "version": str(version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _cn(s.success_count, s.success_ns),
            "fail": _cn(fail_count, fail_ns),
            "queue": _cn(s.queue_count, s.queue_ns),
            "compute_input": _cn(s.compute_count, s.compute_input_ns),
            "compute_infer": _cn(s.compute_count, s.compute_infer_ns),
            "compute_output": _cn(s.compute_count, s.compute_output_ns),
            "cache_hit": _cn(cache.hits if cache else 0, 0),
            "cache_miss": _cn(cache.misses if cache else 0, 0),
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": _cn(b[0], b[1]), "compute_infer": _cn(b[0], b[2]),
             "compute_output": _cn(b[0], b[3])}
            for size, b in sorted(s.batches.items())
        ],
    }
    if breaker is not None:
        entry["breaker"] = breaker.snapshot()
    return entry
