"""Run the runtime: the model manager plus the HTTP and gRPC frontends, with a graceful exit.

On SIGTERM (or Ctrl-C) the server reports not-ready at once (so a load balancer stops sending),
stops accepting connections, finishes in-flight requests within `exit_timeout`, then exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class ServeOptions:
    repository: Path
    models: list[str] | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int | None = 8001
    """None disables gRPC."""
    max_body_bytes: int = 64 * 1024 * 1024
    exit_timeout: float = 30.0
    management_token: str | None = None
    """When set, the repository extension's load/unload is enabled and needs this bearer token."""
    on_ready: Callable[[dict], None] | None = field(default=None, repr=False)


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # optional: the stdlib loop works, just slower
        pass


async def serve(options: ServeOptions, stop: asyncio.Event | None = None) -> int:
    from . import metrics
    from .http import Frontend, HttpServer
    from .models import ModelManager

    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests run servers in threads)
            pass
    manager = ModelManager(options.repository, models=options.models)
    await manager.start()
    frontend = Frontend(manager, metrics_render=lambda: metrics.render(manager),
                        management_token=options.management_token)
    http = await HttpServer(frontend, options.host, options.http_port, options.max_body_bytes).start()
    grpc_server = None
    if options.grpc_port is not None:
        from .grpc_service import serve_grpc

        grpc_server = await serve_grpc(manager, options.host, options.grpc_port, options.management_token)
    info = {"http": f"http://{options.host}:{http.port}", "grpc_port": getattr(grpc_server, "port", None),
            "models": manager.index()}
    if options.on_ready:
        options.on_ready(info)
    await stop.wait()
    manager.begin_shutdown()  # not ready from now on
    await http.stop(options.exit_timeout)
    if grpc_server is not None:
        await grpc_server.stop(options.exit_timeout)
    await manager.shutdown(options.exit_timeout)
    return 0


def run(options: ServeOptions) -> int:
    _install_uvloop()
    return asyncio.run(serve(options))
