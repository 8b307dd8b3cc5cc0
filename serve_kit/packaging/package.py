"""`serve-kit package`: a verified model repository -> a build context -> an image (Docker engine, or the
daemonless builder) -> optional smoke test, push, MLflow registration and Kubernetes manifests.

Order matters for "nothing half-done": every input is checked first (references, the repository's
hashes, the registry and tracking server being reachable), the image is built and smoke-tested next,
and only an image that passed is pushed, and only a pushed (or built) image is registered.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UsageError
from ..progress import ProgressSink
from . import context as ctx
from .errors import PackagingError
from .layers import VENV, Entry, parents, stage_venv, tree, write_layer
from .reference import ImageReference
from .registry import Registry, copy_or_link
from .sbom import build_sbom, dumps as sbom_dumps
from .wheels import build_serve_kit_wheel, prefetch, runtime_requirements, wheel_info

DEFAULT_BASE = "python:3.11-slim-bookworm"


class K8sOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(default=2, ge=1)
    """Replicas of the Deployment (and the HorizontalPodAutoscaler's minimum)."""
    max_replicas: int = Field(default=10, ge=1)
    """The HorizontalPodAutoscaler's maximum."""
    target_cpu_percent: int = Field(default=70, ge=1, le=100)
    """Average CPU utilization (of the request) the autoscaler keeps."""
    cpu: str = "1"
    """CPU request per pod (also the limit: the ONNX Runtime threads size themselves to it)."""
    memory: str = "1Gi"
    """Memory request and limit per pod."""
    exit_timeout: float = Field(default=30.0, gt=0)
    """The runtime's --exit-timeout (seconds to drain in-flight requests on SIGTERM)."""
    canary_traffic_percent: int | None = Field(default=None, ge=0, le=100)
    """KServe InferenceService only: traffic share of the new revision."""
    namespace: str | None = None


class PackageJob(BaseModel):
    """Everything `serve-kit package` does, typed."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    repository: Path
    """The model repository to package."""
    tag: str
    """Image reference to build ([REGISTRY/]NAME[:TAG])."""
    models: list[str] | None = None
    """Models to package (default: all). Each model's version_policy decides which versions."""
    base: str = DEFAULT_BASE
    """Base image: an engine image name, a registry reference, or oci:DIR[:TAG] (daemonless builder)."""
    builder: Literal["auto", "docker", "oci"] = "auto"
    """auto: the Docker engine when one answers, else the daemonless OCI builder."""
    context_dir: Path | None = None
    """Where the build context is written (default: ./serve-kit-build/<name>-<tag>)."""
    output: Path | None = None
    """Daemonless builder: write the image as an archive (OCI layout + docker manifest.json) here."""
    push: str | None = None
    """Push the image to this reference; None: push when `tag` names a registry (unless no_push)."""
    no_push: bool = False
    plain_http: bool | None = None
    """Talk plain HTTP to the registries (default: only for loopback addresses)."""
    smoke_test: bool = False
    """Run the image and check its answers on the stored evaluation samples (exit 3 when wrong)."""
    serve_kit_wheel: Path | None = None
    """serve-kit's wheel to install (default: built from the source tree serve-kit runs from)."""
    epoch: int | None = None
    """Timestamp of the image (default: SOURCE_DATE_EPOCH, else 0)."""
    revision: str | None = None
    """Source revision label (default: the git commit holding the repository, if any)."""
    triton: bool = False
    """Also write Triton config.pbtxt files into the packaged repository."""
    k8s_dir: Path | None = None
    """Write Kubernetes manifests (Deployment, Service, HPA, PDB; KServe InferenceService) here."""
    k8s: K8sOptions = Field(default_factory=K8sOptions)
    register_as: str | None = None
    """Register the packaged model in the MLflow model registry under this name (alias `candidate`)."""
    tracking_uri: str | None = None
    """MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else serve-kit's local SQLite store)."""


def run(job: PackageJob, progress: ProgressSink | None = None) -> dict[str, Any]:
    progress = progress or ProgressSink()
    log = progress.log
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    # -- 1. inputs, before any work ----------------------------------------------------------------
    tag = ImageReference.parse(job.tag, "--tag", need_tag=True)
    if tag.digest:
        raise UsageError("--tag names an image to build: give a tag, not a digest", value=job.tag, origin="--tag")
    push_ref = _push_target(job, tag)
    selection = ctx.select_versions(job.repository, job.models)
    epoch = ctx.resolve_epoch(job.epoch)
    revision = job.revision or ctx.git_revision(job.repository.resolve())
    tracking_uri = None
    if job.register_as:
        from .mlflow_registry import check_reachable, resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(job.tracking_uri)
        check_reachable(tracking_uri)
    if push_ref is not None:
        Registry(push_ref.registry, job.plain_http).ping()

    from . import engine as eng

    client = eng.connect() if job.builder in ("auto", "docker") or job.smoke_test else None
    builder = job.builder if job.builder != "auto" else ("docker" if client is not None else "oci")
    if builder == "docker" and client is None:
        raise PackagingError("no Docker engine answers", origin="--builder docker",
                             hint="start dockerd (or set DOCKER_HOST), or use --builder oci")
    if job.smoke_test and client is None:
        raise PackagingError("--smoke-test runs the image and needs a Docker engine; none answers",
                             origin="--smoke-test", hint="start dockerd (or set DOCKER_HOST)")
    if builder == "oci" and job.output is None and push_ref is None and client is None:
        raise PackagingError("no Docker engine answers and the image has nowhere to go", origin="serve-kit package",
                             hint="give --output image.tar (an archive `docker load` accepts) or push it to a "
                                  "registry (--push REGISTRY/NAME:TAG); or start dockerd")
    if builder == "docker" and job.output is not None:
        raise UsageError("--output is written by the daemonless builder", origin="--output",
                         hint="add --builder oci, or use `docker save` on the built image")

    context_path = job.context_dir or Path("serve-kit-build") / f"{tag.repository.replace('/', '_')}-{tag.tag}"
    result: dict[str, Any] = {"image": str(tag), "builder": builder, "models": [
        {"model": v.model, "version": v.version, "path": str(v.path)} for v in selection.versions],
        "epoch": epoch, "revision": revision}

    # -- 2. base image and its Python ----------------------------------------------------------------
    t = time.monotonic()
    if builder == "docker":
        base_image = eng.ensure_image(client, job.base, log)
        python_exe, platform = eng.base_facts(client, base_image)
        base_repo, base_digest = _repo_digest(base_image, job.base)
        base_from = f"{base_repo}@{base_digest}" if base_digest else job.base
        base_path = None
        result["base"] = {"name": job.base, "id": base_image.id, "digest": base_digest}
    else:
        from .oci import base_facts, resolve_base

        base = resolve_base(job.base, job.plain_http)
        facts = base_facts(base)
        python_exe, platform = facts.python_exe, facts.platform
        base_digest = base.manifest_digest
        # The Dockerfile beside the image pins its base by digest, as the daemonless build did.
        base_from = job.base if base.registry is None else \
            f"{ImageReference.parse(job.base, '--base').name}@{base_digest}"
        base_path = _env_of(base.config).get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        result["base"] = {"name": job.base, "digest": base_digest,
                          "compressed_size": sum(d.size for d in base.layers)}
    result["base"].update(python=python_exe, platform=platform.platforms[0])
    timings["base"] = time.monotonic() - t

    # -- 3. wheels and the build context -------------------------------------------------------------
    t = time.monotonic()
    context = ctx.ContextDir(context_path)
    try:
        wheel_dir = context.tmp / "wheels"
        wheel_dir.mkdir()
        if job.serve_kit_wheel:
            if not job.serve_kit_wheel.is_file():
                raise PackagingError("serve-kit wheel not found", value=str(job.serve_kit_wheel),
                                     origin="--serve-kit-wheel")
            sk_wheel = wheel_dir / job.serve_kit_wheel.name
            shutil.copyfile(job.serve_kit_wheel, sk_wheel)
        else:
            sk_wheel = build_serve_kit_wheel(wheel_dir, epoch, log)
        pins = runtime_requirements(sk_wheel, platform)
        wheels = [sk_wheel]
        for w in prefetch(pins, platform, log):
            copy_or_link(w, wheel_dir / w.name)
            wheels.append(wheel_dir / w.name)
        # Models go under models/ only (copy_models refuses any name leaving a version's folder and
        # any collision); the SBOM and labels hash the files as they lie in the context, after
        # every copy, so they describe what the image really carries.
        copied = ctx.copy_models(selection, context.tmp / "models", triton=job.triton)
        infos = [wheel_info(w) for w in wheels]
        wheels_size = sum(w.stat().st_size for w in wheels)
        image_labels = ctx.labels(tag, selection, epoch, revision, job.base, base_digest, copied)
        sbom = build_sbom(image_name=tag.name, image_version=tag.tag, base_name=job.base, base_digest=base_digest,
                          wheels=infos, versions=selection.versions, created=ctx.iso(epoch), copied=copied)
        (context.tmp / "sbom.cdx.json").write_text(sbom_dumps(sbom))
        spec = ctx.image_spec(image_labels, base_path)
        (context.tmp / "Dockerfile").write_text(ctx.dockerfile(base_from, ctx.image_spec(image_labels), selection))
        (context.tmp / "image.json").write_text(json.dumps(
            {"tag": str(tag), "base": job.base, "base_digest": base_digest, "python": python_exe,
             "platform": platform.platforms[0], "wheels": [w.path.name for w in infos],
             "user": spec.user, "entrypoint": spec.entrypoint, "env": spec.env, "exposed_ports": spec.exposed_ports,
             "healthcheck": spec.healthcheck, "labels": spec.labels}, indent=2) + "\n")
        context_dir = context.commit()
    except BaseException:
        context.discard()
        raise
    result.update(context_dir=str(context_dir), dockerfile=str(context_dir / "Dockerfile"),
                  sbom=str(context_dir / "sbom.cdx.json"), wheels=len(wheels), wheels_size=wheels_size)
    timings["context"] = time.monotonic() - t
    log(f"build context: {context_dir} ({len(wheels)} wheels, {len(selection.versions)} model version(s))")

    # -- 4. build ------------------------------------------------------------------------------------
    t = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="serve-kit-layers-"))
    try:
        if builder == "docker":
            log(f"building {tag} with the Docker engine (network: none)")
            image = eng.build(client, context_dir, str(tag), log)
            image_id = image.id
            result["image_id"] = image_id
            result.update(eng.layer_report(client, image, base_image))
        else:
            built = _build_oci(base, context_dir, [w for w in (context_dir / "wheels").glob("*.whl")],
                               python_exe, platform.python, spec, epoch, scratch, log)
            result.update(image_id=built.image_id, digest=built.digest,
                          layers=[{"created_by": x.created_by, "size": x.tar_size, "compressed_size": x.size,
                                   "digest": x.digest} for x in built.layers],
                          size_over_base=sum(x.tar_size for x in built.layers),
                          compressed_size_over_base=sum(x.size for x in built.layers))
            image_id = None
            if job.output is not None:
                built.write_archive(job.output, tag, epoch)
                shutil.copyfile(context_dir / "sbom.cdx.json", _beside(job.output, ".sbom.cdx.json"))
                result["output"] = str(job.output)
                result["output_sbom"] = str(_beside(job.output, ".sbom.cdx.json"))
            if client is not None and (job.smoke_test or (job.output is None and push_ref is None)):
                archive = job.output or built.write_archive(scratch / "image.tar", tag, epoch)
                loaded = eng.load(client, archive)
                image_id = loaded.id
                result["loaded"] = True
        timings["build"] = time.monotonic() - t
        log(f"built {tag} in {timings['build']:.1f} s: {result['size_over_base'] / 1e6:.1f} MB over the base")

        # -- 5. smoke test ---------------------------------------------------------------------------
        if job.smoke_test:
            from .smoke import run_smoke_test

            t = time.monotonic()
            log("smoke test: running the image")
            result["smoke_test"] = run_smoke_test(client, image_id, selection.configs, selection.versions, log=log)
            timings["smoke_test"] = time.monotonic() - t

        # -- 6. push ---------------------------------------------------------------------------------
        if push_ref is not None:
            t = time.monotonic()
            log(f"pushing {push_ref}")
            if builder == "docker":
                if push_ref.with_tag(push_ref.tag) != tag:
                    client.api.tag(image_id, push_ref.name, push_ref.tag)
                digest = eng.push(client, push_ref, log)
            else:
                digest = built.push(push_ref, job.plain_http, log)
            result["push"] = {"reference": str(push_ref), "digest": digest,
                              "pinned": str(push_ref.with_digest(digest))}
            result["digest"] = digest
            timings["push"] = time.monotonic() - t
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    image_ref = result["push"]["pinned"] if "push" in result else str(tag)

    # -- 7. registry and deployment --------------------------------------------------------------------
    if job.register_as:
        from .mlflow_registry import register

        t = time.monotonic()
        result["registered"] = register(tracking_uri, job.register_as, selection, image_ref=image_ref,
                                         digest=result.get("digest"), sbom_path=context_dir / "sbom.cdx.json",
                                         log=log)
        timings["register"] = time.monotonic() - t
    if job.k8s_dir is not None:
        from .k8s import write_manifests

        result["k8s"] = write_manifests(job.k8s_dir, image_ref, tag, selection, job.k8s)
    timings["total"] = time.monotonic() - t_start
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return result


