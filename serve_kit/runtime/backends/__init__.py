"""Runtime backends: one small class per model format, registered by name.

The base class checks inputs (names, dtypes) and state; subclasses implement `_load_impl` and
`_infer_impl`. Validation in `optimize`, latency in `bench` and the server all run models through
these same classes, so what was validated is what is served.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from ...errors import InputError, ModelLoadError, UsageError

_REGISTRY: dict[str, str] = {
    # name -> module that defines and registers it; imported on first use (heavy dependencies).
    "onnxruntime": "serve_kit.runtime.backends.onnxruntime",
    "torchscript": "serve_kit.runtime.backends.torchscript",
    "tensorrt": "serve_kit.runtime.backends.tensorrt",
}
_CLASSES: dict[str, type["Backend"]] = {}


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    """Class decorator: make a Backend subclass loadable by its `name` (a plugin outside this
    package included, e.g. one named in a version's manifest)."""
    _CLASSES[cls.name] = cls
    _REGISTRY.setdefault(cls.name, cls.__module__)
    return cls


def backend_class(name: str) -> type["Backend"]:
    if name not in _REGISTRY:
        raise UsageError("unknown backend", value=name, hint="backends: " + ", ".join(sorted(_REGISTRY)))
    if name not in _CLASSES:
        importlib.import_module(_REGISTRY[name])
    return _CLASSES[name]


def option_flag(value) -> bool:
    """A boolean backend option: config.yaml parameters arrive as strings ("true") unless the
    server already turned them into bools."""
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


def load_backend(name: str, model_path: Path, output_names: list[str] | None = None,
                 options: dict | None = None) -> "Backend":
    backend = backend_class(name)(Path(model_path), output_names=output_names, options=options or {})
    backend.load()
    return backend


class Backend:
    """A loaded model that maps named numpy inputs to named numpy outputs."""

    name: ClassVar[str]
    file_name: ClassVar[str]
    """File name of this backend's model inside a version directory."""

    def __init__(self, model_path: Path, output_names: list[str] | None = None, options: dict | None = None):
        self.model_path = Path(model_path)
        self.options = dict(options or {})
        self.input_names: list[str] = []
        self.output_names: list[str] = list(output_names or [])
        self._loaded = False

    def load(self) -> None:
        if not self.model_path.is_file():
            raise ModelLoadError("model file not found", value=str(self.model_path))
        self._load_impl()
        self._loaded = True

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._loaded:
            raise RuntimeError(f"{self.name} backend used before load()")
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise InputError(f"inputs do not match the model: missing {missing}, unexpected {extra}",
                             origin=str(self.model_path), hint=f"the model's inputs are {self.input_names}")
        return self._infer_impl(inputs)

    def _load_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
