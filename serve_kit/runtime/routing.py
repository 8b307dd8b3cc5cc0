"""Routes: which target(s) a request to an endpoint goes to. Pure: no schedulers, no I/O.

A route (config.RouteSpec) splits an endpoint's traffic over model versions by weight, either at
random per request or sticky by a key, optionally mirrors a share to a shadow and names a fallback
chain. `Route` is the compiled, immutable form the router reads on every request; a change builds
a new Route and swaps it in one assignment, so a request sees the old route or the new one, never a
mix.

Sticky assignment is weighted rendezvous (highest random weight) hashing: each target scores
`-weight / ln(u)`, u a uniform hash of (key, target), and the highest score wins. A key's scores
do not depend on the other targets, so changing one target's weight moves only the keys that must
move to or from that target, and a key keeps its target while the weights stay the same.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import ModelConfig, RouteSpec

_TWO64 = float(1 << 64)


@dataclass(frozen=True)
class Ref:
    """A model and version (None = its latest serving version)."""

    model: str
    version: int | None = None

    def __str__(self) -> str:
        return f"{self.model}:{self.version if self.version is not None else 'latest'}"


@dataclass(frozen=True)
class Route:
    endpoint: str
    spec: RouteSpec
    targets: tuple[Ref, ...]
    shares: tuple[float, ...]
    """weight / sum of the weights, per target."""
    generation: int = 1
    source: str = "default"
    """default | config.yaml | routes.yaml | api"""
    updated: float = field(default_factory=time.time)
    shadow: Ref | None = None
    shadow_share: float = 0.0
    fallback: tuple[Ref, ...] = ()
    _cumulative: tuple[float, ...] = ()
    _salts: tuple[bytes, ...] = ()

    @classmethod
    def build(cls, endpoint: str, spec: RouteSpec, *, generation: int = 1, source: str = "api",
              updated: float | None = None) -> "Route":
        total = sum(t.weight for t in spec.targets)
        shares = tuple(t.weight / total for t in spec.targets)
        cum, acc = [], 0.0
        for s in shares:
            acc += s
            cum.append(acc)
        cum[-1] = 1.0
        targets = tuple(Ref(t.model, t.version) for t in spec.targets)
        return cls(endpoint=endpoint, spec=spec, targets=targets, shares=shares, generation=generation,
                   source=source, updated=time.time() if updated is None else updated,
                   shadow=Ref(spec.shadow.model, spec.shadow.version) if spec.shadow else None,
                   shadow_share=(spec.shadow.percent / 100.0) if spec.shadow else 0.0,
                   fallback=tuple(Ref(f.model, f.version) for f in spec.fallback),
                   _cumulative=tuple(cum), _salts=tuple(str(t).encode() for t in targets))

    @classmethod
    def default(cls, endpoint: str, generation: int = 0) -> "Route":
        """The route of a model without one: every request to its latest serving version."""
        return cls.build(endpoint, RouteSpec(endpoint=endpoint, targets=[{"model": endpoint}]), generation=generation,
                         source="default", updated=0.0)

    @property
    def single(self) -> bool:
        return len(self.targets) == 1

    def key_of(self, headers: Mapping[str, str] | None, parameters: Mapping[str, Any] | None) -> str | None:
        """The request's sticky key, or None (then it is assigned at random)."""
        sticky = self.spec.sticky
        if sticky is None:
            return None
        if sticky.header is not None:
            value = headers.get(sticky.header) if headers else None
        else:
            value = parameters.get(sticky.parameter) if parameters else None
        if value is None or isinstance(value, (dict, list)):
            return None
        return str(value)

    def pick(self, key: str | None = None, rand: float | None = None) -> int:
        """Index of the target a request goes to: by `key` (rendezvous hashing) or at random."""
        if len(self.targets) == 1:
            return 0
        if key is None:
            u = random.random() if rand is None else rand
            for i, c in enumerate(self._cumulative):
                if u < c:
                    return i
            return len(self.targets) - 1
        return rendezvous(key.encode("utf-8", "surrogatepass"), self.shares, self._salts)

    def mirror(self, rand: float | None = None) -> bool:
        """Whether this request is also sent to the shadow."""
        if self.shadow is None or self.shadow_share <= 0:
            return False
        return (random.random() if rand is None else rand) < self.shadow_share

    def compares(self, rand: float | None = None) -> bool:
        """Whether a request a non-first target answered also runs on the champion."""
        c = self.spec.compare
        return c > 0 and (random.random() if rand is None else rand) < c

    def state(self) -> dict[str, Any]:
        """The route as `GET /v2/routes/{endpoint}` shows it."""
        doc = self.spec.model_dump(mode="json", exclude_none=True)
        doc["endpoint"] = self.endpoint
        if not doc.get("fallback"):
            doc.pop("fallback", None)
        if not doc.get("compare"):
            doc.pop("compare", None)
        for t, share in zip(doc["targets"], self.shares):
            t["share"] = round(share, 6)
        doc.update(generation=self.generation, source=self.source, updated=self.updated)
        return doc

    def describe(self) -> str:
        """One line for the log: `digits:1 95%, digits:2 5%; shadow digits:3 100%`."""
        parts = [", ".join(f"{t} {s * 100:g}%" for t, s in zip(self.targets, self.shares))]
        if self.spec.sticky:
            parts.append(f"sticky by {self.spec.sticky.header or self.spec.sticky.parameter}")
        if self.shadow:
            parts.append(f"shadow {self.shadow} {self.shadow_share * 100:g}%")
        if self.spec.compare:
            parts.append(f"compare {self.spec.compare * 100:g}%")
        if self.fallback:
            parts.append("fallback " + " -> ".join(map(str, self.fallback)))
        return "; ".join(parts)


