"""A well-behaved client's latency while one hostile client floods `serve-kit serve` (issue 13).

    python benchmarks/hostile_flood.py [--seconds 10] [--json-mb 60] [--out results/hostile_flood.json]

Starts `serve-kit serve` (the code on PYTHONPATH: run it once with main's, once with yours) on a
one-model repository (a 4-wide identity, ONNX Runtime), then measures a good client (one keep-alive
connection, small binary inferences back to back) for --seconds with no flood, and again while a
hostile process, as fast as it can, alternates between (a) one connection streaming an endless
header and (b) JSON bodies of --json-mb (numbers, some NaN), reconnecting whenever cut off. Prints
and writes p50/p99/max of the good client in each phase, its answers, and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _repo(root: Path) -> None:
    from onnx import TensorProto, helper

    from serve_kit.config import ModelConfig
    from serve_kit.repository import Repository

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    cfg = ModelConfig(name="ident", backend="onnxruntime", max_batch_size=8,
                      inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                      outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}])
    with Repository(root).new_version("ident") as stage:
        (stage.dir / "model.onnx").write_bytes(model.SerializeToString())
        stage.commit(cfg, {"model_file": "model.onnx", "backend": "onnxruntime", "variant": "bench"})


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    buf[:] = rest[length:]
    return status


def _good_client(port: int, seconds: float) -> dict:
    x = np.ones((1, 4), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    body = header + x
    req = (f"POST /v2/models/ident/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: {len(header)}\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    lat, errors = [], 0
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    buf = bytearray()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            sock.sendall(req)
            status = _read_response(sock, buf)
        except OSError:
            errors += 1
            sock.close()
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            buf.clear()
            continue
        lat.append(time.monotonic() - t0)
        errors += status != 200
    sock.close()
    a = np.array(lat) * 1000
    return {"answers": len(lat), "errors": errors, "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


def _flood(port: int, json_mb: float, stop) -> None:
    n = int(json_mb * 1024 * 1024 / 6)
    data = b"[" + b"1.5, " * (n - 2) + b"NaN, 2.5]"
    doc = b'{"inputs": [{"name": "x", "shape": [%d, 4], "datatype": "FP32", "data": %s}]}' % (n // 4, data)
    big = (f"POST /v2/models/ident/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(doc)}\r\n\r\n").encode() + doc
    junk = b"h" * 65536
    i = 0
    while not stop.is_set():
        i += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if i % 2:
                    s.sendall(b"GET /v2 HTTP/1.1\r\nX-Flood: ")
                    t0 = time.monotonic()
                    while not stop.is_set() and time.monotonic() - t0 < 40:
                        s.sendall(junk)
                else:
                    s.sendall(big)
                    s.recv(4096)
        except OSError:
            pass


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--json-mb", type=float, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        _repo(root)
        proc = subprocess.Popen([sys.executable, "-c", "from serve_kit.cli import main; main()", "--json", "serve",
                                 str(root), "--http-port", "0", "--no-grpc"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ))
        try:
            ready = json.loads(proc.stdout.readline())
            port = int(ready["http"].rsplit(":", 1)[1])
            baseline = _good_client(port, args.seconds)
            stop = mp.Event()
            flooder = mp.Process(target=_flood, args=(port, args.json_mb, stop), daemon=True)
            flooder.start()
            time.sleep(1.0)
            peak = [0]
            flooded = _good_client(port, args.seconds)
            peak[0] = _rss_kb(proc.pid)
            stop.set()
            flooder.join(10)
            if flooder.is_alive():
                flooder.kill()
            after = _good_client(port, 2)
            result = {"code": os.environ.get("PYTHONPATH", "installed"), "baseline": baseline, "flooded": flooded,
                      "after": after, "server_rss_mb_end_of_flood": round(peak[0] / 1024, 1)}
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
