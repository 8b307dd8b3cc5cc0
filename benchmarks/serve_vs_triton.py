"""serve-kit's runtime against Triton's C++ front end and dynamic batcher, same model, same load.

Triton comes from the PyPI package `nvidia-pytriton` (it bundles tritonserver, which runs on CPU),
installed in a separate virtual environment so it cannot disturb the project's:

    python3 -m venv .bench-venv && .bench-venv/bin/pip install nvidia-pytriton==0.7.0 onnxruntime==1.32.0

Both servers run the same ONNX file with ONNX Runtime on the CPU, one instance, the same intra-op
thread count (serve-kit's default: the cores less one kept for the event loop), and the same
dynamic-batching settings, read from the model's config.yaml (max_batch_size,
max_queue_delay_microseconds, preferred_batch_size, max_queue_size). On the Triton side the
inference callable bound with pytriton runs the ONNX Runtime session; requests reach it through
tritonserver's HTTP/gRPC front end, its dynamic batcher and the Python backend.

Load: NVIDIA's perf_analyzer (from tritonclient), closed loop, synchronous clients, binary tensors,
the same input file (one real sample) for both servers, fixed measurement windows (a stability
threshold of 1,000,000 % with 3 trials = exactly 3 windows of --window-ms, whose merged result
perf_analyzer reports), after a warm-up run that is thrown away. Each server is started alone
(never both at once) and the order alternates between rounds (A B, B A, ...), so that noise from
other jobs on a shared machine hits both; the tables give the median over rounds.

Sections:
  compare   serve-kit vs Triton, models `mlp` (y = relu(x W1) W2, 512x512 FP32, input [-1, 512])
            and `digits` (the digits-cnn recipe's FP32 ONNX variant, input [-1, 1, 8, 8]);
            `mlp2048` (any `mlpN`: the same MLP N wide) is a model whose weights, 32 MB, dominate
            each execution, where batching saves compute and not only per-request costs,
            HTTP and gRPC, at each --concurrency.
  batching  serve-kit with dynamic batching (the model's config.yaml) vs `dynamic_batching: null`
            (a second repository, same files), at concurrency 16, alternating. Target: >= 3x.
            Also shown: batching with max_queue_delay_microseconds 0 (a third repository), and
            what batching can give at most for this model on this machine: its in-process
            execution time per row at batch 1 and at the mean batch the server formed, from which
            a compute bound (nothing else costs anything) and a shared-cores bound (the server
            costs nothing, perf_analyzer's measured CPU per inference shares the cores) follow.
            --pinned adds on and off with the server on CPU 0 and perf_analyzer on CPU 1.
  latency   concurrency 1: p50 of the served model (perf_analyzer, HTTP and gRPC) vs the median
            of an in-process `backend.infer` on the same one-row input (same thread count),
            alternating, with the model's config.yaml (a lone request waits out
            max_queue_delay_microseconds, as in Triton) and with a delay of 0. Target: within 0.5 ms.

Also recorded per run: perf_analyzer's server-side breakdown (queue and compute times, mean batch
from the inference and execution counts), the CPU time of the server's processes and of the client
per inference, the 1-minute load average before the run and, for Triton, the time spent inside
ONNX Runtime in the bound callable (to tell it apart from the Python backend's round trip).

    .venv/bin/python benchmarks/serve_vs_triton.py                       # everything, ~25 min on 2 cores
    .venv/bin/python benchmarks/serve_vs_triton.py --rounds 1 --window-ms 1000 --sections compare
    .venv/bin/python benchmarks/serve_vs_triton.py --workdir /tmp/svt --out results.json

perf_analyzer needs libb64 (Debian: `apt-get install libb64-0d`) and the CUDA runtime library
that the nvidia-cuda-runtime wheel installs; the script adds the latter to LD_LIBRARY_PATH.
The Triton worker needs LD_LIBRARY_PATH to hold its own interpreter's lib directory (else the
Python backend stub loads the system libpython and the model fails to load); the script adds it.
The script itself is also the Triton worker (`--pytriton-worker SPEC`, run by the bench venv).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIM = 512
ACCESS_TOKEN_ENV = "SVT_TRITON_ACCESS_TOKEN"


# ---------------------------------------------------------------------------------------------
# The Triton side: run by the bench venv's Python (pytriton, onnxruntime, numpy; no serve-kit).

def pytriton_worker(spec_path: str) -> int:
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    spec = json.loads(Path(spec_path).read_text())
    timing = {"run_ns": 0, "batches": 0, "rows": 0}
    dtypes = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}

    def make_callable():
        # The same session settings as serve-kit's ONNX Runtime backend (session_options()).
        so = ort.SessionOptions()
        so.intra_op_num_threads = spec["intra_op_threads"]
        so.inter_op_num_threads = 0
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        session = ort.InferenceSession(spec["model_path"], so, providers=["CPUExecutionProvider"])
        names = spec["output_names"]
        run = session.run
        clock = time.perf_counter_ns

        @batch
        def infer(**inputs):
            t0 = clock()
            out = run(names, inputs)
            # Time inside ONNX Runtime, to tell it apart from what Triton's server statistics
            # count as compute (which includes the Python backend's trip to this process).
            timing["run_ns"] += clock() - t0
            timing["batches"] += 1
            timing["rows"] += len(out[0])
            return dict(zip(names, out))

        return infer

    db = spec["dynamic_batching"]
    config = ModelConfig(
        batching=spec["max_batch_size"] > 0, max_batch_size=spec["max_batch_size"],
        batcher=DynamicBatcher(
            max_queue_delay_microseconds=db["max_queue_delay_microseconds"],
            preferred_batch_size=db["preferred_batch_size"] or None,
            default_queue_policy=QueuePolicy(max_queue_size=db["max_queue_size"],
                                             default_timeout_microseconds=db["default_timeout_microseconds"])))
    inputs = [Tensor(name=t["name"], dtype=dtypes[t["datatype"]], shape=tuple(t["shape"][1:]))
              for t in spec["inputs"]]
    outputs = [Tensor(name=t["name"], dtype=dtypes[t["datatype"]], shape=tuple(t["shape"][1:]))
               for t in spec["outputs"]]
    host = "127.0.0.1"
    triton_config = TritonConfig(http_address=host, http_port=spec["http_port"], grpc_address=host,
                                 grpc_port=spec["grpc_port"], metrics_address=host,
                                 metrics_port=spec["metrics_port"])
    # pytriton protects the statistics endpoint with an access token by default. perf_analyzer
    # reads the server's statistics (for the batch sizes) and can send a token header over HTTP
    # only, so statistics stay open, as they are on serve-kit; the management endpoints keep
    # the token.
    security = TritonSecurityConfig(access_token=os.environ.get(ACCESS_TOKEN_ENV) or None,
                                    restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])

    def publish_timing():  # snapshots for the driver, which reads them before and after each run
        path = Path(spec["timing_path"])
        while True:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(timing))
            os.replace(tmp, path)
            time.sleep(0.1)

    threading.Thread(target=publish_timing, daemon=True).start()

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with Triton(config=triton_config, security_config=security) as triton:
        triton.bind(spec["model"], [make_callable() for _ in range(spec["instances"])], inputs, outputs,
                    config=config, strict=False)
        print("pytriton worker ready", flush=True)
        triton.serve()
    return 0


# ---------------------------------------------------------------------------------------------
# Model repositories (serve-kit's Staging API) and the input data

def mlp_width(name: str) -> int | None:
    """`mlp` is 512 wide; `mlp2048` (any `mlpN`) is N wide; None for other models."""
    m = re.fullmatch(r"mlp(\d*)", name)
    return (int(m.group(1)) if m.group(1) else DIM) if m else None


def build_mlp_repository(root: Path, name: str = "mlp") -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from serve_kit.config import ModelConfig
    from serve_kit.repository import Repository

    dim = mlp_width(name)
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    w2 = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    # serve-kit's defaults for dynamic batching (max_queue_delay, max_queue_size 256).
    cfg = ModelConfig(name=name, backend="onnxruntime", max_batch_size=32,
                      inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, dim]}],
                      outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, dim]}],
                      dynamic_batching={})
    samples = np.random.default_rng(1).standard_normal((8, dim)).astype(np.float32)
    with Repository(root).new_version(name) as stage:
        (stage.dir / "model.onnx").write_bytes(model.SerializeToString())
        np.savez(stage.dir / "samples.npz", **{"input.x": samples})
        stage.commit(cfg, {"model_file": "model.onnx", "backend": "onnxruntime", "variant": "benchmark"})


def build_digits_repository(root: Path) -> None:
    cmd = [str(ROOT / ".venv/bin/serve-kit"), "optimize", "--recipe", "digits-cnn", "-t", "onnx", "-r", str(root)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=900)


def variant(src: Path, dst: Path, model: str, **update) -> None:
    """A copy of the repository whose config.yaml has `update` applied (same model files)."""
    from serve_kit.config import load_model_config
    from serve_kit.repository import atomic_write_text, dump_config

    shutil.copytree(src, dst)
    cfg = load_model_config(dst / model / "config.yaml")
    atomic_write_text(dst / model / "config.yaml", dump_config(cfg.model_copy(update=update)))


class Model:
    """One benchmarked model: its repositories, config, ONNX file and one real input sample."""

    def __init__(self, name: str, repo: Path, repo_off: Path, repo_delay0: Path):
        from serve_kit.config import load_model_config

        self.name, self.repo, self.repo_off, self.repo_delay0 = name, repo, repo_off, repo_delay0
        self.config = load_model_config(repo / name / "config.yaml")
        version = max(int(p.name) for p in (repo / name).iterdir() if p.name.isdigit())
        self.version_dir = repo / name / str(version)
        self.model_path = self.version_dir / "model.onnx"
        with np.load(self.version_dir / "samples.npz") as z:
            self.sample = {t.name: z[f"input.{t.name}"][:1].copy() for t in self.config.inputs}

    def write_input_data(self, path: Path) -> Path:
        """perf_analyzer's --input-data: the one sample, so both servers get identical bytes."""
        doc = {"data": [{name: {"content": a[0].ravel().tolist(), "shape": list(a.shape[1:])}
                         for name, a in self.sample.items()}]}
        path.write_text(json.dumps(doc))
        return path


