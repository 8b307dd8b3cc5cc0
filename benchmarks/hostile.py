"""A well-behaved client's latency while one hostile client floods the server (issue 13).

Question: how much does one hostile client slow everyone else down? The well-behaved client sends
Open Inference Protocol requests back to back on one keep-alive connection (binary-tensor and JSON,
alternately) to a small MLP built here with onnx.helper; its p50/p99 are measured

  quiet   with nobody else on the server,
  heads   while a hostile client streams an endless request head (a header value, as fast as it
          can; reconnecting whenever the server closes on it),
  json    while a hostile client sends big JSON bodies back to back (--json-mb each; every one
          is refused: its data does not fit the model's shape).

The server is `python -m serve_kit serve` run with PYTHONPATH=--tree, so the same script measures
another tree's server ("before": a checkout of main at bf260f5; "after": this one):

    git worktree add /tmp/before bf260f5
    .venv/bin/python benchmarks/hostile.py --tree /tmp/before --out before.json
    .venv/bin/python benchmarks/hostile.py --out after.json

The repository is written by the tree's own code (its format is the one that tree reads). The
hostile client is a separate process, so that it does not take the measuring client's GIL.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D_IN, HIDDEN, D_OUT = 64, 256, 16


def write_repository(path: Path) -> None:
    """The MLP repository, written with the serve_kit on sys.path (the tree under test)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from serve_kit.config import ModelConfig
    from serve_kit.repository import Repository

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((D_IN, HIDDEN)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, D_OUT)) / 16).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D_OUT])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    cfg = ModelConfig(name="mlp", backend="onnxruntime", max_batch_size=8,
                      inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, D_IN]}],
                      outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, D_OUT]}],
                      dynamic_batching={"max_queue_delay_microseconds": 100})
    with Repository(path).new_version("mlp") as stage:
        (stage.dir / "model.onnx").write_bytes(model.SerializeToString())
        stage.commit(cfg, {"model_file": "model.onnx", "backend": "onnxruntime", "variant": "fp32"})


def tree_env(tree: Path) -> dict[str, str]:
    # Run with cwd=tree too: `python -m` puts the working directory ahead of PYTHONPATH, so started
    # from another checkout it would serve that checkout's code instead.
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def start_server(tree: Path, repo: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "serve_kit", "--json", "serve", str(repo), "--http-port", "0",
                             "--no-grpc"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=tree_env(tree), cwd=tree)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"the server of {tree} did not start (exit {proc.wait()})")
    info = json.loads(line)
    return proc, int(info["http"].rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------------
# The hostile clients (each in its own process until terminated)


def flood_heads(port: int) -> None:
    chunk = b"a" * 65536
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"GET /v2/models/mlp HTTP/1.1\r\nHost: x\r\nX-Endless: ")
                while True:
                    s.sendall(chunk)
        except OSError:
            time.sleep(0.001)  # closed on us (the head limit): again


def flood_json(port: int, megabytes: float) -> None:
    # One input whose data holds far more values than its shape: refused by every server (400),
    # but only after the body is read and parsed: the cost the issue measured.
    n = int(megabytes * 1e6 / 4)
    body = ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1,%d],"data":[' % D_IN
            + ",".join(["0.5"] * n) + "]}]}").encode()
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            while True:
                conn.request("POST", "/v2/models/mlp/infer", body=body,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.getheader("Connection", "").lower() == "close":
                    break
            conn.close()
        except OSError:
            time.sleep(0.001)


# ---------------------------------------------------------------------------------------------
# The well-behaved client


def measure(port: int, seconds: float) -> dict[str, dict]:
    import numpy as np

    x = np.random.default_rng(1).standard_normal((1, D_IN)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, D_IN],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    bodies = {
        "binary": (header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"}),
        "json": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, D_IN],
                                         "data": x.ravel().tolist()}]}).encode(),
                 {"Content-Type": "application/json"}),
    }
    lat: dict[str, list[float]] = {k: [] for k in bodies}
    errors: dict[str, int] = {k: 0 for k in bodies}
    conn = None
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        kind = "binary" if i % 2 == 0 else "json"
        i += 1
        body, headers = bodies[kind]
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v2/models/mlp/infer", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors[kind] += 1
        except OSError:
            errors[kind] += 1
            conn = None
            continue
        lat[kind].append(time.monotonic() - t0)
    if conn is not None:
        conn.close()
    out = {}
    for kind, values in lat.items():
        values.sort()
        out[kind] = {"requests": len(values), "errors": errors[kind],
                     "p50_ms": round(statistics.median(values) * 1e3, 3) if values else None,
                     "p99_ms": round(values[int(0.99 * (len(values) - 1))] * 1e3, 3) if values else None,
                     "max_ms": round(values[-1] * 1e3, 3) if values else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree whose serve_kit runs the server")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--json-mb", type=float, default=60.0, help="size of each hostile JSON body (MB)")
    ap.add_argument("--phases", default="quiet,heads,json")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--write-repo", type=Path, help=argparse.SUPPRESS)  # internal: run under --tree
    args = ap.parse_args()
    if args.write_repo:
        write_repository(args.write_repo)
        return
    tree = args.tree.resolve()
    with tempfile.TemporaryDirectory(prefix="sk-hostile-") as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-repo", str(repo)], check=True,
                       env=tree_env(tree))
        proc, port = start_server(tree, repo)
        results: dict = {"tree": str(tree), "seconds": args.seconds, "json_mb": args.json_mb, "phases": {}}
        try:
            measure(port, 1.0)  # warm the connection and the server
            for phase in args.phases.split(","):
                hostile = None
                if phase == "heads":
                    hostile = multiprocessing.Process(target=flood_heads, args=(port,), daemon=True)
                elif phase == "json":
                    hostile = multiprocessing.Process(target=flood_json, args=(port, args.json_mb), daemon=True)
                elif phase != "quiet":
                    raise SystemExit(f"unknown phase {phase!r}: quiet, heads or json")
                if hostile is not None:
                    hostile.start()
                    time.sleep(1.0 if phase == "heads" else 2.0)  # the flood is under way
                try:
                    results["phases"][phase] = measure(port, args.seconds)
                finally:
                    if hostile is not None:
                        hostile.terminate()
                        hostile.join(10)
                        time.sleep(0.5)
                print(f"{phase:6s} " + "  ".join(
                    f"{k}: p50 {v['p50_ms']} ms p99 {v['p99_ms']} ms max {v['max_ms']} ms "
                    f"({v['requests']} ok, {v['errors']} errors)" for k, v in results["phases"][phase].items()),
                    flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
