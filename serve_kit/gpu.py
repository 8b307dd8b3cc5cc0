"""Facts about the GPU stack on this machine, each with the reason when a part is missing.

optimize (which targets can run), the runtime backends (which device a model loads on) and bench
(CUDA timing, NVML) ask here, so that "unavailable" always comes with the same plain reason and a
GPU-only feature is never skipped silently. Every import is lazy: the CPU runtime image has
neither torch nor TensorRT.
"""

from __future__ import annotations

import functools
from typing import Any

TENSORRT_INSTALL_HINT = (
    "install it from NVIDIA's index: pip install 'serve-kit[gpu]' --extra-index-url "
    "https://pypi.nvidia.com (needs an NVIDIA GPU and driver)")
"""The PyPI `tensorrt` packages only fetch the real wheel from NVIDIA's index at install time."""


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> str | None:
    """Why PyTorch cannot use a CUDA GPU here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (install serve-kit[torch] with a CUDA build of torch)"
    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    try:
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    except Exception as e:  # a broken driver raises instead of answering False
        return f"CUDA initialisation failed: {str(e).strip().splitlines()[0]}"
    return None


def cuda_available() -> bool:
    return cuda_unavailable_reason() is None


@functools.lru_cache(maxsize=None)
def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be built or run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    except Exception as e:  # the wheel imports its CUDA libraries at import time
        return f"TensorRT fails to import: {str(e).strip().splitlines()[0]}"
    return cuda_unavailable_reason()


def tensorrt_unavailable_message() -> str | None:
    """tensorrt_unavailable_reason() with how to install it, as optimize targets report it."""
    reason = tensorrt_unavailable_reason()
    return f"{reason}; {TENSORRT_INSTALL_HINT}" if reason else None


def ort_provider_unavailable_reason(provider: str) -> str | None:
    """Why an ONNX Runtime execution provider (e.g. CUDAExecutionProvider) cannot be used, or None."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider in available:
        return None
    return (f"ONNX Runtime {ort.__version__} here has no {provider} (it has {', '.join(available)}); "
            "the GPU build is the `onnxruntime-gpu` wheel (serve-kit[gpu]), which replaces `onnxruntime`")


@functools.lru_cache(maxsize=None)
def gpu_info(device: int = 0) -> dict[str, Any]:
    """Name, compute capability and memory of a CUDA device (empty when there is none)."""
    if cuda_unavailable_reason():
        return {}
    import torch

    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "compute_capability": f"{p.major}.{p.minor}",
            "total_memory_bytes": int(p.total_memory), "multiprocessors": int(p.multi_processor_count),
            "cuda_runtime": torch.version.cuda}


def cuda_device(device: str | None) -> str | None:
    """Normalise a device option (`cpu`, `cuda`, `cuda:1`); raises ValueError on anything else."""
    if device in (None, "", "cpu"):
        return None
    d = str(device)
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        return "cuda:0" if d == "cuda" else d
    raise ValueError(f"device {device!r} is not cpu, cuda or cuda:N")


@functools.lru_cache(maxsize=None)
def tensorrt_logger():
    """The process's one TensorRT logger (TensorRT expects a single logger per process).

    It forwards warnings and errors to Python logging (`serve_kit.tensorrt`) and keeps the last
    errors in `.errors`, so that a failed build or load can say why in its own message instead
    of pointing at stderr."""
    import collections
    import logging

    import tensorrt as trt

    log = logging.getLogger("serve_kit.tensorrt")

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: collections.deque[str] = collections.deque(maxlen=20)

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                self.errors.append(str(msg))
                log.error("%s", msg)
            elif level == 2:
                log.warning("%s", msg)

    return Logger()