def prepare(workdir: Path, names: list[str]) -> dict[str, Model]:
    models = {}
    for name in names:
        repo = workdir / f"{name}-repo"
        repo_off, repo_delay0 = workdir / f"{name}-nobatch-repo", workdir / f"{name}-delay0-repo"
        if not (repo / name / "config.yaml").is_file():
            shutil.rmtree(repo, ignore_errors=True)
            if mlp_width(name):
                build_mlp_repository(repo, name)
            else:
                build_digits_repository(repo)
        if not (repo_off / name / "config.yaml").is_file():
            shutil.rmtree(repo_off, ignore_errors=True)
            variant(repo, repo_off, name, dynamic_batching=None)
        if not (repo_delay0 / name / "config.yaml").is_file():
            from serve_kit.config import load_model_config

            shutil.rmtree(repo_delay0, ignore_errors=True)
            db = load_model_config(repo / name / "config.yaml").dynamic_batching
            variant(repo, repo_delay0, name, dynamic_batching=db.model_copy(update={"max_queue_delay_microseconds": 0}))
        models[name] = Model(name, repo, repo_off, repo_delay0)
    return models


# ---------------------------------------------------------------------------------------------
# Servers: one at a time, each in its own process group, stopped by PID

_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of the live processes in a process group."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:
        return 0


