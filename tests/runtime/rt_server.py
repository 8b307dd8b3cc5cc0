"""Running the real server for the HTTP and fault tests: in-process (`serve()` on a thread with its
own event loop) or as a `serve-kit serve` subprocess, plus a raw HTTP/1.1 client for what
tritonclient cannot send (pipelining, malformed requests, truncated bodies)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve_kit.runtime.server import ServeOptions, serve

TESTS = Path(__file__).resolve().parents[1]
RUNTIME_TESTS = Path(__file__).resolve().parent


class InProcessServer:
    """`serve(options, stop_event)` on a thread running its own event loop (HTTP on a free port).

    `stop()` sets the event, as SIGTERM does in the CLI, and waits for `serve()` to return."""

    def __init__(self, repository: Path, **options):
        self.ready = threading.Event()
        self.info: dict = {}
        self.rc: int | None = None
        self.error: BaseException | None = None
        self.options = ServeOptions(repository=repository, http_port=0, grpc_port=None,
                                    on_ready=self._on_ready, **options)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, name="http-test-server", daemon=True)

    def _on_ready(self, info: dict) -> None:
        self.info = info
        self.ready.set()

    def _main(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            return await serve(self.options, self.stop_event)

        try:
            self.rc = asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by start()/stop()
            self.error = e
        finally:
            self.ready.set()

    def start(self, timeout: float = 60) -> "InProcessServer":
        self.thread.start()
        assert self.ready.wait(timeout), "the server did not get ready"
        if self.error is not None:
            raise self.error
        self.port = int(self.info["http"].rsplit(":", 1)[1])
        self.url = f"127.0.0.1:{self.port}"
        return self

    def call(self, fn, *args):
        """Run `fn(*args)` on the server's loop (e.g. to look at the manager) and return its result."""
        done = threading.Event()
        box: list = []
        self.loop.call_soon_threadsafe(lambda: (box.append(fn(*args)), done.set()))
        assert done.wait(10)
        return box[0]

    def stop(self, timeout: float = 30) -> int | None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout)
            assert not self.thread.is_alive(), "serve() did not return after the stop event"
        if self.error is not None:
            raise self.error
        return self.rc


# ---------------------------------------------------------------------------------------------
# `serve-kit serve` as a subprocess

def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(RUNTIME_TESTS), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "200"
    return env


def serve_kit_exe() -> str:
    exe = shutil.which("serve-kit", path=str(Path(sys.executable).parent))
    assert exe, "the serve-kit console script is not installed next to the interpreter"
    return exe


def start_cli(args: list[str], *, test_backends: bool = False, json_output: bool = True) -> subprocess.Popen:
    """`serve-kit --json serve ARGS` with pipes. `test_backends`: the same CLI entry point run by
    an interpreter that first imports rt_models, so that the test-only backends are registered."""
    if test_backends:
        cmd = [sys.executable, "-c", "import sys, rt_models; from serve_kit.cli import main; main(sys.argv[1:])"]
    else:
        cmd = [serve_kit_exe()]
    return subprocess.Popen([*cmd, *(["--json"] if json_output else []), "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The first line on a `serve-kit serve` subprocess's stdout (its ready line)."""
    box: list = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"serve-kit serve did not get ready (exit {proc.returncode}):\n{err[-3000:]}")
    return box[0]


def wait_ready(proc: subprocess.Popen, timeout: float = 60) -> dict:
    """The `--json` ready line (one line on stdout) of a `serve-kit serve` subprocess."""
    info = json.loads(read_line(proc, timeout))
    assert info["ready"] is True
    return info


def port_of(info: dict) -> int:
    return int(info["http"].rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------------
# A raw HTTP/1.1 client

class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


class RawConnection:
    """One socket: send any bytes, read responses one by one (Content-Length framing only, which
    is all the server writes)."""

    def __init__(self, port: int, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def read_response(self) -> RawResponse:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed before a complete response head: {self.buf[:200]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill():
                raise ConnectionError("connection closed in the middle of a response body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return RawResponse(status, headers, body)

    def closed_by_peer(self, timeout: float = 5) -> bool:
        """True when the server closes the connection (EOF, or a reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                  keep_alive: bool = True) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for k, v in (headers or {}).items():
        head.append(f"{k}: {v}")
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            timeout: float = 10) -> RawResponse:
    with RawConnection(port, timeout) as c:
        c.send(request_bytes(method, path, body, headers, keep_alive=False))
        return c.read_response()


def wait_until(predicate, timeout: float = 10, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ---------------------------------------------------------------------------------------------
# perf_analyzer (tritonclient 2.51.0's binary)

def perf_analyzer_env() -> tuple[str, dict[str, str]]:
    """The perf_analyzer executable and an environment it runs in; skips the test with the reason
    when the binary or a shared library it needs is missing."""
    exe = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("perf_analyzer not found next to the interpreter (it ships in tritonclient 2.51.0's wheel)")
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        libdir = str(Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    except ImportError:
        pass  # libcudart may be installed system-wide; ldd says
    ldd = subprocess.run(["ldd", exe], capture_output=True, text=True, env=env, timeout=30)
    missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if missing:
        pytest.skip(f"perf_analyzer cannot run: missing {', '.join(missing)} (libb64.so.0d: "
                    "`apt-get install libb64-0d`; libcudart.so.12: `pip install nvidia-cuda-runtime-cu12`)")
    return exe, env


def run_perf_analyzer(exe: str, env: dict[str, str], args: list[str], report: Path) -> float:
    """Run perf_analyzer with `args` (plus `-f report`), check it succeeded and return the
    throughput (infer/s) from its CSV. Callers use a fixed --request-count: perf_analyzer's
    stability search can fail (exit 1) on a busy CI machine whose windows differ too much."""
    run = subprocess.run([exe, *args, "-f", str(report)], capture_output=True, text=True, env=env, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "Throughput" in out and "infer/sec" in out, out
    lines = report.read_text().splitlines()
    assert lines[0].startswith("Concurrency,Inferences/Second") and len(lines) == 2, lines
    throughput = float(lines[1].split(",")[1])
    assert throughput > 0
    return throughput


class GrpcServer:
    """A ModelManager and gRPC frontends on a private event loop thread: `frontends` names each
    frontend (an attribute of the same name) and gives its serve_grpc options."""

    def __init__(self, root: Path, **frontends: dict):
        self.root, self.frontends = root, frontends
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "GrpcServer":
        from serve_kit.runtime.grpc_service import serve_grpc
        from serve_kit.runtime.models import ModelManager

        self.thread.start()

        async def start():
            manager = ModelManager(self.root, cores=2)
            await manager.start(strict=True)
            return manager, {name: await serve_grpc(manager, port=0, **kw) for name, kw in self.frontends.items()}

        self.manager, servers = self.call(start())
        for name, srv in servers.items():
            setattr(self, name, srv)
        return self

    def stop(self) -> None:
        async def stop():
            for name in self.frontends:
                await getattr(self, name).stop(2)
            await self.manager.shutdown(5)

        try:
            self.call(stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
