"""The build context: what goes into an image, checked and laid out in one folder.

    <context>/Dockerfile            builds the image with any Docker engine, hermetically (--network=none)
    <context>/wheels/*.whl          the runtime's wheels for the image's platform, and serve-kit's
    <context>/models/<m>/...        the packaged model versions (config.yaml, files, manifest.json)
    <context>/sbom.cdx.json         CycloneDX SBOM (also inside the image, /opt/serve-kit/sbom.cdx.json)
    <context>/image.json            the image's settings and labels, as both builders apply them

Image layout (both builders): the base; the virtual environment /opt/serve-kit/venv (only the
runtime's dependencies, no pip, no bytecode); the SBOM; the model repository /models, last, so that a
new model version changes one small layer. The server runs as uid 10001, not root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..config import ModelConfig
from ..errors import RepositoryError
from ..repository import (CONFIG, MANIFEST, Repository, VersionInfo, check_model_name, check_relative, checked_file,
                          sha256_file)
from .errors import PackagingError
from .layers import VENV
from .oci import ImageSpec, iso
from .reference import ImageReference

USER = "10001:10001"
HTTP_PORT, GRPC_PORT = 8000, 8001
MODELS_DIR = "/models"
SBOM_PATH = "/opt/serve-kit/sbom.cdx.json"
CONTEXT_MARKER = ".serve-kit-context"
HEALTH = ("import urllib.request; "
          f"urllib.request.urlopen('http://127.0.0.1:{HTTP_PORT}/v2/health/ready', timeout=2)")
#: Docker's healthcheck fields (nanoseconds). Docker waits one interval before the first probe.
HEALTHCHECK = {"Test": ["CMD", f"{VENV}/bin/python", "-c", HEALTH], "Interval": 5_000_000_000,
               "Timeout": 3_000_000_000, "StartPeriod": 60_000_000_000, "Retries": 3}
ENTRYPOINT = [f"{VENV}/bin/serve-kit", "serve", MODELS_DIR, "--host", "0.0.0.0",
              "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)]
RUNTIME_IMPORTS = "serve_kit.cli.serve, serve_kit.runtime.server, serve_kit.runtime.http, " \
                  "serve_kit.runtime.grpc_service, onnxruntime, numpy, orjson, httptools, uvloop"


def resolve_epoch(value: int | None) -> int:
    """The build's timestamp: the option, else SOURCE_DATE_EPOCH, else 0 (reproducible builds' rule)."""
    if value is not None:
        return int(value)
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        try:
            return int(env)
        except ValueError:
            raise PackagingError("SOURCE_DATE_EPOCH is not an integer", value=env, origin="SOURCE_DATE_EPOCH") from None
    return 0


@dataclass
class Selection:
    repository: Repository
    configs: dict[str, ModelConfig]
    versions: list[VersionInfo]

    @property
    def label(self) -> str:
        return ", ".join(f"{v.model}:{v.version}" for v in self.versions)


def select_versions(root: Path, models: list[str] | None) -> Selection:
    """The versions each model's version_policy serves, every one verified against its manifest.
    Any problem is an error here, before anything is built."""
    repo = Repository(root)
    if not repo.exists():
        raise RepositoryError("repository folder not found", value=str(root), origin="REPOSITORY",
                              hint="write one with `serve-kit optimize --recipe digits-cnn -r PATH`")
    available = repo.models()
    names = list(dict.fromkeys(models)) if models else available
    if not names:
        raise RepositoryError("the repository has no models", value=str(root), origin="REPOSITORY")
    unknown = [m for m in names if m not in available]
    if unknown:
        raise RepositoryError("no such model in the repository", value=", ".join(unknown), origin="--model",
                              hint=f"models here: {', '.join(available) or 'none'}")
    configs, versions, problems = {}, [], []
    for m in names:
        config = repo.config(m)
        configs[m] = config
        wanted = config.version_policy.select(repo.version_numbers(m))
        if not wanted:
            problems.append(f"{m}: no versions to serve")
        for v in wanted:
            info = repo.version(m, v)
            for p in repo.verify_version(info):
                problems.append(f"{m}/{v}: {p}")
            versions.append(info)
    if problems:
        raise RepositoryError("the repository failed verification, nothing was built: " + "; ".join(problems),
                              origin=str(root), hint="restore the files or write a new version with `serve-kit "
                                                     "optimize`; `serve-kit inspect` shows every problem")
    return Selection(repo, configs, versions)


def git_revision(path: Path) -> str | None:
    """The commit of the work tree holding `path`, if it is in one."""
    try:
        run = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rev = run.stdout.strip()
    return rev if run.returncode == 0 and len(rev) >= 40 else None


def labels(tag: ImageReference, selection: Selection, epoch: int, revision: str | None, base_name: str,
           base_digest: str | None, copied: dict[tuple[str, int], dict[str, str]] | None = None) -> dict[str, str]:
    """OCI annotation keys plus serve-kit's own: which model versions, the sha256 of each model file
    and of each manifest (which holds the sha256 of every file)."""
    names = list(selection.configs)
    out = {
        "org.opencontainers.image.title": f"serve-kit: {', '.join(names)}",
        "org.opencontainers.image.description": f"Open Inference Protocol server (serve-kit) for {selection.label}",
        "org.opencontainers.image.version": tag.tag or "latest",
        "org.opencontainers.image.created": iso(epoch),
        "org.opencontainers.image.base.name": base_name,
        "serve-kit.version": __version__,
        "serve-kit.models": selection.label,
        "serve-kit.sbom": SBOM_PATH,
        "serve-kit.ports": f"http={HTTP_PORT},grpc={GRPC_PORT},metrics={HTTP_PORT}/metrics",
    }
    if revision:
        out["org.opencontainers.image.revision"] = revision
    if base_digest:
        out["org.opencontainers.image.base.digest"] = base_digest
    for v in selection.versions:
        m = v.manifest or {}
        files = m.get("files", {})
        prefix = f"serve-kit.model.{v.model}.{v.version}"
        got = (copied or {}).get((v.model, v.version))
        if got is not None:  # hashed as copied into the context: what the image holds
            if m.get("model_file") in got:
                out[f"{prefix}.sha256"] = got[m["model_file"]]
            out[f"{prefix}.manifest-sha256"] = got[MANIFEST]
        else:
            if m.get("model_file") in files:
                out[f"{prefix}.sha256"] = files[m["model_file"]]["sha256"]
            out[f"{prefix}.manifest-sha256"] = sha256_file(v.file(MANIFEST, MANIFEST))
        for key in ("backend", "precision"):
            if m.get(key):
                out[f"{prefix}.{key}"] = str(m[key])
    for name in names:
        out[f"serve-kit.model.{name}.versions"] = ",".join(str(v.version) for v in selection.versions
                                                           if v.model == name)
    return dict(sorted(out.items()))


def image_spec(image_labels: dict[str, str], base_path: str | None = None) -> ImageSpec:
    """The image's settings. `base_path` is the base's PATH (the daemonless builder reads it from the base
    config; a Dockerfile says $PATH)."""
    path = f"{VENV}/bin:" + (base_path if base_path is not None else "$PATH")
    env = {"PATH": path, "VIRTUAL_ENV": VENV, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           "HOME": "/tmp"}
    return ImageSpec(env=env, user=USER, entrypoint=list(ENTRYPOINT), exposed_ports=[HTTP_PORT, GRPC_PORT],
                     labels=image_labels, healthcheck=dict(HEALTHCHECK))


def dockerfile(base: str, spec: ImageSpec, selection: Selection) -> str:
    hc = spec.healthcheck
    secs = lambda ns: f"{ns // 1_000_000_000}s"  # noqa: E731
    env = " \\\n    ".join(f"{k}={_quote_env(v)}" for k, v in spec.env.items())
    label_lines = " \\\n      ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in spec.labels.items())
    return f"""\
