"""serve_kit.runtime.metrics: Prometheus text exposition of a real manager's traffic."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from rt_models import arun, probe_config, write_probe

from serve_kit.runtime.metrics import CONTENT_TYPE, Metrics, render
from serve_kit.runtime.models import ModelManager
from serve_kit.runtime.types import BadRequest, InferRequest, Unavailable

# One sample line of the text format 0.0.4: name, optional labels, value.
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? '
                    r'(-?[0-9.e+-]+|\+Inf|NaN)$')


def parse(text: str) -> dict[str, dict[str, float]]:
    """name -> {label string: value}; asserts every line is well formed and every family typed."""
    out: dict[str, dict[str, float]] = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"malformed exposition line: {line!r}"
        name = m.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no # TYPE"
        out.setdefault(name, {})[m.group(2) or ""] = float(m.group(3))
    return out


def test_metrics_expose_requests_latencies_batches_and_process(tmp_path):
    write_probe(tmp_path, probe_config("probe", max_batch_size=4,
                                       dynamic_batching={"max_queue_delay_microseconds": 2000, "max_queue_size": 1}),
                fail_value=-5, delay_s=0.002)

    async def main():
        async with ModelManager(tmp_path) as m:
            ok = [await m.infer(InferRequest("probe", {"x": np.full((1, 4), i, np.float32)})) for i in range(3)]
            results = await asyncio.gather(
                *(m.infer(InferRequest("probe", {"x": np.full((1, 4), v, np.float32)})) for v in (-5, 1, 2, 3)),
                return_exceptions=True)
            metrics = Metrics(m)
            return ok, results, metrics.render(), render(m), m.stats("probe")

    ok, results, body, body2, stats = arun(main())
    assert isinstance(body, bytes) and Metrics.content_type == CONTENT_TYPE
    assert "version=0.0.4" in CONTENT_TYPE
    text = body.decode()
    got = parse(text)
    parse(body2.decode())
    lab = 'model="probe",version="1"'
    # The poison request fails alone, as its input's fault (400); its batch mates succeed.
    failed_input = sum(isinstance(r, BadRequest) for r in results)
    rejected = sum(isinstance(r, Unavailable) for r in results)
    succeeded = 3 + sum(not isinstance(r, Exception) for r in results)
    assert failed_input == 1 and rejected >= 1  # queue of 1 overflowed; the poison request failed
    assert got["serve_kit_requests_total"][f'{{{lab},status="200"}}'] == succeeded
    assert got["serve_kit_requests_total"][f'{{{lab},status="400"}}'] == failed_input
    assert got["serve_kit_request_failures_total"][f'{{{lab},status="503"}}'] == rejected
    assert got["serve_kit_inferences_total"][f"{{{lab}}}"] == stats["model_stats"][0]["inference_count"]

    for hist in ("serve_kit_queue_duration_seconds", "serve_kit_compute_duration_seconds"):
        buckets = {k: v for k, v in got[f"{hist}_bucket"].items()}
        values = list(buckets.values())
        assert values == sorted(values), "buckets are cumulative"
        assert buckets[f'{{{lab},le="+Inf"}}'] == got[f"{hist}_count"][f"{{{lab}}}"] == succeeded
        assert got[f"{hist}_sum"][f"{{{lab}}}"] > 0
    executions = got["serve_kit_executions_total"][f"{{{lab}}}"]
    assert got["serve_kit_batch_size_count"][f"{{{lab}}}"] == executions
    assert got["serve_kit_batch_size_bucket"][f'{{{lab},le="1"}}'] <= executions
    assert got["serve_kit_queue_depth"][f"{{{lab}}}"] == 0
    assert got["serve_kit_inflight_requests"][f"{{{lab}}}"] == 0
    assert got["serve_kit_model_ready"][f"{{{lab}}}"] == 1
    assert got["process_cpu_seconds_total"][""] > 0
    assert got["process_resident_memory_bytes"][""] > 10_000_000
    assert "process_start_time_seconds" in got


def test_label_values_are_escaped():
    from serve_kit.runtime.batcher import SchedulerStats
    from serve_kit.runtime.metrics import render_stats

    text = render_stats({('we"ird\\name', 1): SchedulerStats(success_count=2)}, process=False).decode()
    assert 'model="we\\"ird\\\\name"' in text
    parse(text)


@pytest.mark.parametrize("with_failures", [False, True])
def test_counters_survive_a_reload(tmp_path, with_failures):
    write_probe(tmp_path, probe_config("p", max_batch_size=2), fail_value=-1)

    async def main():
        async with ModelManager(tmp_path) as m:
            for _ in range(3):
                await m.infer(InferRequest("p", {"x": np.ones((1, 4), np.float32)}))
            if with_failures:
                with pytest.raises(BadRequest):
                    await m.infer(InferRequest("p", {"x": -np.ones((1, 4), np.float32)}))
            await m.load("p")  # same version, reloaded: a new scheduler
            await asyncio.sleep(0.05)
            await m.infer(InferRequest("p", {"x": np.ones((1, 4), np.float32)}))
            return parse(Metrics(m).render().decode()), m.stats("p")

    got, stats = arun(main())
    assert got["serve_kit_requests_total"]['{model="p",version="1",status="200"}'] == 4
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 4
    if with_failures:
        assert got["serve_kit_request_failures_total"]['{model="p",version="1",status="400"}'] == 1
