"""The MLflow model registry: a packaged image recorded as a registered model version.

One MLflow run per `package --register NAME` holds: the packaged model versions' files (config.yaml,
model file, samples, manifest.json) as artifacts under `model/`, the validation and benchmark reports
(each version's manifest `validation`/`latency`, the optimize report when present, the SBOM) as
metrics and artifacts, and tags for the image reference, its digest and every sha256 of every
manifest. The registered model version points at the run's `model/` artifacts and gets the alias
`candidate`; `serve-kit promote NAME --version N --alias champion` moves an alias.

Default tracking URI: `sqlite:///~/.serve-kit/mlflow/mlflow.db` (artifacts beside it), an embedded
store that needs no server; `$SERVE_KIT_HOME` moves it. Any tracking server by `--tracking-uri` or
MLFLOW_TRACKING_URI. An unreachable server is an error within seconds (no retry loop).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .. import __version__
from ..repository import CONFIG
from .errors import PackagingError

EXPERIMENT = "serve-kit-package"
CANDIDATE = "candidate"


def serve_kit_home() -> Path:
    return Path(os.environ.get("SERVE_KIT_HOME") or os.path.expanduser("~/.serve-kit"))


def default_tracking_uri() -> str:
    return f"sqlite:///{serve_kit_home() / 'mlflow' / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_reachable(uri: str, timeout: float = 5) -> None:
    """Fail fast and clearly: an HTTP tracking server must answer /health now; a SQLite store's folder
    must be writable. MLflow's own client would otherwise retry for minutes."""
    # Bounded retries for every MLflow call that follows (MLflow reads these at request time).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PackagingError(f"cannot reach the MLflow tracking server: {reason}", value=uri,
                                 origin="--tracking-uri / MLFLOW_TRACKING_URI",
                                 hint="start it (mlflow server) or check the URI; without one, leave the URI "
                                      "unset for serve-kit's local SQLite store") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PackagingError(f"cannot create the MLflow store's folder: {e.strerror}", value=str(folder),
                                 origin="--tracking-uri") from None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise PackagingError("MLflow is not installed", origin="--register",
                             hint="pip install 'serve-kit[mlflow]'") from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _wrap(e: Exception, what: str, uri: str) -> PackagingError:
    return PackagingError(f"MLflow: {what} failed: {getattr(e, 'message', None) or e}", origin=uri)


