"""`serve-kit serve`: run the inference runtime on a model repository (the same one the image runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import RepositoryError
from . import app
from ._common import err, out, state


@app.command()
def serve(
    repository: Path = typer.Argument(..., help="Model repository folder."),
    models: list[str] = typer.Option([], "--model", "-m", help="Serve only these models (repeat); default: all."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP/REST port (0 = any free port)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port (0 = any free port)."),
    no_grpc: bool = typer.Option(False, "--no-grpc", help="Do not start the gRPC frontend."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body; larger ones get 413."),
    exit_timeout: float = typer.Option(30.0, "--exit-timeout", help="Seconds to finish in-flight requests on SIGTERM."),
    read_timeout: float = typer.Option(30.0, "--read-timeout", min=0.1,
                                       help="Seconds a client may take to send one HTTP request (else 408)."),
    keep_alive_timeout: float = typer.Option(75.0, "--keep-alive-timeout", min=0.1,
                                             help="Seconds an idle HTTP keep-alive connection stays open."),
    max_queue_ms: float = typer.Option(
        2000.0, "--max-queue-ms", min=0,
        help="Queue-time bound: a request not started after this many ms is shed with 503 + Retry-After "
             "(gRPC UNAVAILABLE), early when the queue ahead is already longer; 0 = off. Triton has no "
             "default (queue policy timeouts are opt-in); 2 s is far above a keeping-up server's queue time."),
    # Request limits (issue 13): the defaults are those of the servers named in each help.
    read_idle_timeout: float = typer.Option(10.0, "--read-idle-timeout", min=0.1,
                                            help="Seconds a partly received HTTP request may go without data, else 408 "
                                                 "(a per-read timer like nginx's client_body_timeout)."),
    max_json_mb: float = typer.Option(6.25, "--max-json-mb", min=0.001,
                                      help="Largest all-JSON HTTP body, and JSON part of a binary one, else 413 "
                                           "(TorchServe's max_request_size, 6,553,500 bytes); send tensors as binary "
                                           "data for more, up to --max-body-mb."),
    max_url_kb: float = typer.Option(8.0, "--max-url-kb", min=0.1,
                                     help="Longest HTTP request URL, else 414 (nginx's large_client_header_buffers, 8k)."),
    max_header_kb: float = typer.Option(8.0, "--max-header-kb", min=0.1,
                                        help="Longest HTTP header line, else 431 (nginx's large_client_header_buffers, 8k)."),
    max_headers: int = typer.Option(100, "--max-headers", min=1,
                                    help="Most HTTP header lines, else 431 (Apache's LimitRequestFields, 100)."),
    max_head_kb: float = typer.Option(16.0, "--max-head-kb", min=0.1,
                                      help="Largest HTTP request head (request line and headers), else 431 "
                                           "(Node's --max-http-header-size and h11's limit, 16 KiB)."),
    max_grpc_metadata_kb: float = typer.Option(8.0, "--max-grpc-metadata-kb", min=0.1,
                                               help="Largest gRPC request metadata, else RESOURCE_EXHAUSTED "
                                                    "(gRPC's own default, 8 KiB)."),
    enable_management: bool = typer.Option(False, "--enable-management",
                                           help="Enable the repository extension's load/unload (needs a token)."),
    management_token: Optional[str] = typer.Option(None, "--management-token", envvar="SERVE_KIT_MANAGEMENT_TOKEN",
                                                   help="Bearer token for load/unload (or $SERVE_KIT_MANAGEMENT_TOKEN)."),
    # -- repository limits: a repository is input too (no Triton equivalent; see the README) --
    max_metadata_mb: float = typer.Option(16.0, "--max-metadata-mb", min=0.001,
                                          help="Largest config.yaml or manifest.json read; a larger one fails "
                                               "that model's load (Triton reads config.pbtxt unbounded)."),
    max_samples_mb: float = typer.Option(256.0, "--max-samples-mb", min=0.001,
                                         help="Uncompressed MiB read from one samples.npz; warm-up inflates only "
                                              "the rows it runs, never object arrays."),
    log_level: str = typer.Option("info", "--log-level",
                                  help="The runtime's log lines on stderr: debug, info (model loads, route "
                                       "changes, failures), warning or error."),
) -> None:
    """Serve a model repository over the Open Inference Protocol (HTTP and gRPC) with dynamic batching.

    Ready (GET /v2/health/ready) only when every model is loaded and warmed up. SIGTERM: not ready
    at once, in-flight requests finish within --exit-timeout, exit 0.
    """
    from ..errors import UsageError
    from ..runtime.server import ServeOptions, run

    if not repository.is_dir():
        raise RepositoryError("repository folder not found", value=str(repository), origin="REPOSITORY",
                              hint="write one with `serve-kit optimize --recipe digits-cnn -r PATH`")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise UsageError("unknown log level", value=log_level, origin="--log-level",
                         hint="use debug, info, warning or error")
    _runtime_logging(log_level)
    if enable_management and not management_token:
        raise UsageError("--enable-management needs --management-token (or $SERVE_KIT_MANAGEMENT_TOKEN)",
                         origin="--enable-management", hint="management endpoints are never open without a token")

    def ready(info: dict) -> None:
        if state.json:
            # One line, flushed: a supervisor or test reads the ready event with readline() while
            # the server keeps running (emit_json's indented document spans lines).
            import json
            import sys

            state.emitted = True
            sys.stdout.write(json.dumps({"ready": True, **info}, separators=(",", ":"), default=str) + "\n")
            sys.stdout.flush()
        else:
            from rich.markup import escape

            # Index entries without a version: models in the repository not asked for (--model),
            # or that failed before any version loaded.
            serving = [f"{m['name']}/{m['version']}" for m in info["models"] if m["state"] == "READY"]
            failed = [f"{m['name']}" + (f"/{m['version']}" if "version" in m else "") + f" ({m.get('reason', '')})"
                      for m in info["models"] if m["state"] != "READY" and m.get("reason") != "not loaded"]
            out.print(f"[green]ready[/]: HTTP {info['http']}"
                      + (f", gRPC {host}:{info['grpc_port']}" if info.get("grpc_port") else "")
                      + "; models: " + escape(", ".join(serving) or "none")
                      + (f"; [red]not serving[/]: {escape('; '.join(failed))}" if failed else ""))

    options = ServeOptions(repository=repository, models=models or None, host=host, http_port=http_port,
                           grpc_port=None if no_grpc else grpc_port, max_body_bytes=int(max_body_mb * 1024 * 1024),
                           exit_timeout=exit_timeout, read_timeout=read_timeout,
                           keep_alive_timeout=keep_alive_timeout, max_queue_ms=max_queue_ms,
                           read_idle_timeout=read_idle_timeout, max_json_bytes=round(max_json_mb * 1024 * 1024),
                           max_url_bytes=round(max_url_kb * 1024), max_header_bytes=round(max_header_kb * 1024),
                           max_headers=max_headers, max_head_bytes=round(max_head_kb * 1024),
                           max_grpc_metadata_bytes=round(max_grpc_metadata_kb * 1024),
                           management_token=management_token if enable_management else None, on_ready=ready,
                           max_metadata_bytes=int(max_metadata_mb * 1024 * 1024),
                           max_samples_bytes=int(max_samples_mb * 1024 * 1024))
    code = run(options)
    err.print("stopped")
    raise typer.Exit(code)


def _runtime_logging(level: str) -> None:
    """The runtime's log lines (serve_kit.runtime) to stderr at `level`; the libraries stay quiet."""
    import logging

    logger = logging.getLogger("serve_kit")
    logger.setLevel(level.upper())
    if not any(getattr(h, "serve_kit_cli", False) for h in logger.handlers):  # once per process
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.serve_kit_cli = True
        logger.addHandler(handler)
