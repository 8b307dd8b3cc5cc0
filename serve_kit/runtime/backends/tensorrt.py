"""TensorRT backend: runs a serialized engine (`model.plan`) on one CUDA GPU.

Each backend object owns one execution context and one CUDA stream, so the server's instances
(one backend object each) run side by side on the GPU. Memory and streams come from PyTorch's CUDA
runtime (the GPU image has torch; no pycuda): device buffers and pinned host buffers that grow to
the largest request seen and are then reused.

An engine runs only on the TensorRT version and GPU architecture that built it; loading it
elsewhere can crash the process or fail with an opaque error. So before deserializing, the build
facts that `serve-kit optimize` recorded in manifest.json are compared with this machine, and a
mismatch is a ModelLoadError that says what to rebuild.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError, ModelLoadError
from . import Backend, option_flag, register_backend

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def recorded_engine_info(model_path: Path) -> dict[str, Any] | None:
    """details.tensorrt (plus the variant's name) from the manifest.json beside the model, or None
    when there is none (an engine outside a model repository, e.g. during validation)."""
    path = Path(model_path).parent / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    info = ((manifest.get("details") or {}).get("tensorrt") if isinstance(manifest, dict) else None)
    if not isinstance(info, dict):
        return None
    return {**info, "variant": manifest.get("variant")}


def engine_compat_problems(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings) from comparing an engine's recorded build facts with this machine.

    A different TensorRT version or compute capability cannot run the engine (errors). A
    different GPU of the same compute capability can, but its tactics were timed on the other
    GPU (a warning)."""
    errors, warnings = [], []
    rv, cv = recorded.get("tensorrt_version"), current.get("tensorrt_version")
    if rv and cv and str(rv) != str(cv):
        errors.append(f"built with TensorRT {rv}, this machine has TensorRT {cv}")
    rc, cc = recorded.get("compute_capability"), current.get("compute_capability")
    if rc and cc and str(rc) != str(cc):
        errors.append(f"built for compute capability {rc} ({recorded.get('gpu_name')}), this GPU "
                      f"({current.get('gpu_name')}) has compute capability {cc}")
    rn, cn = recorded.get("gpu_name"), current.get("gpu_name")
    if rn and cn and rn != cn and not errors:
        warnings.append(f"built on {rn}, running on {cn} (same compute capability {cc}): it runs, "
                        "but its kernels were timed on the other GPU")
    return errors, warnings


def check_engine_compat(model_path: Path, current: dict[str, Any], strict_gpu_match: bool = False) -> list[str]:
    """Raise ModelLoadError when the engine beside its manifest cannot run here; returns warnings."""
    recorded = recorded_engine_info(model_path)
    if recorded is None:
        return []
    errors, warnings = engine_compat_problems(recorded, current)
    if strict_gpu_match and warnings:
        errors, warnings = errors + warnings, []
    if errors:
        target = recorded.get("variant") or "trt-fp16"
        raise ModelLoadError(
            "this TensorRT engine was built for another platform: " + "; ".join(errors)
            + f" (recorded: TensorRT {recorded.get('tensorrt_version')}, {recorded.get('gpu_name')}, compute "
              f"capability {recorded.get('compute_capability')}; here: TensorRT {current.get('tensorrt_version')}, "
              f"{current.get('gpu_name')}, compute capability {current.get('compute_capability')})",
            origin=str(model_path),
            hint=f"TensorRT engines run only where they were built: rebuild it on this GPU with "
                 f"`serve-kit optimize --target {target}` (or serve the version's onnx variant)")
    return warnings


def current_platform(device_index: int = 0) -> dict[str, Any]:
    """This machine's TensorRT version and GPU, in the keys the build records."""
    import tensorrt as trt

    from ...gpu import gpu_info

    gpu = gpu_info(device_index)
    return {"tensorrt_version": trt.__version__, "gpu_name": gpu.get("name"),
            "compute_capability": gpu.get("compute_capability")}


def _unavailable(model_path: Path) -> None:
    from ...gpu import TENSORRT_INSTALL_HINT, tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        raise ModelLoadError(f"cannot run a TensorRT engine here: {reason}", origin=str(model_path),
                             hint=TENSORRT_INSTALL_HINT)


@register_backend
class TensorRTBackend(Backend):
    """Options (config.yaml `parameters`): `device` (cuda or cuda:N, default cuda:0);
    `strict_gpu_match` (refuse an engine built on another GPU model of the same architecture)."""

    name = "tensorrt"
    file_name = "model.plan"

    def _load_impl(self) -> None:
        _unavailable(self.model_path)
        import tensorrt as trt
        import torch

        from ...gpu import cuda_device, tensorrt_logger

        try:
            device = cuda_device(self.options.get("device") or "cuda")
        except ValueError as e:
            raise ModelLoadError(str(e), value=self.options.get("device"), origin="parameters.device",
                                 hint="TensorRT runs on a GPU: use cuda or cuda:N") from None
        if device is None:
            raise ModelLoadError("a TensorRT engine cannot run on the CPU", value=self.options.get("device"),
                                 origin="parameters.device", hint="use cuda or cuda:N, or serve the onnx variant")
        self._index = int(device.split(":")[1])
        if self._index >= torch.cuda.device_count():
            raise ModelLoadError(f"no CUDA device {self._index} (this machine has {torch.cuda.device_count()})",
                                 value=device, origin="parameters.device")
        torch.cuda.init()  # TensorRT runs in the CUDA context that torch creates and shares
        self.platform = current_platform(self._index)
        for w in check_engine_compat(self.model_path, self.platform, option_flag(self.options.get("strict_gpu_match"))):
            log.warning("%s: %s", self.model_path, w)

        with torch.cuda.device(self._index):
            logger = tensorrt_logger()
            self._runtime = trt.Runtime(logger)
            logger.errors.clear()
            engine = self._runtime.deserialize_cuda_engine(self.model_path.read_bytes())
            if engine is None:
                why = "; ".join(list(logger.errors)[-3:]) or "see TensorRT's log"
                raise ModelLoadError(f"TensorRT could not deserialize the engine: {why}", origin=str(self.model_path),
                                     hint="a corrupt file, or one built by another TensorRT version or GPU: rebuild "
                                          "it on this GPU with `serve-kit optimize --target trt-fp16`")
            self.engine = engine
            self._logger = logger
            self._context = engine.create_execution_context()
            if self._context is None:
                raise ModelLoadError("TensorRT could not create an execution context (out of GPU memory?)",
                                     origin=str(self.model_path))
            self._stream = torch.cuda.Stream(device)

        self._dtypes: dict[str, np.dtype] = {}
        self._ranges: dict[str, tuple[list[int], list[int]]] = {}
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            try:
                self._dtypes[name] = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            except TypeError:
                raise ModelLoadError(f"engine I/O tensor {name!r} has type {engine.get_tensor_dtype(name)}, "
                                     "which numpy cannot hold", origin=str(self.model_path),
                                     hint="export the model with FP32/FP16/integer inputs and outputs") from None
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(name)
                lo, _, hi = engine.get_tensor_profile_shape(name, 0)
                self._ranges[name] = (list(lo), list(hi))
            else:
                outputs.append(name)
        self.input_names = inputs
        self._engine_outputs = outputs
        # Exports name outputs after config.yaml; positional renaming covers engines built from an
        # ONNX file exported elsewhere under other names (as the onnxruntime backend does).
        if sorted(self.output_names) == sorted(outputs) or len(self.output_names) != len(outputs):
            self.output_names = list(outputs)
            self._rename = {n: n for n in outputs}
        else:
            self._rename = dict(zip(outputs, self.output_names))
        self._buffers: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def _input(self, name: str, arr: np.ndarray) -> np.ndarray:
        want = self._dtypes[name]
        if arr.dtype != want:
            if not np.can_cast(arr.dtype, want, "same_kind"):
                raise InputError(f"input {name!r} is {arr.dtype}, the engine takes {want}", origin=str(self.model_path))
            arr = arr.astype(want)
        lo, hi = self._ranges[name]
        if arr.ndim != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, arr.shape, hi)):
            raise InputError(f"input {name!r} has shape {list(arr.shape)}, outside the engine's profile "
                             f"(min {lo}, max {hi})", origin=str(self.model_path),
                             hint="rebuild the engine with a larger max_batch_size or `shapes` in the trt target's "
                                  "config, or keep config.yaml's max_batch_size within it")
        return np.ascontiguousarray(arr)

    def _buffer(self, name: str, nbytes: int):
        """(device, pinned host) byte buffers of at least `nbytes`, grown on demand."""
        import torch

        dev, host = self._buffers.get(name, (None, None))
        if dev is None or dev.numel() < nbytes:
            size = max(nbytes, 256)
            with torch.cuda.stream(self._stream):
                dev = torch.empty(size, dtype=torch.uint8, device=f"cuda:{self._index}")
            host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._buffers[name] = (dev, host)
        return dev, host

    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ctx = self._context
        with self._lock, torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            for name in self.input_names:
                arr = self._input(name, inputs[name])
                dev, host = self._buffer(name, arr.nbytes)
                host.numpy()[: arr.nbytes] = arr.reshape(-1).view(np.uint8)
                dev[: arr.nbytes].copy_(host[: arr.nbytes], non_blocking=True)
                ctx.set_input_shape(name, arr.shape)
                ctx.set_tensor_address(name, dev.data_ptr())
            shapes = {}
            for name in self._engine_outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {name!r} has a data-dependent shape {shape}, which this backend "
                                       "does not support")
                shapes[name] = shape
                dev, _ = self._buffer(name, int(np.prod(shape)) * self._dtypes[name].itemsize)
                ctx.set_tensor_address(name, dev.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT failed to enqueue the engine: "
                                   + ("; ".join(list(self._logger.errors)[-3:]) or "see TensorRT's log"))
            for name in self._engine_outputs:
                nbytes = int(np.prod(shapes[name])) * self._dtypes[name].itemsize
                dev, host = self._buffers[name]
                host[:nbytes].copy_(dev[:nbytes], non_blocking=True)
            self._stream.synchronize()
            # Copies: the pinned buffers are reused by the next call.
            return {self._rename[name]: host_view(self._buffers[name][1], shapes[name], self._dtypes[name]).copy()
                    for name in self._engine_outputs}


def host_view(host, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return host.numpy()[:nbytes].view(dtype).reshape(shape)
