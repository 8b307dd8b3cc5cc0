"""The client tests' servers: real `serve-kit serve` subprocesses (HTTP and gRPC on free ports)
and the repositories they serve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

RUNTIME_TESTS = Path(__file__).resolve().parents[1] / "runtime"
if str(RUNTIME_TESTS) not in sys.path:
    sys.path.insert(0, str(RUNTIME_TESTS))

from rt_models import config, identity_onnx, probe_config, write_probe, write_version  # noqa: E402
from rt_server import port_of, request, start_cli, wait_ready  # noqa: E402


class Served:
    """One `serve-kit serve` subprocess; `restart()` kills it and starts it again on the same ports."""

    def __init__(self, repo: Path, http_port: int = 0, grpc_port: int = 0, args: tuple[str, ...] = ()):
        self.repo, self.args = repo, list(args)
        self.start(http_port, grpc_port)

    def start(self, http_port: int, grpc_port: int) -> None:
        self.proc = start_cli([str(self.repo), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                               "--exit-timeout", "1", *self.args], test_backends=True)
        info = wait_ready(self.proc, timeout=120)
        self.http_port, self.grpc_port = port_of(info), int(info["grpc_port"])
        self.http, self.grpc = f"http://127.0.0.1:{self.http_port}", f"grpc://127.0.0.1:{self.grpc_port}"

    def url(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start(self.http_port, self.grpc_port)

    def requests_total(self, status: str = "200") -> int:
        """serve_kit_requests_total{status} summed over models, from the server's /metrics."""
        text = request(self.http_port, "GET", "/metrics").body.decode()
        total = 0.0
        for m in re.finditer(r'^serve_kit_requests_total\{([^}]*)\} (\S+)$', text, re.M):
            if f'status="{status}"' in m.group(1):
                total += float(m.group(2))
        return int(total)


def ident_repo(root: Path) -> Path:
    write_version(root, config("ident", 4, 4, max_batch_size=8), identity_onnx(4))
    return root


def probe_repo(root: Path, **spec) -> Path:
    write_probe(root, probe_config("probe", 4, max_batch_size=8), **spec)
    return root


