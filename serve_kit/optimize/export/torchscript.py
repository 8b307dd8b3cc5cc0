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
                if ctx.source.kind == "torchscript" and isinstance(module, torch.jit.ScriptModule):
                    scripted = module
                elif ctx.source.kind == "torchscript":
                    # Constants bound around the TorchScript module (signature.bind): tracing keeps
                    # the compiled module as a call and bakes the bound arguments in.
                    with torch.inference_mode(False), torch.no_grad():
                        scripted = torch.jit.trace(module, example_args(ctx), check_trace=False, strict=False)
                elif cfg.method == "script":
                    scripted = torch.jit.script(module)
                else:
                    with torch.inference_mode(False), torch.no_grad():
                        scripted = torch.jit.trace(module, example_args(ctx), check_trace=False, strict=False)
                scripted = scripted.eval()
                if cfg.freeze:
                    scripted = torch.jit.freeze(scripted)
            except Exception as e:
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                if ctx.source.kind == "torchscript" and ctx.source.info.get("constants"):
                    from ...errors import TargetNotApplicable

                    raise TargetNotApplicable(f"cannot trace the TorchScript module with its bound arguments "
                                              f"{sorted(ctx.source.info['constants'])}: {first}",
                                              value=ctx.source.ref,
                                              hint="serve the source file itself, or give the argument per call "
                                                   "(--input NAME:DATATYPE:SHAPE and data)") from None
                raise ConversionError(f"TorchScript {cfg.method} failed: {first}", value=ctx.source.ref,
                                      hint="try `method: script` (or trace) in the target's config") from None
            path = outdir / "model.pt"
            torch.jit.save(scripted, str(path))
        return Artifact(path, "torchscript", {"method": "source" if ctx.source.kind == "torchscript" else cfg.method,
                                               "freeze": cfg.freeze,
                                               "input_names": [s.name for s in ctx.inputs]})


class CudaHalfConfig(TargetConfig):
    device: str = "cuda:0"
    """The CUDA device to trace on (the runtime loads it on `cuda` unless config.yaml says else)."""


@register_target
class TorchScriptCudaFp16(Target):
    """The PyTorch model in half precision on a CUDA GPU, traced to TorchScript.

    Floating-point inputs are cast to the half type inside the saved module and outputs back to
    float32, so the served signature is the FP32 one the reference has; integer inputs (token ids,
    masks) pass through unchanged.
    """

    name = "torchscript-cuda-fp16"
    precision = "fp16"
    backend = "torchscript"
    Config = CudaHalfConfig
    source_kinds = ("torch",)
    dtype_name = "float16"

    def unavailable_reason(self, source) -> str | None:
        from ...gpu import cuda_unavailable_reason

        reason = super().unavailable_reason(source) or cuda_unavailable_reason()
        if reason is None and self.dtype_name == "bfloat16":
            import torch

            if not torch.cuda.is_bf16_supported():
                reason = f"{torch.cuda.get_device_name()} has no bfloat16 support"
        return reason

    def _build_impl(self, ctx: BuildContext, outdir):
        import copy

        import torch

        from ...gpu import cuda_device

        dtype = getattr(torch, self.dtype_name)
        device = cuda_device(self.config.device)
        inner = copy.deepcopy(ctx.source.model).to(device=device, dtype=dtype).eval()
        module = _CastWrapper(inner, dtype)
        args = tuple(a.to(device) for a in example_args(ctx))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.no_grad():
                    scripted = torch.jit.freeze(torch.jit.trace(module, args, check_trace=False, strict=False).eval())
            except Exception as e:
                raise ConversionError(f"TorchScript trace in {self.dtype_name} on {device} failed: "
                                      f"{str(e).strip().splitlines()[0][:300]}", value=ctx.source.ref) from None
            path = outdir / "model.pt"
            torch.jit.save(scripted, str(path))
        from ...gpu import gpu_info

        return Artifact(path, "torchscript", {"method": "trace", "dtype": self.dtype_name, "gpu": gpu_info(),
                                              "input_names": [s.name for s in ctx.inputs]},
                        backend_options={"device": "cuda"})


@register_target
class TorchScriptCudaBf16(TorchScriptCudaFp16):
    __doc__ = TorchScriptCudaFp16.__doc__
    name = "torchscript-cuda-bf16"
    precision = "bf16"
    dtype_name = "bfloat16"


def _CastWrapper(inner, dtype):
    """A module running `inner` in `dtype`: floating inputs cast in, floating outputs cast to fp32."""
    import torch

    class CastWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
            out = self.inner(*cast)
            if isinstance(out, torch.Tensor):
                return out.float() if out.is_floating_point() else out
            if isinstance(out, dict):
                return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
            return tuple(v.float() if v.is_floating_point() else v for v in out)

    return CastWrapper()
