"""Running a built image and talking to it as a client would (tritonclient, HTTP and gRPC)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from serve_kit.repository import SAMPLES, read_samples

# Plain helpers live here, not in conftest.py: test modules import them, and `import conftest`
# picks whichever conftest another test folder loaded first.
RUN_ID = uuid.uuid4().hex[:8]
CLI = [sys.executable, "-c", "from serve_kit.cli import main; main()"]


def sk(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`serve-kit ARGS` as a subprocess (what a user or CI runs)."""
    e = dict(os.environ, COLUMNS="200")
    e.update(env or {})
    return subprocess.run([*CLI, *map(str, args)], env=e, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleanup_images(client, refs):
    """Remove images by ID or reference (all their tags and digests); ones already gone are fine."""
    for ref in refs:
        try:
            client.images.remove(ref, force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


@contextlib.contextmanager
def running(client, image: str) -> Iterator[tuple[int, int]]:
    """Run `image` with its ports published on random 127.0.0.1 ports until ready; (http, grpc) ports.
    The container is removed at the end."""
    container = client.containers.run(image, detach=True, ports={"8000/tcp": ("127.0.0.1", None),
                                                                 "8001/tcp": ("127.0.0.1", None)})
    try:
        container.reload()
        ports = container.attrs["NetworkSettings"]["Ports"]
        http, grpc = int(ports["8000/tcp"][0]["HostPort"]), int(ports["8001/tcp"][0]["HostPort"])
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            container.reload()
            assert container.status == "running", container.logs().decode()[-3000:]
            assert time.monotonic() < deadline, "the image was not ready in 90 s: " + container.logs().decode()[-3000:]
            time.sleep(0.25)
        yield http, grpc
    finally:
        container.remove(force=True)


def samples(repo: Path, model: str = "digits", version: int = 1) -> tuple[dict, dict]:
    return read_samples(repo / model / str(version) / SAMPLES)


def host_outputs(model_file: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same model file run by ONNX Runtime here (what the image must reproduce)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs)))


def triton_http(port: int, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_ready() and client.is_model_ready(model)
        ins = []
        for name, x in inputs.items():
            i = httpclient.InferInput(name, list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=True)
            ins.append(i)
        res = client.infer(model, ins, outputs=[httpclient.InferRequestedOutput(output, binary_data=True)])
        return res.as_numpy(output)
    finally:
        client.close()


def triton_grpc(port: int, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        ins = []
        for name, x in inputs.items():
            i = grpcclient.InferInput(name, list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            ins.append(i)
        return client.infer(model, ins, outputs=[grpcclient.InferRequestedOutput(output)]).as_numpy(output)
    finally:
        client.close()


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
