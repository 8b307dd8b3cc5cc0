"""Load the source model and run it as the reference every variant is validated against.

Accepted: a TorchScript file, a torch.export program (.pt2), an ONNX file, or a Python factory
`package.module:function` returning an nn.Module, with optional weights (safetensors, or a
state_dict loaded with `weights_only=True`). Nothing is ever unpickled without restriction.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SourceSpec, TensorSpec, datatype_of
from ..errors import InputError, ModelLoadError
from ..repository import sha256_file
from .calibration import import_object


@dataclass
class Source:
    """The reference model."""

    kind: str
    """`torch` (an nn.Module, also from .pt2), `torchscript` or `onnx`."""
    ref: str
    sha256: str
    model: Any = None
    """The nn.Module / ScriptModule, or the ONNX file's Path."""
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    signature: Any = None
    """The optimize.signature.Signature settled for this run (constants, state, batch axes)."""
    _ort: Any = None
    _types: dict[str, Any] | None = None

    @property
    def reference_name(self) -> str:
        return {"torch": "pytorch-eager", "torchscript": "torchscript-source", "onnx": "onnx-source"}[self.kind]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the reference on named inputs (in the signature's order)."""
        if self.kind == "onnx":
            if self._ort is None:
                from ..runtime.backends import load_backend

                self._ort = load_backend("onnxruntime", self.model,
                                         output_names=[o.name for o in self.outputs or []])
            return self._ort.infer(inputs)
        import torch

        from ..runtime.backends.torchscript import torch_outputs_to_numpy

        names = [s.name for s in self.inputs or []]
        if self._types is None:
            from .signature import forward_parameters

            self._types = dict(forward_parameters(self.model))
        # TorchScript modules fail under inference_mode ("Inference tensors cannot be saved for
        # backward") when not frozen; no_grad is safe for both.
        with (torch.inference_mode() if self.kind == "torch" else torch.no_grad()):
            args = [_argument(inputs[n], self._types.get(n)) for n in names]
            result = self.model(*args)
        return torch_outputs_to_numpy(result, [o.name for o in self.outputs or []])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "ref": self.ref, "sha256": self.sha256, **self.info}


def _argument(value: np.ndarray, kind: str | None):
    """A forward() argument: a tensor, or a Python scalar where forward() takes int/float/bool."""
    import torch

    if kind in ("int", "float", "bool") and np.ndim(value) == 0:
        return {"int": int, "float": float, "bool": bool}[kind](np.asarray(value).item())
    return torch.from_numpy(np.asarray(value, order="C"))


