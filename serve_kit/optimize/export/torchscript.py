"""`torchscript` target: trace (default) or script, then freeze.

`torch.jit.optimize_for_inference` is applied by the runtime backend at load time, not saved:
its MKL-DNN rewrites do not survive torch.jit.save/load ("required keyword attribute 'value'").
"""

from __future__ import annotations

import warnings
from typing import Literal

from ...errors import ConversionError
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import example_args


class TorchScriptConfig(TargetConfig):
    method: Literal["trace", "script"] = "trace"
    """`trace` records the ops run on real samples; `script` compiles Python control flow."""
    freeze: bool = True
    """Inline parameters as constants (enables constant folding)."""


@register_target
class TorchScriptTarget(Target):
    name = "torchscript"
    precision = "fp32"
    backend = "torchscript"
    Config = TorchScriptConfig
    source_kinds = ("torch", "torchscript")

    def _build_impl(self, ctx: BuildContext, outdir):
        import torch

        cfg: TorchScriptConfig = self.config
        module = ctx.source.model
        with warnings.catch_warnings():
            # torch 2.13 marks jit as deprecated; it is still the format TorchServe/Triton load.
            warnings.simplefilter("ignore")
            try:
                if ctx.source.kind == "torchscript":
                    scripted = module
                elif cfg.method == "script":
                    scripted = torch.jit.script(module)
                else:
                    with torch.inference_mode(False), torch.no_grad():
                        scripted = torch.jit.trace(module, example_args(ctx), check_trace=False, strict=False)
                scripted = scripted.eval()
                if cfg.freeze:
                    scripted = torch.jit.freeze(scripted)
            except Exception as e:
                raise ConversionError(f"TorchScript {cfg.method} failed: {str(e).strip().splitlines()[0][:300]}",
                                      value=ctx.source.ref,
                                      hint="try `method: script` (or trace) in the target's config") from None
            path = outdir / "model.pt"
            torch.jit.save(scripted, str(path))
        return Artifact(path, "torchscript", {"method": "source" if ctx.source.kind == "torchscript" else cfg.method,
                                               "freeze": cfg.freeze,
                                               "input_names": [s.name for s in ctx.inputs]})