class Server:
    kind = ""

    def timing(self) -> dict:
        return {}

    def __init__(self, model: Model, workdir: Path):
        self.model, self.workdir = model, workdir
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0
        self.log_path = workdir / f"{self.kind}-{model.name}.log"

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 180.0) -> "Server":
        self.http_port, self.grpc_port = free_port(), free_port()
        cmd, env = self.command()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{self.model.name}/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; see {self.log_path}")
            if _get(url) == 200:
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.kind} not ready after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # The process group is the one start() created for this server alone: anything left in it
        # (tritonserver, the Python backend stub) belongs to this run.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
        self._log.close()
        time.sleep(0.5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ServeKit(Server):
    kind = "serve-kit"

    def __init__(self, model: Model, workdir: Path, repo: Path | None = None, cpus: str | None = None):
        super().__init__(model, workdir)
        self.repo, self.cpus = repo or model.repo, cpus

    def command(self):
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        return ([*pin, str(ROOT / ".venv/bin/serve-kit"), "serve", str(self.repo), "--http-port", str(self.http_port),
                 "--grpc-port", str(self.grpc_port)], dict(os.environ))


class PyTriton(Server):
    kind = "triton"
    python = ""
    threads = 1

    @property
    def timing_path(self) -> Path:
        return self.workdir / f"pytriton-{self.model.name}-timing.json"

    def timing(self) -> dict:
        try:
            return json.loads(self.timing_path.read_text())
        except (OSError, ValueError):
            return {}

    def command(self):
        cfg = self.model.config
        spec = {"model": self.model.name, "model_path": str(self.model.model_path),
                "inputs": [t.model_dump() for t in cfg.inputs], "outputs": [t.model_dump() for t in cfg.outputs],
                "output_names": [t.name for t in cfg.outputs], "max_batch_size": cfg.max_batch_size,
                "dynamic_batching": cfg.dynamic_batching.model_dump(), "instances": cfg.instance_group.count,
                "intra_op_threads": self.threads, "http_port": self.http_port, "grpc_port": self.grpc_port,
                "metrics_port": free_port(), "timing_path": str(self.timing_path)}
        spec_path = self.workdir / f"pytriton-{self.model.name}.json"
        spec_path.write_text(json.dumps(spec))
        libdir = subprocess.run([self.python, "-c", "import sysconfig;print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        return [self.python, str(Path(__file__).resolve()), "--pytriton-worker", str(spec_path)], env


# ---------------------------------------------------------------------------------------------
# Load: perf_analyzer

class Load:
    def __init__(self, perf_analyzer: str, window_ms: int, workdir: Path):
        self.exe, self.window_ms, self.workdir = perf_analyzer, window_ms, workdir
        self.env = dict(os.environ)
        cuda = ROOT / ".venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib"
        self.env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cuda), self.env.get("LD_LIBRARY_PATH")) if p)

    def run(self, server: Server, protocol: str, concurrency: int, window_ms: int | None = None,
            cpus: str | None = None) -> dict:
        window_ms = window_ms or self.window_ms
        port = server.http_port if protocol == "http" else server.grpc_port
        csv_path = self.workdir / "pa.csv"
        csv_path.unlink(missing_ok=True)
        data = server.model.write_input_data(self.workdir / f"input-{server.model.name}.json")
        pin = ["taskset", "-c", cpus] if cpus else []
        cmd = [*pin, self.exe, "-m", server.model.name, "-u", f"127.0.0.1:{port}", "-i", protocol,
               "--concurrency-range", str(concurrency), "--input-data", str(data),
               "--measurement-mode", "time_windows", "-p", str(window_ms),
               # exactly 3 windows: the stability check always passes at the third
               "-s", "1000000", "-r", "3", "--percentile=99", "-f", str(csv_path)]
        if protocol == "http":
            cmd += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
        load_before = os.getloadavg()[0]
        timing_before = server.timing() if isinstance(server, PyTriton) else None
        cpu_server = group_cpu_seconds(server.proc.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=3 * window_ms / 1000 * 4 + 60)
        wall = time.monotonic() - t0
        cpu_server = group_cpu_seconds(server.proc.pid) - cpu_server
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_client = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        if p.returncode != 0 or not csv_path.is_file():
            raise RuntimeError(f"perf_analyzer failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n"
                               f"{p.stderr[-2000:]}")
        with open(csv_path) as f:
            row = next(csv.DictReader(f))
        out = {"throughput": float(row["Inferences/Second"]),
               "p50_ms": float(row["p50 latency"]) / 1e3, "p90_ms": float(row["p90 latency"]) / 1e3,
               "p99_ms": float(row["p99 latency"]) / 1e3, "wall_s": round(wall, 2), "loadavg_1m": load_before,
               # cores busy on average over the whole perf_analyzer run (its 3 windows and the
               # ramp-up around them), and CPU time per inference at the measured rate
               "server_cores": cpu_server / wall, "client_cores": cpu_client / wall}
        requests = out["throughput"] * wall
        if requests:
            out["server_cpu_us_per_inf"] = cpu_server / requests * 1e6
            out["client_cpu_us_per_inf"] = cpu_client / requests * 1e6
        if timing_before is not None:
            time.sleep(0.25)
            after = server.timing()
            batches = after.get("batches", 0) - timing_before.get("batches", 0)
            if batches > 0:
                out["callable_ort_us_per_batch"] = (after["run_ns"] - timing_before["run_ns"]) / batches / 1e3
        breakdown = re.search(r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ "
                              r"compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec",
                              p.stdout)
        if breakdown:
            names = ("server_request_us", "server_overhead_us", "server_queue_us", "server_compute_input_us",
                     "server_compute_infer_us", "server_compute_output_us")
            out.update({k: int(v) for k, v in zip(names, breakdown.groups())})
        inferences = re.search(r"Server:\s*\n\s*Inference count: (\d+)\s*\n\s*Execution count: (\d+)", p.stdout)
        if inferences and int(inferences.group(2)):
            out["mean_batch"] = int(inferences.group(1)) / int(inferences.group(2))
        return out

    def warm_up(self, server: Server) -> None:
        try:
            self.run(server, "http", 16, window_ms=500)
        except RuntimeError as e:  # a warm-up is thrown away anyway; say why it failed
            say(f"  (warm-up: {str(e).strip().splitlines()[-1]})")


