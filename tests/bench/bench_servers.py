"""Servers for the bench tests: a tiny Open Inference Protocol endpoint whose timing the test
controls (a fixed service time, an injected stall), plus helpers to run `serve-kit serve` and
`serve-kit bench` as subprocesses.

The tiny server is a real HTTP/1.1 server on 127.0.0.1 (asyncio streams on its own thread): it
answers the model metadata and inference endpoints the load generator uses, with a fixed JSON
response, each after `delay_s`; a stall holds every answer due in [start, start + stall_s) until
the stall ends, like a garbage-collection pause or a blocked event loop would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
RUNTIME_TESTS = TESTS / "runtime"


class TinyServer:
    """A minimal OIP v2 HTTP endpoint for model `tiny` (input x FP32 [-1, 4], output y).

    `stall_after_s`/`stall_s`: the stall starts that long after the load began (the second
    inference request; the first is the bench's pre-flight check) and lasts `stall_s`.
    """

    def __init__(self, delay_s: float = 0.0, stall_after_s: float | None = None, stall_s: float = 1.0,
                 max_batch_size: int = 8):
        self.delay_s = delay_s
        self.stall_after_s = stall_after_s
        self.stall_s = stall_s
        self.max_batch_size = max_batch_size
        self.requests = 0
        self.load_start: float | None = None
        self.stall_window: tuple[float, float] | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True, name="tiny-oip-server")
        self.body = json.dumps({"model_name": "tiny", "model_version": "1",
                                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4],
                                             "data": [0.0, 1.0, 2.0, 3.0]}]}).encode()

    def start(self) -> "TinyServer":
        self.thread.start()
        assert self.ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)

    def _main(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stopping = asyncio.Event()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            async with server:
                await self.stopping.wait()

        asyncio.run(main())

    def _metadata(self) -> bytes:
        return json.dumps({"name": "tiny", "versions": ["1"], "platform": "test",
                           "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                           "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}).encode()

    async def _answer_time(self, now: float) -> float:
        due = now + self.delay_s
        self.requests += 1
        if self.requests == 2:
            self.load_start = now
            if self.stall_after_s is not None:
                start = now + self.stall_after_s
                self.stall_window = (start, start + self.stall_s)
        if self.stall_window and self.stall_window[0] <= due < self.stall_window[1]:
            due = self.stall_window[1]
        return due

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                if length:
                    await reader.readexactly(length)
                if method == "POST" and path.endswith("/infer"):
                    due = await self._answer_time(time.monotonic())
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    status, body = 200, self.body
                elif method == "GET" and path == "/v2/models/tiny":
                    status, body = 200, self._metadata()
                elif method == "GET" and path == "/v2/models/tiny/config":
                    status, body = 200, json.dumps({"name": "tiny", "max_batch_size": self.max_batch_size}).encode()
                else:
                    status, body = 404, json.dumps({"error": f"no route {path}"}).encode()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(RUNTIME_TESTS), str(TESTS), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["COLUMNS"] = "200"
    return e


def bench(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """`serve-kit bench ARGS` as a user runs it (add `--json` first for a report on stdout)."""
    exe = Path(sys.executable).parent / "serve-kit"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env())


def bench_json(args: list[str], timeout: float = 180) -> dict:
    run = bench(["--json", "bench", *args], timeout)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(run.stdout)


class ServeProcess:
    """`serve-kit serve REPO` on free ports (HTTP and gRPC), stopped with SIGTERM."""

    def __init__(self, repository: Path, *, test_backends: bool = False):
        sys.path.insert(0, str(RUNTIME_TESTS))
        from rt_server import start_cli, wait_ready

        self.proc = start_cli([str(repository), "--http-port", "0", "--grpc-port", "0"], test_backends=test_backends)
        info = wait_ready(self.proc)
        self.http = info["http"]
        self.grpc = f"grpc://127.0.0.1:{info['grpc_port']}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)
