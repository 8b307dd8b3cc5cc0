"""`serve-kit package` (a model repository -> an image, optionally smoke-tested, pushed, registered in
MLflow, with Kubernetes manifests) and `serve-kit promote` (move an MLflow model alias)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UsageError
from . import app
from ._common import emit_json, human_size, out, run_with_progress, show, state


@app.command()
def package(
    repository: Path = typer.Argument(..., help="Model repository folder (verified before anything is built)."),
    tag: str = typer.Option(..., "--tag", "-t", help="Image to build: [REGISTRY/]NAME[:TAG]. A tag naming a registry "
                                                     "is pushed there (unless --no-push)."),
    models: list[str] = typer.Option([], "--model", "-m", help="Package only these models (repeat); default: all."),
    base: Optional[str] = typer.Option(None, "--base", help="Base image: an engine image, REGISTRY/NAME:TAG, or "
                                                            "oci:DIR[:TAG] (default: python:3.11-slim-bookworm)."),
    builder: str = typer.Option("auto", "--builder", help="docker (the engine), oci (daemonless, reproducible), or "
                                                          "auto (the engine when one answers)."),
    context_dir: Optional[Path] = typer.Option(None, "--context-dir", help="Where to write the build context "
                                                                           "(default: ./serve-kit-build/NAME-TAG)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Daemonless builder: write the image as an "
                                                                       "archive that `docker load` accepts."),
    push: Optional[str] = typer.Option(None, "--push", help="Push to REGISTRY/NAME:TAG after the build (and the smoke "
                                                            "test, if asked)."),
    no_push: bool = typer.Option(False, "--no-push", help="Do not push even when --tag names a registry."),
    plain_http: Optional[bool] = typer.Option(None, "--plain-http/--https", help="Registry protocol for the daemonless "
                                                                                "builder (default: HTTP for loopback only)."),
    smoke_test: bool = typer.Option(False, "--smoke-test", help="Run the image, send each model its stored evaluation "
                                                                "samples, compare with the reference (exit 3 if wrong)."),
    serve_kit_wheel: Optional[Path] = typer.Option(None, "--serve-kit-wheel", help="serve-kit wheel to install (default: "
                                                                                   "built from the source tree)."),
    epoch: Optional[int] = typer.Option(None, "--source-date-epoch", help="Image timestamp (default: "
                                                                          "$SOURCE_DATE_EPOCH, else 0)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Source revision label (default: the git commit "
                                                                    "holding the repository)."),
    triton: bool = typer.Option(False, "--triton", help="Also write Triton config.pbtxt files into the packaged repository."),
    k8s_dir: Optional[Path] = typer.Option(None, "--k8s", help="Write Kubernetes manifests into this folder."),
    replicas: int = typer.Option(2, "--replicas", help="Kubernetes: replicas (and the autoscaler's minimum)."),
    max_replicas: int = typer.Option(10, "--max-replicas", help="Kubernetes: the autoscaler's maximum."),
    cpu: str = typer.Option("1", "--cpu", help="Kubernetes: CPU request and limit per pod."),
    memory: str = typer.Option("1Gi", "--memory", help="Kubernetes: memory request and limit per pod."),
    canary: Optional[int] = typer.Option(None, "--canary-traffic-percent", help="KServe: traffic share of the new revision."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Kubernetes namespace of the manifests."),
    register: Optional[str] = typer.Option(None, "--register", help="Register in the MLflow model registry under this "
                                                                    "name (alias `candidate`)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default: serve-kit's local SQLite store)."),
) -> None:
    """Build a container image that serves a model repository with serve-kit's runtime.

    The repository is verified first (a hash mismatch builds nothing). The image: a slim Python base,
    a virtual environment with only the runtime's dependencies (wheels prefetched here and installed
    with --no-index), an SBOM, and the model files as the last layer; non-root, HEALTHCHECK on
    /v2/health/ready, OCI labels with the model versions and hashes. Exit 3 when --smoke-test fails.
    """
    from ..packaging.package import DEFAULT_BASE, K8sOptions, PackageJob, run

    if builder not in ("auto", "docker", "oci"):
        raise UsageError("unknown builder", value=builder, origin="--builder", hint="docker, oci or auto")
    try:
        k8s = K8sOptions(replicas=replicas, max_replicas=max(max_replicas, replicas), cpu=cpu, memory=memory,
                         canary_traffic_percent=canary, namespace=namespace)
    except Exception as e:  # pydantic's ValidationError: a flag out of range
        raise UsageError(f"invalid Kubernetes option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}",
                         origin="--replicas/--max-replicas/--canary-traffic-percent") from None
    job = PackageJob(repository=repository, tag=tag, models=models or None, base=base or DEFAULT_BASE,
                     builder=builder, context_dir=context_dir, output=output, push=push, no_push=no_push,
                     plain_http=plain_http, smoke_test=smoke_test, serve_kit_wheel=serve_kit_wheel, epoch=epoch,
                     revision=revision, triton=triton, k8s_dir=k8s_dir, k8s=k8s, register_as=register,
                     tracking_uri=tracking_uri)
    result = run_with_progress(run, job)
    show(result, render)


def render(result: dict) -> None:
    table = Table(title=f"serve-kit package: {result['image']} ({result['builder']} builder)")
    table.add_column("layer over the base")
    table.add_column("size", justify="right")
    compressed = any("compressed_size" in x for x in result["layers"])
    if compressed:
        table.add_column("compressed", justify="right")
    for x in result["layers"]:
        if x["size"] == 0:
            continue  # ENV, LABEL, ...: metadata, no files
        row = [_short(x["created_by"]), human_size(x["size"])]
        if compressed:
            row.append(human_size(x["compressed_size"]))
        table.add_row(*row)
    total = [f"[bold]total over the base[/] ({result['base']['name']})", f"[bold]{human_size(result['size_over_base'])}[/]"]
    if compressed:
        total.append(human_size(result["compressed_size_over_base"]))
    table.add_row(*total)
    out.print(table)
    ids = [f"image id {result['image_id']}"] + ([f"digest {result['digest']}"] if result.get("digest") else [])
    out.print("; ".join(ids))
    out.print(f"context: {result['context_dir']} (Dockerfile, wheels, models, SBOM)")
    if result.get("output"):
        out.print(f"[green]wrote[/] {result['output']} (docker load -i), SBOM {result['output_sbom']}")
    smoke = result.get("smoke_test")
    if smoke:
        for m in smoke["models"]:
            if "skipped" in m:
                out.print(f"smoke test {m['model']}/{m['version']}: [yellow]skipped[/] ({m['skipped']})")
                continue
            worst = "; ".join(f"{k}: max abs err {c['max_abs_error']:.3g} <= {c['max_abs_limit']:.3g}, "
                              + (f"min cosine {c['cosine_min']:.6f}" if c.get("cosine_min") is not None
                               else "no cosine (one element)") for k, c in m["outputs"].items())
            out.print(f"smoke test {m['model']}/{m['version']}: [green]passed[/] on {m['samples']} samples ({worst}); "
                      f"ready in {smoke['ready_seconds']} s, Docker health: {smoke['health']}")
    if result.get("push"):
        out.print(f"[green]pushed[/] {result['push']['pinned']}")
    if result.get("registered"):
        r = result["registered"]
        out.print(f"[green]registered[/] {r['name']} version {r['version']} (alias {r['alias']}) at {r['tracking_uri']}")
    if result.get("k8s"):
        out.print("Kubernetes manifests: " + ", ".join(result["k8s"]["files"]))
    secs = result["seconds"]
    out.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))


def _short(text: str, n: int = 90) -> str:
    # `docker history` names copied content by its hash; what matters is where it went.
    text = re.sub(r"(dir|file):[0-9a-f]{64} ", "", text.replace("/bin/sh -c #(nop) ", "")).strip()
    return text if len(text) <= n else text[: n - 3] + "..."


@app.command()
def promote(
    name: str = typer.Argument(..., help="Registered model name."),
    version: int = typer.Option(..., "--version", help="Model version to point the alias at."),
    alias: str = typer.Option("champion", "--alias", help="Alias to set (moved from whichever version had it)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default: serve-kit's local SQLite store)."),
) -> None:
    """Point an MLflow registered model's alias (e.g. champion) at a version."""
    from ..packaging.mlflow_registry import check_reachable, promote as do_promote, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    result = do_promote(uri, name, version, alias)
    if state.json:
        emit_json(result)
    else:
        moved = f" (was version {result['previous']})" if result.get("previous") else ""
        out.print(f"[green]{name}@{alias}[/] -> version {version}{moved}")