# ---------------------------------------------------------------------------------------------
# Sections

def say(*a) -> None:
    print(*a, flush=True)


def compare(models, load, workdir, args) -> list[dict]:
    rows = []
    for model in models.values():
        for r in range(args.rounds):
            servers = [ServeKit, PyTriton] if r % 2 == 0 else [PyTriton, ServeKit]
            for cls in servers:
                with cls(model, workdir) as server:
                    load.warm_up(server)
                    for protocol in args.protocols:
                        for c in args.concurrency:
                            m = load.run(server, protocol, c)
                            rows.append({"model": model.name, "server": server.kind, "round": r,
                                         "protocol": protocol, "concurrency": c, **m})
                            say(f"  {model.name:6} round {r} {server.kind:9} {protocol:4} c={c:<3} "
                                f"{m['throughput']:8.0f} inf/s  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms"
                                f"  batch {m.get('mean_batch', 0):4.1f}  load {m['loadavg_1m']:.1f}")
    return rows


BATCHING_MODES = ("on", "off", "on-delay0")
"""on: the model's config.yaml; off: `dynamic_batching: null`; on-delay0: the same batching with
max_queue_delay_microseconds 0 (a batch is whatever queued while the instance was busy)."""
PINNED_MODES = ("on-pinned", "off-pinned")
"""With --pinned: on and off again, the server on CPU 0 and perf_analyzer on CPU 1, so that neither
takes the other's core and the server's event loop and its model thread share one core."""


