"""The wheels that go into an image: the runtime's dependency closure, pinned to the versions installed
here, prefetched for the image's platform (never downloaded during a build), and serve-kit's own
wheel, built reproducibly from its source tree.

Why pins from this environment: the image then runs exactly the library versions that optimize
validated the model with, and the same inputs give the same wheels (and so the same image digest).
Why the runtime's closure rather than serve-kit's full requirements: `onnx` (about 50 MB) is used by
optimize and inspect only; the runtime never imports it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, cpython_tags, compatible_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from .errors import PackagingError

#: serve-kit's core requirements that the runtime (serve_kit.runtime, serve_kit.cli serve) never imports.
NOT_IN_RUNTIME = frozenset({"onnx"})


@dataclass(frozen=True)
class Platform:
    """The image's Python: version and the wheel platform tags its libc accepts."""

    python: tuple[int, int]
    glibc: tuple[int, int]
    machine: str = "x86_64"
    python_full: str | None = None

    @property
    def platforms(self) -> list[str]:
        """manylinux tags from the newest the glibc accepts down to manylinux2014 and its aliases."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{legacy[m]}_{self.machine}" for m in (17, 12, 5) if m <= minor]
        return tags

    @property
    def tags(self) -> list[Tag]:
        """Every wheel tag the image's interpreter accepts, most preferred first."""
        return [*cpython_tags(self.python, platforms=self.platforms),
                *compatible_tags(self.python, f"cp{self.python[0]}{self.python[1]}", platforms=self.platforms)]

    def marker_environment(self) -> dict[str, str]:
        env = default_environment()
        full = self.python_full or f"{self.python[0]}.{self.python[1]}.0"
        env.update(python_version=f"{self.python[0]}.{self.python[1]}", python_full_version=full,
                   implementation_name="cpython", implementation_version=full, platform_python_implementation="CPython",
                   os_name="posix", sys_platform="linux", platform_system="Linux", platform_machine=self.machine)
        return env


def cache_dir() -> Path:
    root = os.environ.get("SERVE_KIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "serve-kit")
    return Path(root)


def runtime_requirements(serve_kit_wheel: Path, platform: Platform,
                         exclude: frozenset[str] = NOT_IN_RUNTIME) -> list[tuple[str, str]]:
    """(name, version) of every distribution the runtime needs on `platform`, pinned to the version
    installed here, sorted by name: the closure of the core requirements of the serve-kit wheel that
    goes into the image (its metadata, not an installed copy's, which may be stale)."""
    env = platform.marker_environment()
    pins: dict[str, str] = {}
    todo = [r for r in _requirements(wheel_requires(serve_kit_wheel), env)
            if canonicalize_name(r.name) not in exclude]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in pins:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise PackagingError(f"the runtime needs {req}, which is not installed here", value=str(req),
                                 hint="install serve-kit's core dependencies (pip install serve-kit); the image "
                                      "gets the versions installed here") from None
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            raise PackagingError(f"installed {req.name} {dist.version} does not satisfy {req}", value=str(req),
                                 hint="repair the environment (pip check) before packaging")
        pins[name] = dist.version
        todo.extend(_requirements(dist, env))
    return sorted(pins.items())


def _requirements(dist: md.Distribution | list[str], env: dict[str, str]) -> list[Requirement]:
    out = []
    for text in (dist if isinstance(dist, list) else dist.requires or []):
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            out.append(req)
    return out


def _wheel_rank(path: Path, tag_rank: dict[Tag, int]) -> int | None:
    try:
        _, _, _, tags = parse_wheel_filename(path.name)
    except Exception:  # noqa: BLE001 - not a wheel name we understand
        return None
    ranks = [tag_rank[t] for t in tags if t in tag_rank]
    return min(ranks) if ranks else None


def _find_cached(folder: Path, name: str, version: str, tag_rank: dict[Tag, int]) -> Path | None:
    best: tuple[int, str, Path] | None = None
    if not folder.is_dir():
        return None
    for p in folder.glob("*.whl"):
        try:
            wname, wversion, _, _ = parse_wheel_filename(p.name)
        except Exception:  # noqa: BLE001
            continue
        if canonicalize_name(wname) != name or str(wversion) != str(md_version(version)):
            continue
        rank = _wheel_rank(p, tag_rank)
        if rank is not None and (best is None or (rank, p.name) < best[:2]):
            best = (rank, p.name, p)
    return best[2] if best else None


def md_version(text: str):
    from packaging.version import Version

    return Version(text)


def prefetch(pins: list[tuple[str, str]], platform: Platform, log=lambda m: None) -> list[Path]:
    """The wheel for every pin, from the cache or downloaded into it by pip (binary wheels only, for
    the image's platform, without dependencies: the pins are the closure)."""
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    tag_rank = {t: i for i, t in enumerate(platform.tags)}
    missing = [(n, v) for n, v in pins if _find_cached(folder, n, v, tag_rank) is None]
    if missing:
        log(f"downloading {len(missing)} wheel(s) for cp{platform.python[0]}{platform.python[1]} "
            f"{platform.platforms[0]}: {', '.join(f'{n}=={v}' for n, v in missing)}")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--implementation", "cp",
               "--python-version", f"{platform.python[0]}.{platform.python[1]}",
               "--abi", f"cp{platform.python[0]}{platform.python[1]}", "-d", str(folder)]
        for p in platform.platforms:
            cmd += ["--platform", p]
        cmd += [f"{n}=={v}" for n, v in missing]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise PackagingError("pip download of the runtime's wheels took over 15 minutes", origin="pip download",
                                 hint="check the package index connection (pip config list)") from None
        if run.returncode != 0:
            raise PackagingError("could not fetch the runtime's wheels for the image's platform: "
                                 + _tail(run.stderr), origin="pip download",
                                 hint="the wheels are prefetched on this host, then installed with --no-index; "
                                      "check the index connection, or prefill " + str(folder))
    wheels = []
    for n, v in pins:
        found = _find_cached(folder, n, v, tag_rank)
        if found is None:
            raise PackagingError(f"no wheel of {n}=={v} for the image's platform", value=f"{n}=={v}",
                                 origin=str(folder), hint=f"the image needs one of: {platform.platforms[0]} ... "
                                                          "manylinux2014 wheels (no source builds in a hermetic image)")
        wheels.append(found)
    return wheels


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


