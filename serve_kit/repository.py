"""Read, write and verify a model repository: the one contract between serve-kit's commands.

Layout (Triton-style):

    <repo>/<model>/config.yaml                 how the model is served (config.ModelConfig)
    <repo>/<model>/<version>/<model file>      model.onnx | model.pt | model.plan
    <repo>/<model>/<version>/samples.npz       a few evaluation inputs with the reference outputs
    <repo>/<model>/<version>/manifest.json     sha256 of every file, provenance, validation report

Trust: a repository is input, like a request. Every path read from it (manifest `files` keys,
`model_file`, samples, an ONNX model's external data) goes through `checked_file`, which allows only
canonical relative paths that resolve, symlinks followed, to a regular file inside their version
folder; the model and version folders themselves must resolve inside the repository. Everything
read whole (config.yaml, manifest.json, samples.npz) is bounded in size (`Limits`), samples are
read without unpickling and only as many rows as are needed, and model names are checked by one
rule (`check_model_name`) before any path is built from them.

Writes are atomic: a version is assembled in a hidden staging directory beside the versions and
renamed into place only when complete, so a failed or interrupted run never leaves a half-written
version and never touches existing ones. Directories starting with "." are never versions.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no staging locks, stale folders are left
    fcntl = None

from .config import ModelConfig, RoutesFile, parse_model
from .errors import RepositoryError, ServeKitError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
ROUTES = "routes.yaml"
"""The repository-level routes of endpoints (config.RoutesFile); optional."""
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


# -- limits --------------------------------------------------------------------------------------

DEFAULT_MAX_METADATA_BYTES = 16 * 1024 * 1024
"""Largest config.yaml or manifest.json read (16 MiB: a manifest of ~100k files). No Triton
equivalent (Triton's config.pbtxt is read whole, unbounded)."""
DEFAULT_MAX_SAMPLES_BYTES = 256 * 1024 * 1024
"""Largest total of uncompressed array bytes read from one samples.npz (256 MiB). Warm-up reads
only the rows it runs, so this bounds bench and the smoke test; no Triton equivalent."""
MAX_SAMPLES_MEMBERS = 4096
"""Arrays in one samples.npz (a zip's central directory is read whole)."""
MAX_MODEL_NAME = 255
"""Longest model name: a folder name (NAME_MAX on Linux)."""


@dataclass(frozen=True)
class Limits:
    """Size bounds on what is read from a repository (`serve-kit serve --max-metadata-mb`,
    `--max-samples-mb`)."""

    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
    max_samples_bytes: int = DEFAULT_MAX_SAMPLES_BYTES


# -- names and paths: the one place every path read from a repository is checked ------------------

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Model names (the same rule as config.yaml's `name`): a folder name, never a path."""
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_model_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_MODEL_NAME and _MODEL_NAME.fullmatch(name) is not None


def check_model_name(name: object, origin: str = "model name") -> str:
    """`name` if it is a model name (letters, digits, `_.-`, not starting with `.`/`-`/`_`, at most
    255 characters), else RepositoryError: names are never paths (`..`, `/x`, `a/b`)."""
    if not is_model_name(name):
        shown = name[:80] + "..." if isinstance(name, str) and len(name) > 80 else name
        raise RepositoryError("not a model name", value=shown, origin=origin,
                              hint="model names are folder names: letters, digits and _ . - "
                                   f"(starting with a letter or digit, at most {MAX_MODEL_NAME} characters)")
    return name


def _within(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13: a symlink loop (its message names the path: not shown)
        raise RepositoryError("cannot resolve the path: a symlink loop") from None
    except OSError as e:  # a loop (3.13+), a name too long
        raise RepositoryError(f"cannot resolve the path: {e.strerror or type(e).__name__}") from None


def check_relative(rel: object, what: str = "path") -> str:
    """`rel` if it is a canonical relative POSIX path (no `..`, `.` or empty parts, not absolute,
    no NUL), else RepositoryError. Canonical, so that two names can never mean one file."""
    if not isinstance(rel, str) or not rel:
        raise RepositoryError(f"{what} is not a relative path", value=rel)
    shown = rel[:120] + "..." if len(rel) > 120 else rel
    if "\x00" in rel:
        raise RepositoryError(f"{what} holds a NUL character", value=shown)
    if rel.startswith("/"):
        raise RepositoryError(f"{what} is an absolute path; repository paths are relative to their version folder",
                              value=shown)
    parts = rel.split("/")
    if ".." in parts:
        raise RepositoryError(f"{what} leaves its folder (`..`)", value=shown)
    if any(p in ("", ".") for p in parts):
        raise RepositoryError(f"{what} is not in canonical form (empty or `.` parts)", value=shown)
    return rel


def checked_file(base: Path, rel: object, what: str = "file", *, within: Path | None = None) -> Path:
    """The real path of `base/rel`, a regular file that resolves (symlinks followed) inside
    `within` (default `base`). RepositoryError otherwise: `..`, absolute paths, NUL, a symlink
    that leaves the folder, a device, fifo, socket or folder, a missing file. Messages name `rel`
    (relative), never a server path.

    The one check every reader uses: verification (so `inspect`), the server, bench, package
    and the smoke test."""
    rel = check_relative(rel, what)
    root = _resolve(Path(within if within is not None else base))
    try:
        real = _resolve(Path(base) / rel)
    except RepositoryError as e:
        raise RepositoryError(f"{what} {e.message}", value=rel) from None
    if not _within(real, root):
        raise RepositoryError(f"{what} resolves outside its version folder (a symlink?)", value=rel,
                              hint="every file of a version must lie inside the version's folder")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise RepositoryError(f"{what} is missing", value=rel) from None
    except OSError as e:
        raise RepositoryError(f"{what} cannot be read: {e.strerror or e}", value=rel) from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a fifo" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise RepositoryError(f"{what} is {kind}, not a regular file", value=rel)
    return real


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, refusing files over `limit` bytes (checked while reading, so a file
    that grows or lies in its stat cannot get past it)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RepositoryError(f"{what} is larger than the limit of {limit} bytes", value=what,
                              hint="raise it with `serve-kit serve --max-metadata-mb` if the file is genuine")
    return data


def redact_paths(text: str, root: Path | None = None) -> str:
    """`text` without server paths: paths under `root` become relative to it, any other absolute
    path `<path>`. For reasons shown to clients that are not authenticated."""
    if root is not None:
        for r in {str(Path(root).absolute()), str(_safe_resolve(Path(root)))}:
            text = text.replace(r.rstrip("/") + "/", "").replace(r, ".")
    return re.sub(r"(?<![\w:/.~-])/[^\s'\"(),;:]+", "<path>", text)


def _safe_resolve(p: Path) -> Path:
    try:
        return _resolve(p)
    except RepositoryError:
        return p.absolute()


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: serve-kit never writes them, and aliases of aliases are
    how a small file expands into an exponential document ("billion laughs")."""

    def compose_node(self, parent, index):  # noqa: ANN001
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in config.yaml",
                                              event.start_mark)
        return super().compose_node(parent, index)


# -- samples ----------------------------------------------------------------------------------------

def read_samples(path: Path, rows: int | None = None, *, max_bytes: int = DEFAULT_MAX_SAMPLES_BYTES,
                 inputs_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, references) by tensor name from a samples file.

    Never unpickled (object arrays are refused), and never inflated whole: each array's `.npy`
    header is read first and only the first `rows` rows (all when None) are inflated, within
    `max_bytes` uncompressed bytes for the whole file. Any problem is a RepositoryError."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npf

    name = Path(path).name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise RepositoryError(f"{name} is not a readable .npz file: {getattr(e, 'strerror', None) or e}",
                              value=name) from None
    budget = max_bytes
    out: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    with zf:
        members = zf.infolist()
        if len(members) > MAX_SAMPLES_MEMBERS:
            raise RepositoryError(f"{name} holds {len(members)} arrays, more than {MAX_SAMPLES_MEMBERS}", value=name)
        for zi in members:
            key = zi.filename[:-4] if zi.filename.endswith(".npy") else zi.filename
            if key.startswith("input."):
                dest, tensor = out[0], key[len("input."):]
            elif key.startswith("reference.") and not inputs_only:
                dest, tensor = out[1], key[len("reference."):]
            else:
                continue
            try:
                with zf.open(zi) as f:
                    version = npf.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = npf.read_array_header_1_0(f)
                    elif version in ((2, 0), (3, 0)):
                        shape, fortran, dtype = npf.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                    if dtype.hasobject:
                        raise RepositoryError(f"{name}: array {key!r} holds Python objects (dtype {dtype}); "
                                              "serve-kit never unpickles repository data", value=name,
                                              hint="store numeric or fixed-width string arrays")
                    if dtype.itemsize == 0:
                        raise ValueError(f"dtype {dtype} has no size")
                    if rows is not None and shape and not fortran:
                        shape = (min(rows, shape[0]), *shape[1:])
                    count = 1
                    for d in shape:
                        count *= d
                    nbytes = count * dtype.itemsize
                    if nbytes > budget:
                        raise RepositoryError(
                            f"{name}: reading array {key!r} ({list(shape)} x {dtype}) would take the file over "
                            f"the limit of {max_bytes} uncompressed bytes", value=name,
                            hint="raise it with `serve-kit serve --max-samples-mb`, or store fewer samples")
                    budget -= nbytes
                    data = bytearray(nbytes)
                    view, got = memoryview(data), 0
                    while got < nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            raise ValueError(f"array {key!r} is truncated ({got} of {nbytes} bytes)")
                        got += n
            except RepositoryError:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError, OverflowError) as e:
                raise RepositoryError(f"{name}: array {key!r} cannot be read: {e}", value=name) from None
            dest[tensor] = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return out


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


DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only"}
"""errno -> what the user is told: the write failures that are the machine's state, not a bug."""


def disk_error(e: BaseException, path: object = None) -> RepositoryError | None:
    """A one-line RepositoryError for a full disk, exceeded quota or read-only file system (the
    path and a hint), None for any other exception."""
    if not isinstance(e, OSError) or e.errno not in DISK_ERRORS:
        return None
    where = e.filename or path
    return RepositoryError(f"cannot write {where or 'the repository'}: {DISK_ERRORS[e.errno]} "
                           f"({errno.errorcode[e.errno]})",
                           hint="free space (or make the folder writable) and run again; nothing half-written "
                                "was kept as a version")


def dump_config(config: ModelConfig) -> str:
    data = config.model_dump(mode="json")
    for key in ("route", "circuit_breaker", "response_cache"):  # opt-in sections: absent means off
        if data.get(key) is None:
            data.pop(key, None)
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
        """The model file's real path, checked by `checked_file` (RepositoryError when it is no
        regular file inside the version folder)."""
        if self.manifest and self.manifest.get("model_file"):
            return checked_file(self.path, self.manifest["model_file"], "model_file")
        return None

    def file(self, rel: object, what: str = "file") -> Path:
        """A file of this version by its manifest name, checked (see `checked_file`)."""
        return checked_file(self.path, rel, what)

    @property
    def size_bytes(self) -> int:
        """Bytes of the regular files in the version folder (symlinks not followed)."""
        total = 0
        for dirpath, _, filenames in os.walk(self.path):
            for n in filenames:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(dirpath, n))
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
        return total


STAGING_PREFIX = ".staging-"


def _lock_dir(path: Path) -> int | None:
    """An fd of `path` holding an exclusive flock, or None when another process holds it."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_staging(model_dir: Path) -> list[str]:
    """Remove `.staging-*` folders whose writer is gone (killed optimize runs): a live writer holds
    an flock on its staging folder for the folder's whole life, so a folder that can be locked
    has none. Call holding the flock of `model_dir` itself, which writers hold while they create
    and lock their staging folder (so none is taken for stale in between). Returns the names
    removed."""
    removed = []
    for p in model_dir.iterdir():
        if not p.name.startswith(STAGING_PREFIX) or p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = _lock_dir(p)
        except OSError:
            continue
        if fd is None:  # a writer is still at work
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        finally:
            os.close(fd)
    return removed


class Staging:
    """A version being written. Files go into `dir`; `commit` makes it visible atomically.

    The writer holds an flock on `dir` until the staging folder is committed or discarded; the
    next writer removes staging folders nobody holds (see `remove_stale_staging`)."""

    def __init__(self, repo: "Repository", model: str):
        self.repo = repo
        self.model = model
        self.model_dir = repo.model_dir(model)  # a model name, not leaving the repository
        self.version: int | None = None
        self._fd: int | None = None
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.stale_removed: list[str] = []
        if fcntl is None:  # pragma: no cover - not POSIX
            self.dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.model_dir))
            return
        lock = os.open(self.model_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.stale_removed = remove_stale_staging(self.model_dir)
            self.dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.model_dir))
            self._fd = _lock_dir(self.dir)
        finally:
            os.close(lock)  # closing releases the flock

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
            self._release()
            _fsync_dir(self.model_dir)
            self.version = version
            break
        else:  # pragma: no cover - 100 concurrent writers
            raise RepositoryError("could not reserve a version number", origin=str(self.model_dir))
        atomic_write_text(self.model_dir / CONFIG, dump_config(config))
        return version

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        if self.version is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._release()


class Repository:
    """A model repository on disk. Every name and path read from it is checked (see the module
    docstring); `limits` bounds the size of what is read whole."""

    def __init__(self, root: str | Path, limits: Limits | None = None):
        self.root = Path(root)
        self.limits = limits or Limits()

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.root.is_dir()

    def models(self) -> list[str]:
        """Model folders: named by the model-name rule, holding a config.yaml."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if is_model_name(p.name) and p.is_dir() and (p / CONFIG).exists())

    def model_dir(self, model: str) -> Path:
        """The folder of a model, checked: a model name, resolving inside the repository."""
        check_model_name(model, "model")
        d = self.root / model
        if d.is_symlink() and not _within(_resolve(d), _resolve(self.root)):
            raise RepositoryError("model folder resolves outside the repository (a symlink)", value=model,
                                  hint="copy the model into the repository instead of linking it")
        return d

    def config(self, model: str) -> ModelConfig:
        d = self.model_dir(model)
        if not (d / CONFIG).exists() and not (d / CONFIG).is_symlink():
            raise RepositoryError("model has no config.yaml", value=model, origin="repository",
                                  hint=f"models here: {', '.join(self.models()) or 'none'}")
        origin = str(d / CONFIG)  # the server shows it redacted (redact_paths)
        return parse_model(ModelConfig, self._yaml(d, CONFIG, origin), origin)

    def routes(self) -> RoutesFile | None:
        """The repository's routes.yaml (endpoint routes), or None when it has none."""
        path = self.root / ROUTES
        if not path.exists() and not path.is_symlink():
            return None
        origin = str(path)
        return parse_model(RoutesFile, self._yaml(self.root, ROUTES, origin) or {}, origin)

    def _yaml(self, d: Path, name: str, origin: str):
        """A YAML file of the repository, read bounded (`max_metadata_bytes`), without aliases."""
        try:
            path = checked_file(d, name, name)
            text = read_bounded(path, self.limits.max_metadata_bytes, origin).decode("utf-8")
        except UnicodeDecodeError:
            raise RepositoryError(f"{name} is not UTF-8 text", origin=origin) from None
        except OSError as e:
            raise RepositoryError(f"{name} cannot be read: {e.strerror or e}", origin=origin) from None
        except RepositoryError as e:
            raise RepositoryError(e.message, value=e.value, origin=origin, hint=e.hint) from None
        try:
            return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader without aliases
        except yaml.YAMLError as e:
            raise RepositoryError(f"not valid YAML: {e}", origin=origin) from None
        except RecursionError:
            raise RepositoryError(f"{name} is nested too deeply", origin=origin) from None

    def version_numbers(self, model: str) -> list[int]:
        d = self.model_dir(model)
        if not d.is_dir():
            return []
        # Only canonical ASCII numbers: str.isdigit() also accepts "²" (which int() rejects), and
        # "01" would alias version 1 while its files live under another path. Bounded length: a
        # 5,000-digit name must not reach int()'s digit limit.
        return sorted(int(p.name) for p in d.iterdir()
                      if p.is_dir() and p.name.isascii() and p.name.isdigit() and len(p.name) <= 18
                      and p.name == str(int(p.name)) and int(p.name) > 0)

    def version(self, model: str, version: int | None = None) -> VersionInfo:
        """One version (the latest when `version` is None), with its manifest."""
        numbers = self.version_numbers(model)
        if not numbers:
            raise RepositoryError("model has no versions", value=model, origin=model)
        v = numbers[-1] if version is None else version
        if v not in numbers:
            raise RepositoryError(f"model {model!r} has no version {v}", value=v, origin=model,
                                  hint=f"versions: {', '.join(map(str, numbers))}")
        path = self.root / model / str(v)
        manifest, problems = None, []
        if path.is_symlink() and not _within(_resolve(path), _resolve(self.root / model)):
            problems.append("the version folder resolves outside its model folder (a symlink)")
            return VersionInfo(model, v, path, None, problems)
        try:
            mpath = checked_file(path, MANIFEST, MANIFEST)
            manifest = json.loads(read_bounded(mpath, self.limits.max_metadata_bytes, MANIFEST))
        except RepositoryError as e:
            problems.append(f"{MANIFEST} is missing" if e.message.endswith("is missing")
                            else f"{MANIFEST} cannot be read: {e.message}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{MANIFEST} is not valid JSON: {e}")
        except RecursionError:
            problems.append(f"{MANIFEST} is nested too deeply")
        except OSError as e:
            problems.append(f"{MANIFEST} cannot be read: {e.strerror or e}")
        if manifest is not None and not isinstance(manifest, dict):
            problems.append(f"{MANIFEST} is not a JSON object")
            manifest = None
        return VersionInfo(model, v, path, manifest, problems)

    def versions(self, model: str) -> list[VersionInfo]:
        return [self.version(model, v) for v in self.version_numbers(model)]

    def read_samples(self, info: VersionInfo, rows: int | None = None, *,
                     inputs_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The version's samples (see `read_samples`), None when it has none; the path is the
        manifest's `samples_file` (default samples.npz), checked like every other."""
        rel = (info.manifest or {}).get("samples_file", SAMPLES)
        try:
            path = checked_file(info.path, rel, "samples_file")
        except RepositoryError as e:
            if e.message.endswith("is missing") and not (info.path / str(rel)).is_symlink():
                return None
            raise
        return read_samples(path, rows, max_bytes=self.limits.max_samples_bytes, inputs_only=inputs_only)

    # -- verification ----------------------------------------------------------------------
    def verify_version(self, info: VersionInfo) -> list[str]:
        """Every problem found: missing, changed or unlisted files, paths that leave the version
        folder, files that are not regular, ONNX external data outside the model's folder. Empty
        means verified: the server loads exactly such versions (it calls this), so `inspect`
        says what the server will do."""
        problems = list(info.problems)
        if info.manifest is None:
            return problems
        listed = info.manifest.get("files", {})
        if info.manifest.get("format") != MANIFEST_FORMAT:
            problems.append(f"unknown manifest format {str(info.manifest.get('format'))[:80]!r}")
        if not isinstance(listed, dict):
            problems.append(f"{MANIFEST}: `files` is not a mapping of file -> sha256 and size")
            listed = {}
        for rel, meta in listed.items():
            try:
                p = checked_file(info.path, rel, "manifest file")
            except RepositoryError as e:
                problems.append(f"{rel}: missing" if e.message.endswith("is missing") else _problem(e))
                continue
            if not isinstance(meta, dict):
                problems.append(f"{rel}: manifest entry is not {{sha256, size}}")
                continue
            try:
                size = p.stat().st_size
                if size != meta.get("size"):
                    problems.append(f"{rel}: size {size} != {str(meta.get('size'))[:40]} in the manifest")
                elif sha256_file(p) != meta.get("sha256"):
                    problems.append(f"{rel}: sha256 does not match the manifest")
            except OSError as e:
                problems.append(f"{rel}: cannot be read: {e.strerror or e}")
        for rel, kind in _walk(info.path):
            if kind == "dir-link":
                problems.append(f"{rel}: a symlinked folder (not followed; files of a version are real files "
                                "or links to files inside it)")
            elif rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
        mf = info.manifest.get("model_file")
        if mf:
            if not isinstance(mf, str) or mf not in listed:
                problems.append(f"model file {str(mf)[:120]!r} is not listed in the manifest")
            else:
                try:
                    path = checked_file(info.path, mf, "model_file")
                    if mf.endswith(".onnx"):
                        problems += onnx_external_data_problems(path, info.path, mf)
                except RepositoryError as e:
                    problems.append(_problem(e))
        return list(dict.fromkeys(problems))

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
        try:
            stage = Staging(self, model)
        except OSError as e:
            err = disk_error(e, self.root / model)
            if err is None:
                raise
            raise err from None
        try:
            yield stage
        except OSError as e:
            # A full disk while staging (or committing): the staging folder goes (finally), and
            # the user reads one line naming the path instead of a traceback.
            err = disk_error(e, stage.dir)
            if err is None:
                raise
            raise err from None
        finally:
            stage.discard()


def _problem(e: RepositoryError) -> str:
    """A checked-path error as one problem line, naming the (relative) path."""
    if e.value is not None and str(e.value) not in e.message:
        return f"{e.value}: {e.message}"
    return e.message


def _walk(top: Path) -> Iterator[tuple[str, str]]:
    """(relative path, kind) of every entry below `top` that is not a real folder, symlinks not
    followed: kind is "dir-link" for a symlink to a folder, "entry" for anything else."""
    for dirpath, dirnames, filenames in os.walk(top):
        base = Path(dirpath)
        for n in dirnames:
            if (base / n).is_symlink():
                yield (base / n).relative_to(top).as_posix(), "dir-link"
        for n in filenames:
            yield (base / n).relative_to(top).as_posix(), "entry"


def onnx_external_data_problems(model_path: Path, version_dir: Path, rel: str) -> list[str]:
    """Problems with an ONNX model's external data: every tensor stored outside the .onnx file
    must name a canonical relative file inside the model's folder (and so its version folder),
    which is ONNX Runtime's own rule; the server refuses such a model before ONNX Runtime sees it."""
    if not _may_name_external_data(model_path):
        return []
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        return []
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX, or corrupt: the backend's load says so, as before
        return []
    problems = []
    seen = set()
    for t in _onnx_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if location in seen:
            continue
        seen.add(location)
        try:
            checked_file(model_path.parent, location, f"external data of tensor {t.name!r}", within=version_dir)
        except RepositoryError as e:
            problems.append(f"{rel}: {_problem(e)}")
    return problems


_LOCATION_ENTRY = b"\x0a\x08location"
"""A StringStringEntryProto whose key (field 1, 8 bytes) is "location": every external-data
reference holds one, so a file without these bytes has none."""


def _may_name_external_data(path: Path) -> bool:
    """Whether the file may reference external data: a scan of its bytes (mmap, no copy), so that a
    multi-GB model with inline weights is never parsed a second time just to find out."""
    import mmap

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(_LOCATION_ENTRY) != -1
    except (OSError, ValueError):
        return True  # let the parse decide


def _onnx_tensors(model) -> Iterator[Any]:  # noqa: ANN001
    """Every TensorProto of a model: initializers, sparse ones, node attributes, subgraphs and
    functions included."""
    def graph(g):  # noqa: ANN001
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for n in g.node:
            yield from nodes([n])

    def nodes(ns):  # noqa: ANN001
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
                if a.HasField("g"):
                    yield from graph(a.g)
                for sub in a.graphs:
                    yield from graph(sub)

    yield from graph(model.graph)
    for f in model.functions:
        yield from nodes(f.node)
