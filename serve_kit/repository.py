"""Read, write and verify a model repository: the one contract between serve-kit's commands.

Layout (Triton-style):

    <repo>/<model>/config.yaml                 how the model is served (config.ModelConfig)
    <repo>/<model>/<version>/<model file>      model.onnx | model.pt | model.plan
    <repo>/<model>/<version>/samples.npz       a few evaluation inputs with the reference outputs
    <repo>/<model>/<version>/manifest.json     sha256 of every file, provenance, validation report

Writes are atomic: a version is assembled in a hidden staging directory beside the versions and
renamed into place only when complete, so a failed or interrupted run never leaves a half-written
version and never touches existing ones. Directories starting with "." are never versions.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .config import ModelConfig, load_model_config
from .errors import RepositoryError, ServeKitError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
MANIFEST_FORMAT = "serve-kit/manifest@1"


REPORT = "optimize-report.json"
"""The report of the optimize run that wrote a version, inside it (hashed like its other files)."""
RUNS = ".runs"
"""Beside the versions: one report per optimize run (`<UTC time>-<pid>.json`), whatever it wrote."""


SAMPLES = "samples.npz"
"""A version's stored evaluation samples: `input.<name>` arrays and the reference's `reference.<name>`
outputs for them (written by optimize; read by warm-up, bench and the image smoke test)."""


def write_samples(path: Path, inputs: dict[str, Any], references: dict[str, Any] | None = None) -> None:
    import numpy as np

    np.savez(path, **{f"input.{k}": v for k, v in inputs.items()},
             **{f"reference.{k}": v for k, v in (references or {}).items()})


def read_samples(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, references) by tensor name from a samples file (never unpickled)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return ({k[len("input."):]: z[k] for k in z.files if k.startswith("input.")},
                {k[len("reference."):]: z[k] for k in z.files if k.startswith("reference.")})


def model_file_sha256(manifest: dict[str, Any] | None) -> str | None:
    """The sha256 a manifest records for its model file (None when it records none)."""
    meta = ((manifest or {}).get("files") or {}).get((manifest or {}).get("model_file"))
    return meta.get("sha256") if isinstance(meta, dict) else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; repositories are read by servers and image builds
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dump_config(config: ModelConfig) -> str:
    data = config.model_dump(mode="json")
    return ("# serve-kit model configuration; see the README's reference of config.yaml.\n"
            + yaml.safe_dump(data, sort_keys=False))


@dataclass
class VersionInfo:
    model: str
    version: int
    path: Path
    manifest: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    @property
    def model_file(self) -> Path | None:
        if self.manifest and self.manifest.get("model_file"):
            return self.path / self.manifest["model_file"]
        return None

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


class Staging:
    """A version being written. Files go into `dir`; `commit` makes it visible atomically."""

    def __init__(self, repo: "Repository", model: str):
        self.repo = repo
        self.model = model
        self.model_dir = repo.root / model
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.model_dir))
        self.version: int | None = None

    def commit(self, config: ModelConfig, manifest: dict[str, Any],
               extra_files: Callable[[int], dict[str, str]] | None = None) -> int:
        """Hash every staged file, write manifest.json, move the version into place, update
        config.yaml. Returns the new version number.

        `extra_files(version)` gives text files that name the version number (optimize's report):
        written once the number is reserved, and hashed into the manifest like the others."""
        if config.name != self.model:
            raise RepositoryError("config name does not match the model directory",
                                  value=config.name, origin=str(self.model_dir))
        model_file = manifest.get("model_file")
        if not model_file or not (self.dir / model_file).is_file():
            raise RepositoryError("manifest names a model file that was not staged", value=model_file,
                                  origin=str(self.dir))
        hashed: dict[str, dict[str, Any]] = {}
        for _ in range(100):
            version = max(self.repo.version_numbers(self.model), default=0) + 1
            for name, text in (extra_files(version) if extra_files else {}).items():
                (self.dir / name).write_text(text)
            files = {}
            for p in sorted(self.dir.rglob("*")):
                if p.is_file() and p.name != MANIFEST:
                    rel = p.relative_to(self.dir).as_posix()
                    st = p.stat()
                    key = (st.st_size, st.st_mtime_ns)
                    if rel not in hashed or hashed[rel]["key"] != key:  # the model file is hashed once
                        hashed[rel] = {"key": key, "sha256": sha256_file(p)}
                    files[rel] = {"sha256": hashed[rel]["sha256"], "size": st.st_size}
            # Set last, so that a caller's manifest can never override what the repository itself
            # vouches for (format, model, version, files).
            full = {"format": MANIFEST_FORMAT, "model": self.model, "version": version,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **manifest, "files": files}
            full.update(format=MANIFEST_FORMAT, model=self.model, version=version)
            (self.dir / MANIFEST).write_text(json.dumps(full, indent=2, default=str) + "\n")
            for p in self.dir.rglob("*"):
                if p.is_dir():
                    p.chmod(0o755)  # subfolders made under a strict umask must stay readable too
                elif p.is_file():
                    p.chmod(0o644)
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            self.dir.chmod(0o755)  # mkdtemp creates 0700
            target = self.model_dir / str(version)
            try:
                # mkdir reserves the number; renaming over the empty directory is atomic and fails
                # if another writer filled it first.
                target.mkdir()
            except FileExistsError:
                continue
            try:
                os.rename(self.dir, target)
            except OSError:
                with contextlib.suppress(OSError):
                    target.rmdir()
                raise
            _fsync_dir(self.model_dir)
            self.version = version
            break
        else:  # pragma: no cover - 100 concurrent writers
            raise RepositoryError("could not reserve a version number", origin=str(self.model_dir))
        atomic_write_text(self.model_dir / CONFIG, dump_config(config))
        return version

    def discard(self) -> None:
        if self.version is None:
            shutil.rmtree(self.dir, ignore_errors=True)


class Repository:
    """A model repository on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.root.is_dir()

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / CONFIG).exists())

    def config(self, model: str) -> ModelConfig:
        path = self.root / model / CONFIG
        if not path.exists():
            raise RepositoryError("model has no config.yaml", value=model, origin=str(self.root),
                                  hint=f"models here: {', '.join(self.models()) or 'none'}")
        return load_model_config(path)

    def version_numbers(self, model: str) -> list[int]:
        d = self.root / model
        if not d.is_dir():
            return []
        # Only canonical ASCII numbers: str.isdigit() also accepts "²" (which int() rejects), and
        # "01" would alias version 1 while its files live under another path.
        return sorted(int(p.name) for p in d.iterdir()
                      if p.is_dir() and p.name.isascii() and p.name.isdigit() and p.name == str(int(p.name))
                      and int(p.name) > 0)

    def version(self, model: str, version: int | None = None) -> VersionInfo:
        """One version (the latest when `version` is None), with its manifest."""
        numbers = self.version_numbers(model)
        if not numbers:
            raise RepositoryError("model has no versions", value=model, origin=str(self.root / model))
        v = numbers[-1] if version is None else version
        if v not in numbers:
            raise RepositoryError(f"model {model!r} has no version {v}", value=v, origin=str(self.root / model),
                                  hint=f"versions: {', '.join(map(str, numbers))}")
        path = self.root / model / str(v)
        manifest, problems = None, []
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            problems.append(f"{MANIFEST} is missing")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{MANIFEST} is not valid JSON: {e}")
        except OSError as e:  # e.g. replaced by a directory
            problems.append(f"{MANIFEST} cannot be read: {e.strerror or e}")
        if manifest is not None and not isinstance(manifest, dict):
            problems.append(f"{MANIFEST} is not a JSON object")
            manifest = None
        return VersionInfo(model, v, path, manifest, problems)

    def versions(self, model: str) -> list[VersionInfo]:
        return [self.version(model, v) for v in self.version_numbers(model)]

    # -- verification ----------------------------------------------------------------------
    def verify_version(self, info: VersionInfo) -> list[str]:
        """Every problem found: missing, changed or unlisted files. Empty means verified."""
        problems = list(info.problems)
        if info.manifest is None:
            return problems
        listed = info.manifest.get("files", {})
        if info.manifest.get("format") != MANIFEST_FORMAT:
            problems.append(f"unknown manifest format {info.manifest.get('format')!r}")
        if not isinstance(listed, dict):
            problems.append(f"{MANIFEST}: `files` is not a mapping of file -> sha256 and size")
            listed = {}
        for rel, meta in listed.items():
            p = info.path / rel
            if not isinstance(meta, dict):
                problems.append(f"{rel}: manifest entry is not {{sha256, size}}")
                continue
            if not p.is_file():
                problems.append(f"{rel}: missing")
                continue
            if p.stat().st_size != meta.get("size"):
                problems.append(f"{rel}: size {p.stat().st_size} != {meta.get('size')} in the manifest")
            elif sha256_file(p) != meta.get("sha256"):
                problems.append(f"{rel}: sha256 does not match the manifest")
        for p in info.path.rglob("*"):
            rel = p.relative_to(info.path).as_posix()
            if p.is_file() and rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
        mf = info.manifest.get("model_file")
        if mf and mf not in listed:
            problems.append(f"model file {mf!r} is not listed in the manifest")
        return problems

    def verify(self) -> dict[str, dict[int, list[str]]]:
        """Problems per model and version across the whole repository."""
        out: dict[str, dict[int, list[str]]] = {}
        for m in self.models():
            out[m] = {}
            try:
                self.config(m)
            except ServeKitError as e:  # a missing or invalid config.yaml
                out[m][0] = [e.render()]
            for info in self.versions(m):
                out[m][info.version] = self.verify_version(info)
        return out

    # -- writing ---------------------------------------------------------------------------
    def run_report_path(self, model: str) -> Path:
        """Where one optimize run's report goes: `<model>/.runs/<UTC time>-<pid>.json` (a dot
        folder, so never taken for a version); names sort by time and do not collide between
        concurrent runs."""
        now = _dt.datetime.now(_dt.timezone.utc)
        return self.root / model / RUNS / f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{os.getpid()}.json"

    @contextlib.contextmanager
    def new_version(self, model: str) -> Iterator[Staging]:
        """Stage a new version; it becomes visible only through `Staging.commit`. On any
        exception, Ctrl-C included, the staging directory is removed."""
        stage = Staging(self, model)
        try:
            yield stage
        finally:
            stage.discard()
