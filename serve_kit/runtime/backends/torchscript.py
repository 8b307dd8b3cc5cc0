"""TorchScript backend (torch.jit.load; TorchScript's own restricted loader, never plain pickle)."""

from __future__ import annotations

import threading

import numpy as np

from ...errors import ModelLoadError
from . import Backend, register_backend


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
        try:
            self.module = torch.jit.load(str(self.model_path), map_location="cpu")
        except Exception as e:
            raise ModelLoadError(f"not a loadable TorchScript file: {str(e).strip().splitlines()[0]}",
                                 origin=str(self.model_path)) from None
        self.module.eval()
        if self.options.get("optimize_for_inference", True):
            # Frozen-graph rewrites for this machine (conv/bn folding, MKL-DNN); measured ~1.7x on
            # the digits CNN. A module that cannot be frozen runs unoptimized.
            try:
                self.module = torch.jit.optimize_for_inference(torch.jit.freeze(self.module)
                                                               if not _is_frozen(self.module) else self.module)
            except Exception:
                pass
        names = self.options.get("input_names")
        if names:
            self.input_names = list(names)
        else:
            try:
                args = self.module.forward.schema.arguments[1:]
                self.input_names = [a.name for a in args]
            except AttributeError:
                self.input_names = ["input_0"]

    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self._threads > 0 and self._threads_set_for != threading.get_ident():
            torch.set_num_threads(self._threads)
            self._threads_set_for = threading.get_ident()
        with torch.no_grad():  # inference_mode breaks unfrozen TorchScript modules
            args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names]
            return torch_outputs_to_numpy(self.module(*args), self.output_names)