def _experiment(client, uri: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # MLflow's default artifact root is ./mlruns of whatever folder the command runs in.
        location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def _metrics(model: str, version: int, manifest: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    prefix = f"{model}.v{version}"
    val = manifest.get("validation") or {}
    for key in ("metric", "metric_delta"):
        if isinstance(val.get(key), (int, float)):
            out[f"{prefix}.{key}"] = float(val[key])
    for output, errors in (val.get("errors") or {}).items():
        for key, value in errors.items():
            if isinstance(value, (int, float)):
                out[f"{prefix}.{output}.{key}"] = float(value)
    for batch, lat in (manifest.get("latency") or {}).items():
        for key in ("p50_ms", "p99_ms", "samples_per_s"):
            if isinstance(lat.get(key), (int, float)):
                out[f"{prefix}.latency.b{batch}.{key}"] = float(lat[key])
    return out


def _hash_tags(model: str, version: int, manifest: dict, manifest_sha: str) -> dict[str, str]:
    tags = {f"sha256.{model}/{version}/{rel}": meta.get("sha256", "")
            for rel, meta in sorted((manifest.get("files") or {}).items())}
    tags[f"sha256.{model}/{version}/manifest.json"] = manifest_sha
    return tags


def register(uri: str, name: str, selection, *, image_ref: str, digest: str | None, sbom_path: Path | None,
             log=lambda m: None) -> dict[str, Any]:
    """Log the packaged versions to a run, create a registered model version from it, alias it
    `candidate`. Returns what was created."""
    # MLflow prints a run's URL to stdout; stdout belongs to --json's one document.
    with contextlib.redirect_stdout(sys.stderr):
        return _register(uri, name, selection, image_ref=image_ref, digest=digest, sbom_path=sbom_path, log=log)


def _register(uri: str, name: str, selection, *, image_ref: str, digest: str | None, sbom_path: Path | None,
              log) -> dict[str, Any]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    from ..repository import sha256_file

    client = _client(uri)
    try:
        experiment_id = _experiment(client, uri)
        run = client.create_run(experiment_id, run_name=f"package {image_ref}")
    except MlflowException as e:
        raise _wrap(e, "creating the run", uri) from None
    run_id = run.info.run_id
    log(f"MLflow: run {run_id} at {uri}")
    tags: dict[str, str] = {"serve-kit.image": image_ref, "serve-kit.version": __version__,
                            "serve-kit.models": selection.label}
    if digest:
        tags["serve-kit.image.digest"] = digest
    metrics: dict[str, float] = {}
    params = {"image": image_ref, "serve-kit": __version__}
    try:
        for v in selection.versions:
            manifest = v.manifest or {}
            client.log_artifacts(run_id, str(v.path), artifact_path=f"model/{v.model}/{v.version}")
            client.log_artifact(run_id, str(selection.repository.root / v.model / CONFIG),
                                artifact_path=f"model/{v.model}")
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp) / f"{v.model}-{v.version}-validation.json"
                report.write_text(json.dumps({"validation": manifest.get("validation"),
                                              "latency": manifest.get("latency"),
                                              "reference": manifest.get("reference")}, indent=2, default=str))
                client.log_artifact(run_id, str(report), artifact_path="reports")
            # Kept inside the version it wrote; read through the repository's path check like every
            # other file of a version (a link out of it is never uploaded).
            if "optimize-report.json" in (manifest.get("files") or {}):
                client.log_artifact(run_id, str(v.file("optimize-report.json")), artifact_path=f"reports/{v.model}")
            metrics.update(_metrics(v.model, v.version, manifest))
            tags.update(_hash_tags(v.model, v.version, manifest, sha256_file(v.file("manifest.json"))))
            for key in ("backend", "variant", "precision"):
                if manifest.get(key):
                    params[f"{v.model}.v{v.version}.{key}"] = str(manifest[key])
        if sbom_path is not None and Path(sbom_path).is_file():
            client.log_artifact(run_id, str(sbom_path), artifact_path="reports")
        client.log_batch(run_id, metrics=[Metric(k, val, 0, 0) for k, val in sorted(metrics.items())],
                         params=[Param(k, val) for k, val in sorted(params.items())],
                         tags=[RunTag(k, val) for k, val in sorted(tags.items())])
        client.set_terminated(run_id)
        try:
            client.create_registered_model(name, description="serve-kit packaged model (image + model files)")
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) and "already exists" not in str(e):
                raise
        source = f"{run.info.artifact_uri}/model"
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                         description=f"image {image_ref}")
        client.set_registered_model_alias(name, CANDIDATE, mv.version)
    except MlflowException as e:
        try:
            client.set_terminated(run_id, status="FAILED")
        except MlflowException:
            pass
        raise _wrap(e, "registering the model", uri) from None
    return {"name": name, "version": int(mv.version), "alias": CANDIDATE, "tracking_uri": uri, "run_id": run_id,
            "source": source, "metrics": len(metrics), "tags": len(tags)}


def promote(uri: str, name: str, version: int, alias: str) -> dict[str, Any]:
    """Point `alias` at `version` of the registered model `name` (moving it from any other version)."""
    with contextlib.redirect_stdout(sys.stderr):
        return _promote(uri, name, version, alias)


def _promote(uri: str, name: str, version: int, alias: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise PackagingError(f"registered model {name!r} has no version {version}", value=version,
                             origin=uri, hint="`serve-kit package ... --register NAME` creates versions") from None
    previous = None
    try:
        previous = int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        pass
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise _wrap(e, f"setting alias {alias!r}", uri) from None
    return {"name": name, "version": version, "alias": alias, "previous": previous, "tracking_uri": uri}