# ---------------------------------------------------------------------------------------------
# serve-kit's own wheel

def source_tree() -> Path | None:
    """The checkout serve-kit runs from (pyproject.toml naming serve-kit), or None when installed."""
    import serve_kit

    root = Path(serve_kit.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'^name\s*=\s*"serve-kit"', pyproject.read_text(), re.M):
        return root
    return None


def build_serve_kit_wheel(dest: Path, epoch: int, log=lambda m: None) -> Path:
    """Build serve-kit's wheel from its source tree, reproducibly: only the files a wheel takes
    (pyproject.toml, README.md, serve_kit/ without caches) are copied to a scratch folder, and zip
    timestamps come from SOURCE_DATE_EPOCH."""
    root = source_tree()
    if root is None:
        raise PackagingError("serve-kit is not installed from a source tree, so its wheel cannot be built",
                             hint="pass --serve-kit-wheel PATH (e.g. from `pip download serve-kit --no-deps`)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="serve-kit-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
            if (root / name).is_file():
                shutil.copyfile(root / name, src / name)
        shutil.copytree(root / "serve_kit", src / "serve_kit",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "*.egg-info"))
        out = Path(tmp) / "out"
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(max(epoch, 315532800)))  # zip cannot store dates before 1980
        log("building serve-kit's wheel from " + str(root))
        # The build backend installed here when it is recent enough (>= 71 builds wheels by itself): no
        # download; else pip's isolated build fetches the one pyproject.toml asks for.
        isolation = ["--no-build-isolation", "--no-index"] if _has_setuptools(71) else []
        run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                              "--no-deps", *isolation, "-w", str(out), str(src)],
                             capture_output=True, text=True, timeout=600, env=env)
        if run.returncode != 0:
            raise PackagingError("building serve-kit's wheel failed: " + _tail(run.stderr), origin=str(root))
        built = sorted(out.glob("serve_kit-*.whl"))
        if len(built) != 1:
            raise PackagingError("building serve-kit's wheel gave no single wheel", value=[p.name for p in built])
        target = dest / built[0].name
        shutil.copyfile(built[0], target)
    return target


def _has_setuptools(major: int) -> bool:
    try:
        return int(md.version("setuptools").split(".")[0]) >= major
    except (md.PackageNotFoundError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Facts about a wheel (for the SBOM)

@dataclass(frozen=True)
class WheelInfo:
    path: Path
    name: str
    version: str
    sha256: str
    license: str | None
    license_expression: str | None
    summary: str | None
    homepage: str | None


def _metadata(path: Path):
    try:
        with zipfile.ZipFile(path) as z:
            meta_name = next((n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
            if meta_name is None:
                raise PackagingError("wheel has no METADATA", value=path.name, origin=str(path))
            return HeaderParser().parsestr(z.read(meta_name).decode("utf-8", "replace"))
    except (OSError, zipfile.BadZipFile) as e:
        raise PackagingError(f"not a readable wheel: {e}", value=str(path), origin=str(path)) from None


def wheel_requires(path: Path) -> list[str]:
    """Requires-Dist of a wheel."""
    return list(_metadata(path).get_all("Requires-Dist") or [])


def wheel_info(path: Path) -> WheelInfo:
    meta = _metadata(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    license_text = meta.get("License")
    if license_text and (len(license_text) > 100 or "\n" in license_text):
        license_text = None  # some projects paste their whole license file here
    if not license_text:
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::") and c.count("::") >= 2]
        license_text = ", ".join(classifiers) or None
    homepage = meta.get("Home-page")
    if not homepage:
        for url in meta.get_all("Project-URL") or []:
            label, _, value = url.partition(",")
            if label.strip().lower() in ("homepage", "home", "source", "repository"):
                homepage = value.strip()
                break
    return WheelInfo(path, meta.get("Name") or path.name.split("-")[0], meta.get("Version") or "", h.hexdigest(),
                     license_text, meta.get("License-Expression"), meta.get("Summary"), homepage)