def _hash_state(module) -> str:
    """sha256 over the module's parameters and buffers (names, dtypes, shapes, raw bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        arr = t.detach().cpu().contiguous()
        h.update(f"{name}|{arr.dtype}|{tuple(arr.shape)}".encode())
        h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_weights(module, path: Path) -> None:
    import torch

    if not path.is_file():
        raise ModelLoadError("weights file not found", value=str(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"not a valid safetensors file: {e}", value=str(path)) from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for corrupt zips
            msg = str(e).strip().splitlines()[0]
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in type(e).__name__.lower():
                raise ModelLoadError(
                    "weights file holds pickled Python objects, which serve-kit never unpickles",
                    value=str(path),
                    hint="save the state_dict only (torch.save(model.state_dict(), f)) or use safetensors") from None
            raise ModelLoadError(f"cannot read weights: {msg}", value=str(path),
                                 hint="expected a state_dict saved with torch.save, or a .safetensors file") from None
        if not isinstance(state, dict):
            raise ModelLoadError(f"weights file holds a {type(state).__name__}, not a state_dict", value=str(path),
                                 hint="save model.state_dict(), not the model")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"weights do not fit the module: {str(e).splitlines()[0]}", value=str(path),
                             hint="were they saved from the same architecture?") from None


def _onnx_specs(values) -> list[TensorSpec]:
    """Specs of graph inputs/outputs. The batch axis is the first dimension when it is variable;
    else the dimension named like another tensor's batch dimension (state [2, batch, 128]); else
    the only variable dimension; else none (the user declares it with --input ...@AXIS)."""
    from onnx import helper

    rows = []
    for v in values:
        t = v.type.tensor_type
        np_dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]
        names = [d.dim_param if d.HasField("dim_param") else "" for d in t.shape.dim]
        rows.append((v.name, datatype_of(np_dtype), dims, names))
    batch_names = {names[0] for _, _, dims, names in rows if dims and dims[0] == -1 and names[0]}
    specs = []
    for name, dt, dims, names in rows:
        variable = [i for i, d in enumerate(dims) if d == -1]
        if dims and dims[0] == -1:
            axis = 0
        elif any(names[i] in batch_names for i in variable):
            axis = next(i for i in variable if names[i] in batch_names)
        elif len(variable) == 1:
            axis = variable[0]
        else:
            axis = None
        specs.append(TensorSpec(name=name, datatype=dt, shape=dims, batch_axis=axis))
    return specs


def load_source(spec: SourceSpec, origin: str = "--model") -> Source:
    if spec.factory:
        return _load_factory(spec, origin)
    path = Path(spec.path)
    if not path.exists():
        raise ModelLoadError("model file not found", value=str(path), origin=origin)
    if path.is_dir():
        raise ModelLoadError("model path is a folder, expected a file", value=str(path), origin=origin,
                             hint="give a .onnx, .pt/.ts (TorchScript) or .pt2 (torch.export) file, "
                                  "or a factory package.module:function")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _load_onnx(path, origin)
    if suffix == ".pt2":
        return _load_exported(path, origin)
    if suffix in (".pt", ".ts", ".pth", ".jit", ".torchscript"):
        return _load_torchscript(path, origin)
    raise ModelLoadError("unknown model file type", value=str(path), origin=origin,
                         hint=".onnx, .pt/.ts (TorchScript), .pt2 (torch.export) or a factory module:function")


def _load_onnx(path: Path, origin: str) -> Source:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelLoadError(f"not a valid ONNX model: {str(e).strip().splitlines()[0][:300]}", value=str(path),
                             origin=origin, hint="is the file complete? re-export it") from None
    init_names = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    return Source("onnx", str(path), sha256_file(path), path, _onnx_specs(graph_inputs),
                  _onnx_specs(model.graph.output), {"opset": max(o.version for o in model.opset_import)})


def _load_torchscript(path: Path, origin: str) -> Source:
    import torch

    if not zipfile.is_zipfile(path):
        raise ModelLoadError("not a TorchScript archive (not a zip file)", value=str(path), origin=origin,
                             hint="save with torch.jit.save(torch.jit.script(model), path)")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not any(n.endswith("/code/__torch__.py") or "/code/" in n for n in names):
        raise ModelLoadError("file is a torch.save pickle, not a TorchScript module; serve-kit never "
                             "unpickles models", value=str(path), origin=origin,
                             hint="save a TorchScript module (torch.jit.save), a .pt2 (torch.export.save), "
                                  "or give a factory module:function with --weights")
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise ModelLoadError(f"cannot load TorchScript: {str(e).strip().splitlines()[0][:300]}",
                             value=str(path), origin=origin) from None
    return Source("torchscript", str(path), sha256_file(path), module)


def _load_exported(path: Path, origin: str) -> Source:
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load torch.export program: {str(e).strip().splitlines()[0][:300]}",
                             value=str(path), origin=origin, hint="save with torch.export.save(ep, 'model.pt2')") from None
    module = ep.module()
    src = Source("torch", str(path), sha256_file(path), module, info={"format": "torch.export"})
    src.info["exported_program"] = True
    src._exported = ep  # type: ignore[attr-defined]
    return src


def _load_factory(spec: SourceSpec, origin: str) -> Source:
    import torch

    fn = import_object(spec.factory, origin)
    if not callable(fn):
        raise InputError("factory is not callable", value=spec.factory, origin=origin)
    module = fn()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"factory returned a {type(module).__name__}, not a torch.nn.Module",
                         value=spec.factory, origin=origin)
    if spec.weights:
        _load_weights(module, Path(spec.weights))
    module.eval()
    info = {"weights": spec.weights} if spec.weights else {}
    return Source("torch", spec.factory, _hash_state(module), module, info=info)