def rendezvous(key: bytes, shares: tuple[float, ...], salts: tuple[bytes, ...]) -> int:
    """Weighted rendezvous hashing: the index with the highest `-share / ln(u(key, salt))`."""
    best, best_score = 0, -math.inf
    for i, (share, salt) in enumerate(zip(shares, salts)):
        if share <= 0:
            continue
        h = int.from_bytes(hashlib.blake2b(salt + b"\0" + key, digest_size=8).digest(), "big")
        u = (h + 0.5) / _TWO64  # strictly inside (0, 1)
        score = -share / math.log(u)
        if score > best_score:
            best, best_score = i, score
    return best


# ---------------------------------------------------------------------------------------------
# Signatures


def signature(config: ModelConfig) -> tuple:
    """What a caller of a model depends on: tensor names, datatypes and non-batch dims, and whether
    it batches (so a request's shape means the same on every target)."""
    batched = config.max_batch_size > 0

    def dims(shape: list[int]) -> tuple:
        return tuple(shape[1:] if batched else shape)

    return (batched,
            tuple(sorted((t.name, t.datatype, dims(t.shape)) for t in config.inputs)),
            tuple(sorted((t.name, t.datatype, dims(t.shape)) for t in config.outputs)))


def incompatibility(endpoint: ModelConfig, other: ModelConfig) -> str | None:
    """Why `other` cannot answer requests made for `endpoint`'s signature, or None.

    Inputs must match exactly (a request decoded for the endpoint must fit); `other` must produce
    every output the endpoint has, alike (it may produce more)."""
    eb, ein, eout = signature(endpoint)
    ob, oin, oout = signature(other)
    if eb != ob:
        return (f"{other.name} is {'batched' if ob else 'unbatched'} (max_batch_size {other.max_batch_size}) "
                f"and {endpoint.name} is not")
    if ein != oin:
        return f"inputs differ: {endpoint.name} takes {_fmt(ein)}, {other.name} takes {_fmt(oin)}"
    missing = sorted(set(eout) - set(oout))
    if missing:
        return f"outputs differ: {endpoint.name} returns {_fmt(tuple(missing))}, {other.name} returns {_fmt(oout)}"
    if endpoint.max_batch_size > other.max_batch_size > 0:
        return (f"{other.name} takes batches of at most {other.max_batch_size} rows, "
                f"{endpoint.name} up to {endpoint.max_batch_size}")
    return None


def _fmt(tensors: tuple) -> str:
    return ", ".join(f"{n} {dt}{list(d)}" for n, dt, d in tensors)
