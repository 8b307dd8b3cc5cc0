"""serve_kit.runtime.models: loading, routing, reload, unload and shutdown over a real repository."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from rt_models import (ProbeBackend, arun, config, mlp_onnx, mlp_reference, mlp_weights, probe_config,
                       seq_onnx, torchscript_mlp, write_probe, write_version)

from serve_kit.errors import ModelLoadError
from serve_kit.runtime.backends import load_backend
from serve_kit.runtime.models import ModelLoadFailed, ModelManager, default_intra_op_threads
from serve_kit.runtime.types import BadRequest, InferRequest, NotFound, RequestedOutput, Unavailable

BATCHING = {"max_queue_delay_microseconds": 1000}


def mlp_config(**kw):
    kw.setdefault("dynamic_batching", BATCHING)
    return config("mlp", 16, 4, max_batch_size=8, **kw)


def write_mlp(root, seed: int, **kw) -> tuple[int, np.ndarray, np.ndarray]:
    w1, w2 = mlp_weights(16, 32, 4, seed=seed, integer=True)
    return write_version(root, mlp_config(**kw), mlp_onnx(w1, w2)), w1, w2


def req(model: str, x: np.ndarray, version: int | None = None, **kw) -> InferRequest:
    return InferRequest(model=model, inputs={"x": x}, version=version, **kw)


def x16(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-3, 4, (rows, 16)).astype(np.float32)


def test_loads_policy_versions_routes_and_indexes(tmp_path):
    weights = {}
    for seed in (1, 2, 3):
        v, w1, w2 = write_mlp(tmp_path, seed, version_policy={"latest": 2})
        weights[v] = (w1, w2)
    write_version(tmp_path, config("seq", max_batch_size=4,
                                   inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                                   outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                                            {"name": "s", "datatype": "FP32", "shape": [-1, 1]}]),
                  seq_onnx())

    async def main():
        async with ModelManager(tmp_path) as m:
            assert m.ready and m.live
            x = x16(0, rows=3)
            latest = await m.infer(req("mlp", x))
            v2 = await m.infer(req("mlp", x, version=2))
            with pytest.raises(NotFound, match=r"no version 1 serving; versions: 2, 3"):
                await m.infer(req("mlp", x, version=1))
            with pytest.raises(NotFound, match=r"unknown model 'nope'; models: mlp, seq"):
                await m.infer(req("nope", x))
            assert m.resolve("mlp").version == 3
            assert m.versions("mlp") == [2, 3] and m.versions("nope") == []
            assert m.config("mlp").name == "mlp" and m.model_ready("mlp", 2) and not m.model_ready("mlp", 1)
            with pytest.raises(NotFound):
                m.config("nope")
            return latest, v2, m.index()

    latest, v2, index = arun(main())
    x = x16(0, rows=3)
    assert latest.version == 3 and latest.model == "mlp"
    np.testing.assert_array_equal(latest.outputs["y"], mlp_reference(x, *weights[3]))
    assert v2.version == 2
    np.testing.assert_array_equal(v2.outputs["y"], mlp_reference(x, *weights[2]))
    assert index == [{"name": "mlp", "version": "2", "state": "READY", "reason": ""},
                     {"name": "mlp", "version": "3", "state": "READY", "reason": ""},
                     {"name": "seq", "version": "1", "state": "READY", "reason": ""}]


def test_infer_checks_inputs_and_returns_only_requested_outputs(tmp_path):
    write_version(tmp_path, config("seq", max_batch_size=4,
                                   inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                                   outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, -1]},
                                            {"name": "s", "datatype": "FP32", "shape": [-1, 1]}],
                                   dynamic_batching=BATCHING), seq_onnx())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    async def main():
        async with ModelManager(tmp_path, ["seq"]) as m:
            only_s = await m.infer(InferRequest("seq", {"x": x}, outputs=[RequestedOutput("s")], id="r1"))
            both = await m.infer(InferRequest("seq", {"x": x}))
            with pytest.raises(BadRequest, match=r"no outputs \['z'\]"):
                await m.infer(InferRequest("seq", {"x": x}, outputs=[RequestedOutput("z")]))
            with pytest.raises(BadRequest, match="dtype float64"):
                await m.infer(InferRequest("seq", {"x": x.astype(np.float64)}))
            with pytest.raises(BadRequest, match="shape"):
                await m.infer(InferRequest("seq", {"x": x[0]}))
            with pytest.raises(BadRequest, match=r"missing \['x'\], unexpected \['y'\]"):
                await m.infer(InferRequest("seq", {"y": x}))
            return only_s, both

    only_s, both = arun(main())
    assert list(only_s.outputs) == ["s"] and only_s.id == "r1"
    np.testing.assert_array_equal(only_s.outputs["s"], [[3.0], [12.0]])
    assert set(both.outputs) == {"y", "s"}


def test_tampered_version_is_refused_with_the_reason(tmp_path):
    write_mlp(tmp_path, 1, version_policy={"all": True})
    write_mlp(tmp_path, 2, version_policy={"all": True})
    model_file = tmp_path / "mlp" / "2" / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))

    async def main():
        m = ModelManager(tmp_path)
        await m.start()
        try:
            assert not m.ready  # a version the policy asks for is not serving
            out = await m.infer(req("mlp", x16(1)))  # version 1 still serves
            with pytest.raises(NotFound, match="no version 2"):
                await m.infer(req("mlp", x16(1), version=2))
            return out, m.index()
        finally:
            await m.shutdown(5)

    out, index = arun(main())
    assert out.version == 1
    bad = [e for e in index if e["version"] == "2"][0]
    assert bad["state"] == "UNAVAILABLE"
    assert bad["reason"].startswith("failed verification, refusing to load it: model.onnx: sha256 does not match")

    async def strict():
        m = ModelManager(tmp_path)
        try:
            with pytest.raises(ModelLoadFailed, match="mlp: version 2: failed verification"):
                await m.start(strict=True)
        finally:
            await m.shutdown(5)

    arun(strict())


def test_warmup_runs_on_every_instance_before_ready(tmp_path):
    samples = {"x": np.array([[7, 7, 7, 7], [8, 8, 8, 8]], np.float32)}
    write_probe(tmp_path, probe_config("warm", max_batch_size=8, instance_group={"count": 2},
                                       warmup={"batch_sizes": [1, 3, 64]}), samples=samples)
    write_probe(tmp_path, probe_config("cold", max_batch_size=8, warmup={"batch_sizes": [2], "source": "zeros"}))

    async def main():
        m = ModelManager(tmp_path)
        await m.start()
        calls = list(ProbeBackend.calls)
        ready = m.ready
        await m.shutdown(5)
        return calls, ready

    calls, ready = arun(main())
    assert ready
    warm = [c for c in calls if c["shape"][1] == 4 and c["first"][0] in (7.0, 8.0)]
    # 2 instances x batch sizes 1, 3 and 8 (64 is clipped to max_batch_size), from samples.npz.
    per_instance = {}
    for c in warm:
        per_instance.setdefault(c["instance"], []).append(c["rows"])
    assert sorted(per_instance.values()) == [[1, 3, 8], [1, 3, 8]]
    assert [7.0, 8.0, 7.0] in [c["first"] for c in warm]  # samples repeated up to the batch size
    cold = [c for c in calls if c["first"] == [0.0, 0.0]]
    assert len(cold) == 1 and cold[0]["rows"] == 2


def test_warmup_failure_refuses_the_version(tmp_path):
    write_probe(tmp_path, probe_config("bad", max_batch_size=4, warmup={"batch_sizes": [1], "source": "zeros"}),
                fail_value=0.0)

    async def main():
        m = ModelManager(tmp_path)
        await m.start()
        ready, index = m.ready, m.index()
        with pytest.raises(Unavailable, match="warm-up failed"):
            await m.infer(InferRequest("bad", {"x": np.ones((1, 4), np.float32)}))
        await m.shutdown(5)
        return ready, index

    ready, index = arun(main())
    assert not ready
    assert index[0]["state"] == "UNAVAILABLE" and "warm-up failed" in index[0]["reason"]
    assert "poison value" in index[0]["reason"]


def test_reload_under_concurrent_load_has_zero_failures(tmp_path):
    _, w1a, w2a = write_mlp(tmp_path, 1)
    versions_seen = []
    errors = []

    async def client(m: ModelManager, stop: asyncio.Event, seed: int):
        x = x16(seed, rows=2)
        while not stop.is_set():
            try:
                r = await m.infer(req("mlp", x))
            except Exception as e:  # noqa: BLE001 - collected, the test asserts there are none
                errors.append(e)
                continue
            versions_seen.append((r.version, time.monotonic()))
            w = weights[r.version]
            if not np.array_equal(r.outputs["y"], mlp_reference(x, *w)):
                errors.append(AssertionError(f"wrong output from version {r.version}"))

    async def main():
        async with ModelManager(tmp_path, drain_timeout=10) as m:
            old = m.resolve("mlp")
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(client(m, stop, i)) for i in range(12)]
            await asyncio.sleep(0.2)
            v2, w1b, w2b = await asyncio.to_thread(write_mlp, tmp_path, 2)
            weights[v2] = (w1b, w2b)
            await m.load("mlp")
            swapped = time.monotonic()
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)
            for _ in range(200):
                if not old.threads_alive():
                    break
                await asyncio.sleep(0.01)
            return v2, swapped, old, m.index(), m.stats("mlp")

    weights = {1: (w1a, w2a)}
    v2, swapped, old, index, stats = arun(main())
    assert errors == []
    seen = {v for v, _ in versions_seen}
    assert seen == {1, 2} and v2 == 2
    assert all(v == 2 for v, t in versions_seen if t > swapped + 0.05)
    assert old.threads_alive() == 0 and not old.accepting
    assert index == [{"name": "mlp", "version": "2", "state": "READY", "reason": ""}]
    assert stats["model_stats"][0]["version"] == "2"


def test_failed_reload_keeps_the_old_version_serving(tmp_path):
    _, w1, w2 = write_mlp(tmp_path, 1)

    async def main():
        async with ModelManager(tmp_path) as m:
            before = m.resolve("mlp")
            # A new version whose file does not match its manifest.
            await asyncio.to_thread(write_mlp, tmp_path, 2)
            (tmp_path / "mlp" / "2" / "model.onnx").write_bytes(b"not onnx")
            with pytest.raises(ModelLoadFailed) as ei:
                await m.load("mlp")
            assert m.resolve("mlp") is before and before.accepting
            out = await m.infer(req("mlp", x16(3)))
            # A new version that verifies but cannot be loaded: refused the same way.
            v3 = await asyncio.to_thread(write_version, tmp_path, mlp_config(), b"still not onnx")
            with pytest.raises(ModelLoadFailed) as ei3:
                await m.load("mlp")
            assert m.resolve("mlp") is before and m.ready
            return ei.value, ei3.value, out, v3, m.index()

    err, err3, out, v3, index = arun(main())
    assert isinstance(err, ModelLoadError) and err.status == 400  # a ServeKitError and a 400 for frontends
    assert "version 2: failed verification" in err.message and "keep serving" in err.message
    assert v3 == 3 and "ONNX Runtime cannot load the model" in err3.message
    assert out.version == 1
    np.testing.assert_array_equal(out.outputs["y"], mlp_reference(x16(3), w1, w2))
    assert index == [{"name": "mlp", "version": "1", "state": "READY", "reason": ""}]


def test_unload_then_load_again(tmp_path):
    write_mlp(tmp_path, 1)
    write_probe(tmp_path, probe_config("other"))

    async def main():
        async with ModelManager(tmp_path, ["mlp"]) as m:
            assert [e["name"] for e in m.index()] == ["mlp", "other"]
            assert m.index()[1] == {"name": "other", "state": "UNAVAILABLE", "reason": "not loaded"}
            await m.load("other")  # a model that was not loaded at start
            assert (await m.infer(InferRequest("other", {"x": np.ones((1, 4), np.float32)}))).outputs["y"][0, 0] == 2
            sched = m.resolve("mlp")
            await m.unload("mlp")
            assert sched.threads_alive() == 0
            with pytest.raises(NotFound, match="model 'mlp' is unloaded"):
                await m.infer(req("mlp", x16(0)))
            assert m.ready  # unloaded on purpose: not a failure
            unloaded_index = m.index()
            await m.load("mlp")
            out = await m.infer(req("mlp", x16(0)))
            with pytest.raises(NotFound):
                await m.unload("never-existed")
            with pytest.raises(ModelLoadFailed, match="has no config.yaml"):
                await m.load("never-existed")
            assert m.ready  # a failed load of a model that never served does not unready the server
            return unloaded_index, out

    unloaded_index, out = arun(main())
    assert {"name": "mlp", "state": "UNAVAILABLE", "reason": "unloaded"} in unloaded_index
    assert out.version == 1


def test_shutdown_drains_in_flight_requests(tmp_path):
    write_probe(tmp_path, probe_config("slow", max_batch_size=2, dynamic_batching={"max_queue_delay_microseconds": 0}),
                delay_s=0.05)

    async def main():
        m = ModelManager(tmp_path)
        await m.start()
        futs = [asyncio.ensure_future(m.infer(InferRequest("slow", {"x": np.full((1, 4), i, np.float32)})))
                for i in range(8)]
        await asyncio.sleep(0.01)
        m.begin_shutdown()
        stopping = asyncio.ensure_future(m.shutdown(5))
        await asyncio.sleep(0)
        assert not m.ready and m.live
        with pytest.raises(Unavailable, match="shutting down"):
            await m.infer(InferRequest("slow", {"x": np.ones((1, 4), np.float32)}))
        clean = await stopping
        outs = await asyncio.gather(*futs)
        return clean, outs, m.live

    clean, outs, live = arun(main())
    assert clean and not live
    assert [o.outputs["y"][0, 0] for o in outs] == [2.0 * i for i in range(8)]


def test_shutdown_gives_up_on_a_hung_backend_within_its_timeout(tmp_path):
    write_probe(tmp_path, probe_config("hang", max_batch_size=2), hang_value=-1)

    async def main():
        m = ModelManager(tmp_path)
        await m.start()
        fut = asyncio.ensure_future(m.infer(InferRequest("hang", {"x": np.full((1, 4), -1, np.float32)})))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        clean = await m.shutdown(0.3)
        took = time.monotonic() - t0
        with pytest.raises(Unavailable):
            await fut
        return clean, took

    clean, took = arun(main())
    assert clean is False and took < 1.5


def test_stats_in_tritons_shape(tmp_path):
    write_mlp(tmp_path, 1)

    async def main():
        async with ModelManager(tmp_path) as m:
            await asyncio.gather(*(m.infer(req("mlp", x16(i))) for i in range(24)))
            with pytest.raises(BadRequest):
                await m.infer(req("mlp", x16(0, rows=9)))  # over max_batch_size
            with pytest.raises(NotFound):
                m.stats("nope")
            return m.stats(), m.stats("mlp", 1)

    every, one = arun(main())
    assert every == one
    (s,) = one["model_stats"]
    assert (s["name"], s["version"]) == ("mlp", "1")
    inf = s["inference_stats"]
    assert inf["success"]["count"] == 24 and inf["fail"]["count"] == 1
    assert inf["queue"]["count"] == 24 and inf["compute_infer"]["count"] == 24
    assert all(inf[k]["ns"] > 0 for k in ("success", "queue", "compute_input", "compute_infer", "compute_output"))
    assert s["inference_count"] == 24 and 1 <= s["execution_count"] <= 24
    assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == s["execution_count"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in s["batch_stats"]) == 24
    assert s["last_inference"] > 0


def test_torchscript_model_is_served_with_batching(tmp_path):
    w1, w2 = mlp_weights(16, 32, 4, seed=5, integer=True)
    cfg = config("ts", 16, 4, max_batch_size=8, backend="torchscript",
                 dynamic_batching={"max_queue_delay_microseconds": 2000})
    write_version(tmp_path, cfg, torchscript_mlp(w1, w2), backend="torchscript", model_file="model.pt")

    async def main():
        async with ModelManager(tmp_path) as m:
            xs = [x16(i) for i in range(32)]
            outs = await asyncio.gather(*(m.infer(InferRequest("ts", {"x": x})) for x in xs))
            return xs, outs, m.stats("ts")

    xs, outs, stats = arun(main(), timeout=30)
    for x, o in zip(xs, outs):
        np.testing.assert_array_equal(o.outputs["y"], mlp_reference(x, w1, w2))
    assert max(b["batch_size"] for b in stats["model_stats"][0]["batch_stats"]) > 1


def test_torchscript_runs_with_the_servers_thread_count_in_its_worker_thread(tmp_path):
    # torch's width is per calling thread: the backend sets it in the thread that runs the model,
    # and leaves other threads (here the test's own) as they were.
    import threading

    import torch

    w1, w2 = mlp_weights(16, 32, 4, seed=5, integer=True)
    path = tmp_path / "model.pt"
    path.write_bytes(torchscript_mlp(w1, w2))
    mine = torch.get_num_threads()
    seen = []

    def worker():
        b = load_backend("torchscript", path, ["y"], {"intra_op_threads": 1})
        b.infer({"x": x16(1)})
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert seen == [1] and torch.get_num_threads() == mine


def test_instances_leave_a_core_to_the_event_loop():
    assert default_intra_op_threads(2, 1) == 1
    assert default_intra_op_threads(16, 1) == 15
    assert default_intra_op_threads(16, 4) == 3
    assert default_intra_op_threads(1, 1) == default_intra_op_threads(2, 4) == 1
