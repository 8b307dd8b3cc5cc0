"""In-process latency measurement (used by optimize's selection; `serve-kit bench` builds on it).

Warm-up runs are excluded; each batch size is run for at least `min_seconds` and at least
`min_iterations` times, on real samples, and reported as percentiles of per-call wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Latency:
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / (self.p50_ms / 1e3) if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "iterations": self.iterations, "p50_ms": self.p50_ms,
                "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "mean_ms": self.mean_ms,
                "samples_per_s": self.samples_per_s}


def measure(fn: Callable[[dict[str, np.ndarray]], object], inputs: dict[str, np.ndarray], batch_size: int,
            min_seconds: float = 0.5, min_iterations: int = 10, warmup: int = 3,
            max_iterations: int = 100_000) -> Latency:
    for _ in range(warmup):
        fn(inputs)
    times = []
    deadline = time.perf_counter() + min_seconds
    while (len(times) < min_iterations or time.perf_counter() < deadline) and len(times) < max_iterations:
        t0 = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return Latency(batch_size, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
                   float(np.percentile(ms, 99)), float(ms.mean()))
