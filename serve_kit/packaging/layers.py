"""Deterministic image layers: the same files give the same bytes, and so the same digest.

A layer is a tar stream, gzip-compressed. What would make two builds of the same files differ is
fixed here: entries are sorted (parents before children), every mtime is the build's epoch
(SOURCE_DATE_EPOCH, default 0), owners are numeric (uid/gid 0 unless asked, no user or group
names), modes are normalized (directories 0755, files 0644 or 0755 when any execute bit is set,
symlinks as they are), there are no hard links, device files or extended attributes, and gzip
writes no file name and mtime 0. The compressed bytes also depend on zlib's version (the host's).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import PackagingError


@dataclass(frozen=True)
class Entry:
    """One entry of a layer: `path` is absolute in the image (`/opt/x`)."""

    path: str
    kind: str  # "dir" | "file" | "symlink"
    mode: int = 0o755
    source: Path | None = None
    data: bytes | None = None
    target: str | None = None
    uid: int = 0
    gid: int = 0

    @property
    def key(self) -> tuple[str, ...]:
        return PurePosixPath(self.path).parts[1:]


def parents(path: str, uid: int = 0, gid: int = 0) -> list[Entry]:
    """Directory entries for every parent of `path` (not `/` itself)."""
    out = []
    p = PurePosixPath(path).parent
    while str(p) != "/":
        out.append(Entry(str(p), "dir", 0o755, uid=uid, gid=gid))
        p = p.parent
    return out


def tree(root: Path, at: str, uid: int = 0, gid: int = 0) -> list[Entry]:
    """Every directory, file and symlink under the host folder `root`, placed at `at` in the image
    (with `at`'s parents)."""
    entries = [*parents(at, uid, gid), Entry(at, "dir", 0o755, uid=uid, gid=gid)]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        rel = base.relative_to(root)
        for name in sorted(dirnames + filenames):
            host = base / name
            image_path = str(PurePosixPath(at) / PurePosixPath(rel.as_posix()) / name) if str(rel) != "." \
                else str(PurePosixPath(at) / name)
            st = host.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(image_path, "symlink", 0o777, target=os.readlink(host), uid=uid, gid=gid))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry(image_path, "dir", 0o755, uid=uid, gid=gid))
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entries.append(Entry(image_path, "file", mode, source=host, uid=uid, gid=gid))
            else:
                raise PackagingError("cannot put a special file into an image layer", value=str(host))
        # os.walk does not descend into symlinked directories (followlinks=False): they stay links.
    return entries


class _HashingWriter(io.RawIOBase):
    """Passes writes on to `sink` (or nowhere) while hashing and counting them."""

    def __init__(self, sink=None):
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        if self.sink is not None:
            self.sink.write(b)
        return len(b)


@dataclass
class Layer:
    """A written layer blob: `digest`/`size` of the gzip file, `diff_id`/`tar_size` of the tar."""

    path: Path
    digest: str
    size: int
    diff_id: str
    tar_size: int
    created_by: str = ""
    files: int = 0
    extra: dict = field(default_factory=dict)


def write_layer(entries: list[Entry], out: Path, epoch: int = 0, created_by: str = "") -> Layer:
    """Write `entries` as a gzip'd tar at `out`. Duplicate paths keep the last entry."""
    unique: dict[tuple[str, ...], Entry] = {}
    for e in entries:
        unique[e.key] = e
    ordered = [unique[k] for k in sorted(unique)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        gz_hash = _HashingWriter(f)
        with gzip.GzipFile(filename="", mode="wb", fileobj=gz_hash, compresslevel=6, mtime=0) as gz:
            tar_hash = _HashingWriter(gz)
            with tarfile.open(fileobj=tar_hash, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for e in ordered:
                    info = tarfile.TarInfo("/".join(e.key) + ("/" if e.kind == "dir" else ""))
                    info.mtime = epoch
                    info.uid, info.gid, info.uname, info.gname = e.uid, e.gid, "", ""
                    info.mode = e.mode
                    if e.kind == "dir":
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
                    elif e.kind == "symlink":
                        info.type = tarfile.SYMTYPE
                        info.linkname = e.target or ""
                        tar.addfile(info)
                    else:
                        info.type = tarfile.REGTYPE
                        if e.data is not None:
                            info.size = len(e.data)
                            tar.addfile(info, io.BytesIO(e.data))
                        else:
                            info.size = e.source.stat().st_size
                            with open(e.source, "rb") as src:
                                tar.addfile(info, src)
        f.flush()
    return Layer(out, "sha256:" + gz_hash.sha.hexdigest(), gz_hash.size, "sha256:" + tar_hash.sha.hexdigest(),
                 tar_hash.size, created_by, files=sum(1 for e in ordered if e.kind == "file"))


# ---------------------------------------------------------------------------------------------
# A virtual environment assembled on the host, for an image's interpreter

VENV = "/opt/serve-kit/venv"


def stage_venv(wheels: list[Path], staging: Path, python_exe: str, python: tuple[int, int],
               venv: str = VENV) -> Path:
    """Install `wheels` (no dependency resolution: they are the closure) into a virtual environment
    at `venv` in the image, laid out under the host folder `staging` (its image root), without running
    the image: the layout `python -m venv --without-pip` makes for `python_exe`, then each wheel
    unpacked by pypa/installer with scripts pointing at the venv's interpreter. No bytecode is
    compiled (as `pip install --no-compile` in the engine build), so the layer is reproducible."""
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    x, y = python
    root = staging / venv.lstrip("/")
    (root / "bin").mkdir(parents=True, exist_ok=True)
    site = f"{venv}/lib/python{x}.{y}/site-packages"
    (staging / site.lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.symlink(python_exe, root / "bin" / "python")
    os.symlink("python", root / "bin" / "python3")
    os.symlink("python", root / "bin" / f"python{x}.{y}")
    os.symlink("lib", root / "lib64")
    (root / "pyvenv.cfg").write_text(f"home = {PurePosixPath(python_exe).parent}\n"
                                     "include-system-site-packages = false\n"
                                     f"version = {x}.{y}\n"
                                     f"executable = {python_exe}\n")
    scheme = {"purelib": site, "platlib": site, "headers": f"{venv}/include/site/python{x}.{y}",
              "scripts": f"{venv}/bin", "data": venv}
    for wheel in sorted(wheels, key=lambda p: p.name):
        destination = SchemeDictionaryDestination(scheme, interpreter=f"{venv}/bin/python", script_kind="posix",
                                                  bytecode_optimization_levels=(), destdir=str(staging))
        try:
            with WheelFile.open(wheel) as source:
                install(source, destination, additional_metadata={"INSTALLER": b"serve-kit\n"})
        except Exception as e:  # noqa: BLE001 - installer raises plain exceptions for broken wheels
            raise PackagingError(f"could not install {wheel.name} into the image's environment: {e}",
                                 origin=str(wheel)) from None
    return root