def batching(models, load, workdir, args) -> list[dict]:
    rows = []
    all_modes = BATCHING_MODES + (PINNED_MODES if args.pinned else ())
    for model in models.values():
        for r in range(args.rounds):
            modes = all_modes[r % len(all_modes):] + all_modes[:r % len(all_modes)]
            modes = modes if r % 2 == 0 else modes[::-1]
            for mode in modes:
                pinned = mode.endswith("-pinned")
                repo = {"on": model.repo, "off": model.repo_off,
                        "on-delay0": model.repo_delay0}[mode.removesuffix("-pinned")]
                with ServeKit(model, workdir, repo, cpus="0" if pinned else None) as server:
                    load.warm_up(server)
                    for protocol in args.protocols:
                        m = load.run(server, protocol, 16, cpus="1" if pinned else None)
                        rows.append({"model": model.name, "mode": mode, "round": r, "protocol": protocol,
                                     "concurrency": 16, **m})
                        say(f"  {model.name:6} round {r} batching {mode:10} {protocol:4} "
                            f"{m['throughput']:8.0f} inf/s  p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms"
                            f"  batch {m.get('mean_batch', 0):4.1f}  server {m['server_cores']:.2f} cores")
        rows.extend(execution_costs(model, args, [x for x in rows if x["model"] == model.name and x["mode"] == "on"]))
    return rows


def execution_costs(model, args, on_rows: list[dict]) -> list[dict]:
    """What batching can save at most: the model's own in-process execution time per row at batch 1
    and at the mean batch the server formed with batching on (same backend, same thread count).

    Two bounds on the on/off ratio follow from it (see summarize):
      compute bound: batch-1 time per row / batched time per row; a server and client that cost
        nothing per request could not get more out of batching than that.
      shared-cores bound: (client CPU per inference off + batch-1 time) / (client CPU per inference
        on + batched time per row). With the load generator on the same cores and both modes
        CPU-bound, a server that costs nothing could not exceed it either.
    """
    from serve_kit.runtime.backends import load_backend

    batches = sorted({max(1, round(x["mean_batch"])) for x in on_rows if x.get("mean_batch")} | {1})
    backend = load_backend("onnxruntime", model.model_path, [t.name for t in model.config.outputs],
                           {"intra_op_threads": args.threads})
    rows = []
    for b in batches:
        x = {k: np.repeat(v, b, axis=0) for k, v in model.sample.items()}
        in_process_p50(backend, x, 0.3)
        per_run_ms = in_process_p50(backend, x, 1.0)
        rows.append({"model": model.name, "mode": "in-process", "batch": b, "run_us": per_run_ms * 1e3,
                     "per_row_us": per_run_ms * 1e3 / b})
        say(f"  {model.name:6} in-process batch {b:3d}: {per_run_ms * 1e3:7.1f} us per run, "
            f"{per_run_ms * 1e3 / b:6.1f} us per row")
    del backend
    return rows