# Generated by serve-kit {__version__} for {selection.label}.
# Hermetic: every wheel is in wheels/ (prefetched for this base's platform) and installed with
# --no-index; `docker build --network=none .` works. The model files are the last layer.

FROM {base} AS venv
# Names the build stage's leftover image (the engine keeps it as cache): `docker image prune
# --filter label=serve-kit.stage=venv` removes them.
LABEL serve-kit.stage="venv"
ENV PYTHONDONTWRITEBYTECODE=1
COPY wheels/ /tmp/wheels/
RUN python3 -m venv {VENV} \\
 && {VENV}/bin/python -m pip install --no-index --no-deps --no-compile --no-cache-dir \\
        --disable-pip-version-check --quiet /tmp/wheels/*.whl \\
 && {VENV}/bin/python -m pip uninstall --yes --quiet pip setuptools \\
 && {VENV}/bin/python -c "import {RUNTIME_IMPORTS}" \\
 && find {VENV} -name __pycache__ -prune -exec rm -rf {{}} +

FROM {base}
COPY --from=venv {VENV} {VENV}
ENV {env}
COPY sbom.cdx.json {SBOM_PATH}
EXPOSE {" ".join(str(p) for p in spec.exposed_ports)}
USER {spec.user}
HEALTHCHECK --interval={secs(hc["Interval"])} --timeout={secs(hc["Timeout"])} \\
    --start-period={secs(hc["StartPeriod"])} --retries={hc["Retries"]} CMD {json.dumps(hc["Test"][1:])}
STOPSIGNAL {spec.stop_signal}
ENTRYPOINT {json.dumps(spec.entrypoint)}
LABEL {label_lines}
COPY models/ {MODELS_DIR}/
"""


def _quote_env(value: str) -> str:
    return value if all(c.isalnum() or c in "/:._-$" for c in value) else json.dumps(value)


def copy_models(selection: Selection, dest: Path, triton: bool = False) -> dict[tuple[str, int], dict[str, str]]:
    """Copy config.yaml and each packaged version into `dest` (the context's models/ folder) and
    return the sha256 of every file as copied, per (model, version): what the image holds, which
    the SBOM lists.

    Repository content can only land inside its own `dest/<model>/<version>/` folder: every name
    is checked (`checked_file`: no `..`, absolute paths or links leaving the version), every file
    is created exclusively (two names for one destination, or a name over manifest.json, are
    refused), and each copy is hashed and compared with its manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied: dict[tuple[str, int], dict[str, str]] = {}
    for name, config in selection.configs.items():
        src_dir = selection.repository.model_dir(name)
        (dest / name).mkdir()
        _copy_exclusive(checked_file(src_dir, CONFIG, CONFIG), dest / name, CONFIG)
        if triton:
            from .triton import config_pbtxt

            _write_exclusive(dest / name, "config.pbtxt", config_pbtxt(config).encode())
    for v in selection.versions:
        target = dest / check_model_name(v.model) / str(int(v.version))
        target.mkdir()
        files = (v.manifest or {}).get("files", {})
        hashes: dict[str, str] = {}
        for rel, meta in sorted(files.items()):
            if rel == MANIFEST:
                raise RepositoryError("the manifest lists manifest.json as one of its files", value=rel,
                                      origin=f"{v.model}/{v.version}", hint="nothing was built")
            digest = _copy_exclusive(v.file(rel), target, rel)
            if digest != meta["sha256"]:
                raise RepositoryError("a model file changed while it was being packaged", value=f"{v.model}/{v.version}/{rel}",
                                      origin=str(v.path), hint="nothing was built; run again")
            hashes[rel] = digest
        hashes[MANIFEST] = _copy_exclusive(v.file(MANIFEST, MANIFEST), target, MANIFEST)
        copied[(v.model, v.version)] = hashes
    for p in dest.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return copied


def _context_path(folder: Path, rel: str) -> Path:
    """`folder/rel`, refusing any name that would leave `folder` (checked again on the writing
    side: the context must not depend on the reader's check alone)."""
    rel = check_relative(rel, "packaged file")
    out = folder / rel
    for parent in reversed(out.relative_to(folder).parents):
        p = folder / parent
        if p.is_symlink():
            raise RepositoryError("a packaged file's folder is a symlink", value=rel)
    return out


def _copy_exclusive(src: Path, folder: Path, rel: str) -> str:
    """Copy `src` to `folder/rel`, a new file (never over another), and return its sha256 as written."""
    out = _context_path(folder, rel)
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise RepositoryError("two repository files would be packaged as one file", value=rel,
                              hint="nothing was built; the manifest names a file twice") from None
    with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
        while block := s.read(1 << 20):
            h.update(block)
            f.write(block)
    return h.hexdigest()


def _write_exclusive(folder: Path, rel: str, data: bytes) -> None:
    out = _context_path(folder, rel)
    try:
        with open(out, "xb") as f:
            f.write(data)
    except FileExistsError:
        raise RepositoryError("a generated file would overwrite a repository file", value=rel) from None


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder`, by relative path (what a context holds)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(folder).as_posix()] = sha256_file(p)
    return out


class ContextDir:
    """A context folder written under a temporary name and moved into place when complete. An existing
    folder is replaced only when serve-kit wrote it (it holds the marker file)."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        if self.path.exists():
            if not self.path.is_dir() or (any(self.path.iterdir()) and not (self.path / CONTEXT_MARKER).exists()):
                raise PackagingError("the context folder exists and was not written by serve-kit", value=str(self.path),
                                     origin="--context-dir", hint="give a new or empty folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        (self.tmp / CONTEXT_MARKER).write_text("written by serve-kit package; replaced on the next run\n")

    def commit(self) -> Path:
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old.", dir=self.path.parent))
            os.rename(self.path, old / "x")
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)
        self.path.chmod(0o755)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
