"""TorchScript backend (torch.jit.load; TorchScript's own restricted loader, never plain pickle).

Runs on the CPU by default; `device: cuda` (or cuda:N) loads the module onto that GPU, copies
inputs there and outputs back. With `cuda_graphs: true` each batch size in
`cuda_graph_batch_sizes` gets one captured CUDA graph (one launch instead of one per kernel, which
is what dominates small-batch latency on a GPU); a request is padded up to the next captured size.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from ...errors import ModelLoadError
from . import Backend, option_flag, register_backend

log = logging.getLogger(__name__)


def torch_outputs_to_numpy(result, output_names: list[str]) -> dict[str, np.ndarray]:
    """Map a module's return value (tensor, tuple/list or dict of tensors) to named arrays."""
    import torch

    if isinstance(result, torch.Tensor):
        values = [result]
    elif isinstance(result, dict):
        values = list(result.values())
        if not output_names:
            output_names = list(result.keys())
    elif isinstance(result, (tuple, list)):
        values = list(result)
    else:
        raise TypeError(f"model returned {type(result).__name__}; expected a tensor, a tuple or a dict of tensors")
    names = output_names or [f"output_{i}" for i in range(len(values))]
    if len(names) != len(values):
        raise ValueError(f"model returned {len(values)} outputs but {len(names)} output names are known: {names}")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values)}


def _is_frozen(module) -> bool:
    return not hasattr(module, "training") or not list(module.named_parameters())


@register_backend
class TorchScriptBackend(Backend):
    name = "torchscript"
    file_name = "model.pt"

    def _load_impl(self) -> None:
        import torch

        # torch's intra-op width is by default the whole machine: on a busy machine its threads
        # fought the event loop for the cores, and a digits-CNN call took 50-96 ms instead of
        # 0.1-0.3 ms (seen by serve-kit bench). The server's split of the cores (intra_op_threads
        # per instance) applies to torch as it does to ONNX Runtime. torch keeps the setting per
        # calling thread (OpenMP), so it is set in the thread that runs the model (_infer_impl).
        self._threads = int(self.options.get("intra_op_threads", 0))
        self._threads_set_for = None
        self.device = _device(self.options.get("device"))
        try:
            self.module = torch.jit.load(str(self.model_path), map_location=self.device)
        except Exception as e:
            raise ModelLoadError(f"not a loadable TorchScript file: {str(e).strip().splitlines()[0]}",
                                 origin=str(self.model_path)) from None
        self.module.eval()
        if self.options.get("optimize_for_inference", True):
            # Frozen-graph rewrites (conv/bn folding; MKL-DNN layouts on the CPU); measured ~1.7x on
            # the digits CNN. optimize_for_inference's extra passes target the CPU, so a CUDA
            # module is only frozen. A module that cannot be frozen runs unoptimized.
            try:
                frozen = torch.jit.freeze(self.module) if not _is_frozen(self.module) else self.module
                self.module = torch.jit.optimize_for_inference(frozen) if self.device == "cpu" else frozen
            except Exception:
                pass
        self._stream = torch.cuda.Stream(self.device) if self.device != "cpu" else None
        self._graphs = None
        if self._stream is not None and option_flag(self.options.get("cuda_graphs")):
            self._graphs = CudaGraphs(self.module, self.device, self._stream,
                                      _batch_sizes(self.options.get("cuda_graph_batch_sizes")))
        names = self.options.get("input_names")
        if names:
            self.input_names = list(names)
        else:
            try:
                args = self.module.forward.schema.arguments[1:]
                self.input_names = [a.name for a in args]
            except AttributeError:
                self.input_names = ["input_0"]
        # forward() arguments typed int/float/bool (e.g. a sample rate) take Python values: a
        # rank-0 input for one is converted per call instead of failing on a tensor.
        try:
            kinds = {a.name: str(a.type) for a in self.module.forward.schema.arguments[1:]}
        except AttributeError:
            kinds = {}
        self._scalar_args = {n: {"int": int, "float": float, "bool": bool}[kinds[n]]
                             for n in self.input_names if kinds.get(n) in ("int", "float", "bool")}

    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self._threads > 0 and self._threads_set_for != threading.get_ident():
            torch.set_num_threads(self._threads)
            self._threads_set_for = threading.get_ident()
        with torch.no_grad():  # inference_mode breaks unfrozen TorchScript modules
            args = [self._scalar_args[n](np.asarray(inputs[n]).item()) if n in self._scalar_args
                    else torch.from_numpy(np.asarray(inputs[n], order="C")) for n in self.input_names]
            if self._stream is None:
                return torch_outputs_to_numpy(self.module(*args), self.output_names)
            # Each backend instance has its own stream, so instances overlap on the GPU; the
            # copies back to the CPU (.cpu() in torch_outputs_to_numpy) wait for it.
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                args = [a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args]
                if self._graphs is not None and not self._scalar_args:
                    result = self._graphs.run(args)
                    if result is not None:
                        return torch_outputs_to_numpy(result, self.output_names)
                return torch_outputs_to_numpy(self.module(*args), self.output_names)