def in_process_p50(backend, x: dict, seconds: float) -> float:
    times = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        backend.infer(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


LATENCY_CONFIGS = ("configured", "delay0")
"""configured: the model's config.yaml, whose max_queue_delay_microseconds a lone request waits out
(as in Triton); delay0: the same with max_queue_delay_microseconds 0."""


def latency(models, load, workdir, args) -> list[dict]:
    from serve_kit.runtime.backends import load_backend

    rows = []
    for model in models.values():
        backend = load_backend("onnxruntime", model.model_path, [t.name for t in model.config.outputs],
                               {"intra_op_threads": args.threads})
        in_process_p50(backend, model.sample, 0.5)
        for config in LATENCY_CONFIGS:
            with ServeKit(model, workdir, model.repo if config == "configured" else model.repo_delay0) as server:
                load.warm_up(server)
                for r in range(args.rounds):
                    order = ["in-process", "served"] if r % 2 == 0 else ["served", "in-process"]
                    row = {"model": model.name, "config": config, "round": r}
                    for what in order:
                        if what == "in-process":
                            row["in_process_p50_ms"] = in_process_p50(backend, model.sample,
                                                                      3 * args.window_ms / 1000)
                        else:
                            for protocol in args.protocols:
                                m = load.run(server, protocol, 1)
                                row[f"{protocol}_p50_ms"] = m["p50_ms"]
                                row[f"{protocol}_p99_ms"] = m["p99_ms"]
                                row[f"{protocol}_server_queue_us"] = m.get("server_queue_us")
                    rows.append(row)
                    say(f"  {model.name:6} {config:10} round {r} in-process {row['in_process_p50_ms']:.3f} ms  "
                        + "  ".join(f"{p} p50 {row[f'{p}_p50_ms']:.3f} ms (queue {row[f'{p}_server_queue_us']} us)"
                                    for p in args.protocols))
        del backend
    return rows


# ---------------------------------------------------------------------------------------------
# Summary

def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(results: dict, args) -> dict:
    summary: dict = {}
    rows = results.get("compare", [])
    comp = []
    for model in args.models:
        for protocol in args.protocols:
            for c in args.concurrency:
                cell = {"model": model, "protocol": protocol, "concurrency": c}
                for kind in ("serve-kit", "triton"):
                    sel = [x for x in rows if (x["model"], x["protocol"], x["concurrency"], x["server"])
                           == (model, protocol, c, kind)]
                    if not sel:
                        continue
                    cell[kind] = {k: med([x[k] for x in sel]) for k in ("throughput", "p50_ms", "p99_ms")}
                    for k in ("mean_batch", "server_queue_us", "server_compute_infer_us", "callable_ort_us_per_batch",
                              "server_cores", "server_cpu_us_per_inf", "client_cpu_us_per_inf"):
                        if any(k in x for x in sel):
                            cell[kind][k] = med([x[k] for x in sel if k in x])
                    cell[kind]["throughput_range"] = [min(x["throughput"] for x in sel),
                                                      max(x["throughput"] for x in sel)]
                if "serve-kit" in cell and "triton" in cell:
                    s, t = cell["serve-kit"], cell["triton"]
                    cell["throughput_ratio"] = s["throughput"] / t["throughput"]
                    cell["target_met"] = s["throughput"] >= t["throughput"] and s["p99_ms"] <= t["p99_ms"]
                    comp.append(cell)
    summary["compare"] = comp
    rows = results.get("batching", [])
    bat = []
    for model in args.models:
        costs = {x["batch"]: x["per_row_us"] for x in rows if x["model"] == model and x["mode"] == "in-process"}
        for protocol in args.protocols:
            sel = {mode: sorted((x for x in rows
                                 if (x["model"], x.get("protocol"), x["mode"]) == (model, protocol, mode)),
                                key=lambda x: x["round"]) for mode in BATCHING_MODES + PINNED_MODES}
            if not (sel["on"] and sel["off"]):
                continue
            cell = {"model": model, "protocol": protocol}
            for mode, xs in sel.items():
                if xs:
                    cell[mode] = {k: med([x[k] for x in xs if k in x])
                                  for k in ("throughput", "p50_ms", "p99_ms", "mean_batch", "server_cores",
                                            "server_cpu_us_per_inf", "client_cpu_us_per_inf",
                                            "server_compute_infer_us")}
            for mode, off in (("on", "off"), ("on-delay0", "off"), ("on-pinned", "off-pinned")):
                if sel[mode] and sel[off]:
                    ratios = [a["throughput"] / b["throughput"] for a, b in zip(sel[mode], sel[off])]
                    cell[f"{mode}_ratio"] = med(ratios)
                    cell[f"{mode}_ratios"] = ratios
            cell["target_met"] = cell["on_ratio"] >= 3.0
            mean_batch = cell["on"].get("mean_batch", float("nan"))  # nan: perf_analyzer gave no server statistics
            batch = max(1, round(mean_batch)) if math.isfinite(mean_batch) else None
            if 1 in costs and batch in costs:
                e1, eb = costs[1], costs[batch]
                cell["bounds"] = {"batch": batch, "batch1_us_per_row": e1, "batched_us_per_row": eb,
                                  "compute_bound": e1 / eb}
                c_on, c_off = cell["on"].get("client_cpu_us_per_inf"), cell["off"].get("client_cpu_us_per_inf")
                if c_on and c_off:
                    cell["bounds"]["shared_cores_bound"] = (c_off + e1) / (c_on + eb)
            bat.append(cell)
    summary["batching"] = bat
    rows = results.get("latency", [])
    lat = []
    for model in args.models:
        for config in LATENCY_CONFIGS:
            sel = [x for x in rows if x["model"] == model and x["config"] == config]
            if not sel:
                continue
            cell = {"model": model, "config": config, "in_process_p50_ms": med([x["in_process_p50_ms"] for x in sel])}
            for protocol in args.protocols:
                cell[f"{protocol}_p50_ms"] = med([x[f"{protocol}_p50_ms"] for x in sel])
                cell[f"{protocol}_overhead_ms"] = med([x[f"{protocol}_p50_ms"] - x["in_process_p50_ms"] for x in sel])
                cell[f"{protocol}_server_queue_us"] = med([x[f"{protocol}_server_queue_us"] or 0 for x in sel])
                cell[f"{protocol}_target_met"] = cell[f"{protocol}_overhead_ms"] <= 0.5
            lat.append(cell)
    summary["latency"] = lat
    return summary


def print_tables(summary: dict) -> None:
    if summary.get("compare"):
        say("\nserve-kit vs Triton (pytriton), medians over rounds; throughput in inferences/s, latency in ms")
        say("(batch: mean rows per execution; cpu: server CPU microseconds per inference, all its processes)")
        say(f"{'model':7} {'proto':5} {'conc':>4} | {'serve-kit inf/s':>15} {'p50':>6} {'p99':>6} {'batch':>5} {'cpu':>5} | "
            f"{'Triton inf/s':>12} {'p50':>6} {'p99':>6} {'batch':>5} {'cpu':>5} | {'ratio':>6} target")
        for c in summary["compare"]:
            s, t = c["serve-kit"], c["triton"]
            say(f"{c['model']:7} {c['protocol']:5} {c['concurrency']:>4} | {s['throughput']:15,.0f} {s['p50_ms']:6.2f} "
                f"{s['p99_ms']:6.2f} {s.get('mean_batch', 0):5.1f} {s.get('server_cpu_us_per_inf', 0):5.0f} | "
                f"{t['throughput']:12,.0f} {t['p50_ms']:6.2f} {t['p99_ms']:6.2f} {t.get('mean_batch', 0):5.1f} "
                f"{t.get('server_cpu_us_per_inf', 0):5.0f} | {c['throughput_ratio']:5.2f}x "
                f"{'met' if c['target_met'] else 'MISSED'}")
    if summary.get("batching"):
        say("\nserve-kit dynamic batching on vs off, concurrency 16 (target: on >= 3x off)")
        say(f"{'model':7} {'proto':5} | {'on inf/s':>9} {'p99':>6} {'batch':>5} | {'off inf/s':>9} {'p99':>6} | "
            f"{'ratio':>6} target | {'delay0 inf/s':>12} {'p99':>6} {'batch':>5} {'ratio':>6}")
        for b in summary["batching"]:
            on, off, d0 = b["on"], b["off"], b.get("on-delay0")
            line = (f"{b['model']:7} {b['protocol']:5} | {on['throughput']:9,.0f} {on['p99_ms']:6.2f} "
                    f"{on['mean_batch']:5.1f} | {off['throughput']:9,.0f} {off['p99_ms']:6.2f} | "
                    f"{b['on_ratio']:5.2f}x {'met   ' if b['target_met'] else 'MISSED'}")
            if d0:
                line += (f" | {d0['throughput']:12,.0f} {d0['p99_ms']:6.2f} {d0['mean_batch']:5.1f} "
                         f"{b['on-delay0_ratio']:5.2f}x")
            say(line)
        say("\nwhat batching could give at most (in-process execution per row, batch 1 vs the mean batch with\n"
            "batching on; compute bound: server and client free; shared-cores bound: a server that costs\n"
            "nothing, perf_analyzer's measured CPU per inference on the same cores); pinned: server on CPU 0,\n"
            "perf_analyzer on CPU 1")
        say(f"{'model':7} {'proto':5} | {'batch':>5} {'us/row @1':>9} {'us/row':>7} {'compute':>8} {'shared':>7} | "
            f"{'client us/inf on/off':>20} | {'pinned on / off inf/s':>22} {'ratio':>6}")
        for b in summary["batching"]:
            bd = b.get("bounds")
            if not bd:
                continue
            on, off = b["on"], b["off"]
            line = (f"{b['model']:7} {b['protocol']:5} | {bd['batch']:5d} {bd['batch1_us_per_row']:9.1f} "
                    f"{bd['batched_us_per_row']:7.1f} {bd['compute_bound']:7.2f}x "
                    f"{bd.get('shared_cores_bound', float('nan')):6.2f}x | "
                    f"{on.get('client_cpu_us_per_inf', 0):9.0f} / {off.get('client_cpu_us_per_inf', 0):<8.0f} |")
            if "on-pinned_ratio" in b:
                line += (f" {b['on-pinned']['throughput']:10,.0f} / {b['off-pinned']['throughput']:<9,.0f} "
                         f"{b['on-pinned_ratio']:5.2f}x")
            say(line)
    if summary.get("latency"):
        say("\nconcurrency 1: served p50 vs in-process backend.infer median (target: within 0.5 ms)")
        for l in summary["latency"]:
            parts = [f"{p} {l[f'{p}_p50_ms']:.3f} ms (+{l[f'{p}_overhead_ms']:.3f}, queue "
                     f"{l[f'{p}_server_queue_us']:.0f} us, {'met' if l[f'{p}_target_met'] else 'MISSED'})"
                     for p in ("http", "grpc") if f"{p}_p50_ms" in l]
            say(f"{l['model']:7} {l['config']:10} in-process {l['in_process_p50_ms']:.3f} ms; " + "; ".join(parts))


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "available_cores": len(os.sched_getaffinity(0)), "cpu": cpu,
            "python": platform.python_version(), "kernel": platform.release()}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--pytriton-worker":
        return pytriton_worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,digits", type=lambda s: s.split(","))
    p.add_argument("--sections", default="compare,batching,latency", type=lambda s: s.split(","))
    p.add_argument("--protocols", default="http,grpc", type=lambda s: s.split(","))
    p.add_argument("--concurrency", default="8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=4, help="rounds per section; servers alternate between rounds")
    p.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer measurement window (3 per run)")
    p.add_argument("--workdir", type=Path, default=None, help="repositories and logs (kept; reused when present)")
    p.add_argument("--bench-python", default=str(ROOT / ".bench-venv/bin/python"), help="Python with pytriton")
    p.add_argument("--perf-analyzer", default=str(ROOT / ".venv/bin/perf_analyzer"))
    p.add_argument("--out", type=Path, default=None, help="JSON results (default WORKDIR/serve_vs_triton.json)")
    p.add_argument("--pinned", action="store_true",
                   help="batching: also run on and off with the server on CPU 0 and perf_analyzer on CPU 1")
    args = p.parse_args()
    for what, given, known in (("--sections", args.sections, ("compare", "batching", "latency")),
                               ("--protocols", args.protocols, ("http", "grpc"))):
        unknown = [x for x in given if x not in known]
        if unknown:
            p.error(f"{what}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if args.pinned and not {0, 1} <= os.sched_getaffinity(0):
        p.error(f"--pinned runs the server on CPU 0 and perf_analyzer on CPU 1, but this process may use "
                f"CPUs {sorted(os.sched_getaffinity(0))} only; run without --pinned, or where both are allowed")

    from serve_kit.runtime.models import available_cores, default_intra_op_threads

    args.threads = default_intra_op_threads(available_cores(), 1)
    PyTriton.python, PyTriton.threads = args.bench_python, args.threads
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve-vs-triton-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    os.environ.setdefault(ACCESS_TOKEN_ENV, os.urandom(16).hex())
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "intra_op_threads": args.threads,
            "window_ms": args.window_ms, "windows_per_run": 3, "rounds": args.rounds,
            "concurrency": args.concurrency, "protocols": args.protocols, "workdir": str(workdir)}
    say(f"workdir {workdir}; {info['machine']['nproc']} cores ({info['machine']['cpu']}); "
        f"intra-op threads {args.threads} on both servers")
    models = prepare(workdir, args.models)
    for m in models.values():
        db = m.config.dynamic_batching
        info.setdefault("models", {})[m.name] = {
            "input": [t.model_dump() for t in m.config.inputs], "max_batch_size": m.config.max_batch_size,
            "dynamic_batching": db.model_dump() if db else None, "instances": m.config.instance_group.count}
    load = Load(args.perf_analyzer, args.window_ms, workdir)
    results: dict = {"info": info}
    out = args.out or workdir / "serve_vs_triton.json"
    for section in args.sections:
        say(f"\n== {section}")
        t0 = time.monotonic()
        results[section] = {"compare": compare, "batching": batching, "latency": latency}[section](
            models, load, workdir, args)
        say(f"   ({time.monotonic() - t0:.0f} s)")
        results["summary"] = summarize(results, args)
        out.write_text(json.dumps(results, indent=2))
    print_tables(results["summary"])
    say(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
