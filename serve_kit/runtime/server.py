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
    read_timeout: float = 30.0
    """Seconds a client may take to send one whole HTTP request once it started (else 408)."""
    keep_alive_timeout: float = 75.0
    """Seconds an idle HTTP keep-alive connection stays open."""
    # Request limits of the frontends (issue 13); each default's source is in http.DEFAULT_*.
    read_idle_timeout: float = 10.0
    """Seconds a partly received HTTP request may go without data (else 408)."""
    max_json_bytes: int = 6_553_600
    """Largest all-JSON HTTP body, and JSON part of a binary one (else 413)."""
    max_url_bytes: int = 8 * 1024
    """Longest HTTP request URL (else 414)."""
    max_header_bytes: int = 8 * 1024
    """Longest HTTP header line (else 431)."""
    max_headers: int = 100
    """Most HTTP header lines (else 431)."""
    max_head_bytes: int = 16 * 1024
    """Largest HTTP request head, request line and headers (else 431)."""
    max_grpc_metadata_bytes: int = 8 * 1024
    """Largest gRPC request metadata (gRPC's own default, 8 KiB; else RESOURCE_EXHAUSTED)."""
    management_token: str | None = None
    """When set, the repository extension's load/unload is enabled and needs this bearer token."""
    # -- repository limits (serve_kit.repository.Limits; a repository is input too) --
    max_metadata_bytes: int = 16 * 1024 * 1024
    """Largest config.yaml / manifest.json read; a larger one fails that model's load."""
    max_samples_bytes: int = 256 * 1024 * 1024
    """Uncompressed bytes read from one samples.npz (warm-up reads only the rows it runs)."""
    # -- scheduling under overload (issue 13) --
    max_queue_ms: float = 2000.0
    """Queue-time bound: a request whose batch has not started after this many ms is shed with 503 +
    Retry-After (gRPC UNAVAILABLE), and one is refused at once when the queue ahead would take
    longer; 0 = off. Triton has no default; see batcher.DEFAULT_MAX_QUEUE_TIME_US for the choice."""
    on_ready: Callable[[dict], None] | None = field(default=None, repr=False)


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # optional: the stdlib loop works, just slower
        pass


async def serve(options: ServeOptions, stop: asyncio.Event | None = None) -> int:
    from ..errors import ServeKitError
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
    from ..repository import Limits

    manager = ModelManager(options.repository, models=options.models,
                           limits=Limits(options.max_metadata_bytes, options.max_samples_bytes),
                           scheduler_options={"max_queue_time_us": int(options.max_queue_ms * 1000)})
    await manager.start()
    frontend = Frontend(manager, metrics_render=lambda: metrics.render(manager),
                        management_token=options.management_token)
    http = grpc_server = None
    try:
        http = await HttpServer(frontend, options.host, options.http_port, options.max_body_bytes,
                                read_timeout=options.read_timeout,
                                keep_alive_timeout=options.keep_alive_timeout,
                                read_idle_timeout=options.read_idle_timeout, max_json=options.max_json_bytes,
                                max_url=options.max_url_bytes, max_header=options.max_header_bytes,
                                max_headers=options.max_headers, max_head=options.max_head_bytes).start()
        if options.grpc_port is not None:
            from .grpc_service import serve_grpc

            # One body limit for both frontends: a gRPC message is the body of a gRPC request.
            grpc_server = await serve_grpc(manager, options.host, options.grpc_port, options.management_token,
                                           max_message_bytes=options.max_body_bytes,
                                           max_metadata_bytes=options.max_grpc_metadata_bytes)
    except OSError as e:  # a port in use, an address not on this host: the user's to fix, not a bug
        origin = "--http-port" if http is None else "--grpc-port"
        if http is not None:
            await http.stop(0)
        await manager.shutdown(0)
        raise ServeKitError(f"cannot start the server: {e}", origin=origin,
                            hint="is another server on that port? Port 0 picks a free one") from None
    info = {"http": f"http://{options.host}:{http.port}", "grpc_port": getattr(grpc_server, "port", None),
            "models": manager.index()}
    if options.on_ready:
        options.on_ready(info)
    await stop.wait()
    # One deadline for the whole exit: not ready and no new connections at once; what was accepted
    # finishes (or is answered 503 at the deadline) before any connection closes.
    deadline = loop.time() + options.exit_timeout
    manager.begin_shutdown()
    http.close()
    grpc_stopping = (asyncio.ensure_future(grpc_server.stop(options.exit_timeout))
                     if grpc_server is not None else None)
    await manager.shutdown(options.exit_timeout)
    # The handlers have their answers now (or are finishing a model load): a moment to send them.
    await http.stop(max(deadline - loop.time(), 0.5))
    if grpc_stopping is not None:
        await grpc_stopping
    return 0


def run(options: ServeOptions) -> int:
    _install_uvloop()
    return asyncio.run(serve(options))