def _device(option) -> str:
    """`cpu` or `cuda:N` from the device option; a GPU that is not usable here is a load error."""
    from ...gpu import cuda_device, cuda_unavailable_reason

    try:
        device = cuda_device(option)
    except ValueError as e:
        raise ModelLoadError(str(e), value=option, origin="config.yaml parameters.device",
                             hint="use cpu, cuda or cuda:N") from None
    if device is None:
        return "cpu"
    reason = cuda_unavailable_reason()
    if reason:
        raise ModelLoadError(f"device {option} was asked for but CUDA is not usable here: {reason}",
                             value=option, origin="config.yaml parameters.device",
                             hint="run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch, "
                                  "or set device: cpu")
    import torch

    if int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ModelLoadError(f"no CUDA device {device} (this machine has {torch.cuda.device_count()})",
                             value=option, origin="config.yaml parameters.device")
    return device


def _batch_sizes(option) -> list[int]:
    if option in (None, ""):
        return [1, 2, 4, 8, 16, 32]
    items = option.split(",") if isinstance(option, str) else option
    try:
        sizes = sorted({int(b) for b in items})
    except (TypeError, ValueError):
        sizes = []
    if not sizes or sizes[0] < 1:
        raise ModelLoadError("cuda_graph_batch_sizes must be positive integers", value=option,
                             origin="config.yaml parameters.cuda_graph_batch_sizes", hint="e.g. 1,2,4,8,16")
    return sizes


class CudaGraphs:
    """One captured CUDA graph per (batch bucket, sample shapes, dtypes), captured on first use.

    A graph replays fixed addresses and shapes: inputs are copied into its static input tensors
    (padded with zeros up to the bucket) and the first `n` rows of its static outputs are returned.
    Batches above the largest bucket, and outputs that are not batch-first tensors, run eagerly
    (run() returns None)."""

    def __init__(self, module, device: str, stream, buckets: list[int]):
        self.module, self.device, self.stream, self.buckets = module, device, stream, buckets
        self._graphs: dict[tuple, tuple] = {}

    def run(self, args):
        n = args[0].shape[0] if args and args[0].dim() else 0
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None or any(a.dim() == 0 or a.shape[0] != n for a in args):
            return None
        key = (bucket, *[(tuple(a.shape[1:]), a.dtype) for a in args])
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(bucket, args)
            except Exception as e:  # an op that cannot be captured: this shape runs eagerly
                log.warning("CUDA graph capture failed for batch %d (%s); running eagerly", bucket, e)
                self._graphs[key] = None
        entry = self._graphs[key]
        if entry is None:
            return None
        graph, static_in, static_out = entry
        for s, a in zip(static_in, args):
            s[:n].copy_(a)
            if n < bucket:
                s[n:].zero_()
        graph.replay()
        if isinstance(static_out, dict):
            return {k: v[:n] for k, v in static_out.items()}
        if isinstance(static_out, (tuple, list)):
            return [v[:n] for v in static_out]
        return static_out[:n]

    def _capture(self, bucket: int, args):
        import torch

        static_in = [torch.zeros((bucket, *a.shape[1:]), dtype=a.dtype, device=self.device) for a in args]
        # Warm-up runs first: the TorchScript profiling executor specialises the graph over the
        # first runs, and cuBLAS/cuDNN allocate their workspaces; none of that may happen in capture.
        for _ in range(3):
            self.module(*static_in)
        torch.cuda.current_stream().synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            static_out = self.module(*static_in)
        outs = (list(static_out.values()) if isinstance(static_out, dict)
                else list(static_out) if isinstance(static_out, (tuple, list)) else [static_out])
        if not all(isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == bucket for o in outs):
            return None
        return graph, static_in, static_out