def _push_target(job: PackageJob, tag: ImageReference) -> ImageReference | None:
    if job.push:
        ref = ImageReference.parse(job.push, "--push", need_tag=True)
        if ref.digest:
            raise UsageError("--push takes a tag, not a digest", value=job.push, origin="--push")
        if ref.registry is None:
            raise UsageError("--push needs a reference that names a registry", value=job.push, origin="--push",
                             hint="e.g. --push 127.0.0.1:5000/models/digits:1")
        return ref
    if tag.registry is not None and not job.no_push:
        return tag
    return None


def _repo_digest(image, base: str) -> tuple[str | None, str | None]:
    """(repository, manifest digest) the engine knows the base image by, preferring the name given:
    a Dockerfile then pins its FROM by digest. (None, None) for an image never pushed or pulled."""
    name = ImageReference.parse(base, "--base").name
    found = [tuple(rd.split("@", 1)) for rd in image.attrs.get("RepoDigests") or [] if "@" in rd]
    for repo, digest in found:
        if repo in (name, f"docker.io/{name}", f"docker.io/library/{name}"):
            return repo, digest
    return found[0] if found else (None, None)


def _env_of(config: dict) -> dict[str, str]:
    out = {}
    for item in (config.get("config") or {}).get("Env") or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def _beside(path: Path, suffix: str) -> Path:
    name = path.name[:-4] if path.name.endswith(".tar") else path.name
    return path.with_name(name + suffix)


def _build_oci(base, context_dir: Path, wheels: list[Path], python_exe: str, python: tuple[int, int], spec,
               epoch: int, scratch: Path, log):
    from .oci import assemble

    staging = scratch / "root"
    log(f"daemonless build: installing {len(wheels)} wheels into {VENV} (no container, no network)")
    stage_venv(wheels, staging, python_exe, python)
    venv_layer = write_layer(tree(staging / VENV.lstrip("/"), VENV), scratch / "venv.tar.gz", epoch,
                             f"serve-kit: venv {VENV} from {len(wheels)} prefetched wheels (--no-index)")
    sbom_layer = write_layer([*parents(ctx.SBOM_PATH), Entry(ctx.SBOM_PATH, "file", 0o644,
                                                             source=context_dir / "sbom.cdx.json")],
                             scratch / "sbom.tar.gz", epoch, f"serve-kit: SBOM {ctx.SBOM_PATH}")
    models_layer = write_layer(tree(context_dir / "models", ctx.MODELS_DIR), scratch / "models.tar.gz", epoch,
                               f"serve-kit: model repository {ctx.MODELS_DIR}")
    return assemble(base, [venv_layer, sbom_layer, models_layer], spec, epoch)

