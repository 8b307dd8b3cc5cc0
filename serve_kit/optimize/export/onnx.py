"""`onnx` target: FP32 ONNX with a dynamic batch axis, optionally graph-optimized offline.

Exporter: torch 2.13's default `torch.onnx.export(dynamo=True)` (torch.export + onnxscript) is
the maintained path; the TorchScript-based ("legacy") exporter is deprecated. `auto` uses dynamo
and falls back to legacy when dynamo cannot capture the model, and always uses legacy for
TorchScript sources (dynamo cannot export a ScriptModule). Both matched PyTorch to ~1e-7 here.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Literal

from ...errors import ConversionError
from ..target import Artifact, BuildContext, Target, TargetConfig, register_target
from . import example_args


class OnnxConfig(TargetConfig):
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"
    """Which torch ONNX exporter to use (see the module docstring)."""
    opset: int | None = None
    """ONNX opset; None = the exporter's default (18+ for dynamo, 17 for legacy)."""
    ort_optimization: Literal["none", "basic", "extended"] = "none"
    """Offline ONNX Runtime graph optimization saved into the file. `all` is not offered: its
    layout rewrites tie the file to this machine's CPU."""


@register_target
class OnnxTarget(Target):
    name = "onnx"
    precision = "fp32"
    backend = "onnxruntime"
    Config = OnnxConfig

    def _build_impl(self, ctx: BuildContext, outdir):
        cfg: OnnxConfig = self.config
        path = outdir / "model.onnx"
        details: dict = {}
        if ctx.source.kind == "onnx":
            shutil.copyfile(ctx.source.model, path)
            details["exporter"] = "source is ONNX (copied)"
        else:
            details.update(self._export(ctx, path))
        if cfg.ort_optimization != "none":
            optimize_offline(path, cfg.ort_optimization)
            details["ort_optimization"] = cfg.ort_optimization
        return Artifact(path, "onnxruntime", details)

    def _export(self, ctx: BuildContext, path) -> dict:
        cfg: OnnxConfig = self.config
        exporter = cfg.exporter
        if ctx.source.kind == "torchscript":
            exporter = "legacy"
        errors = {}
        for which in (["dynamo", "legacy"] if exporter == "auto" else [exporter]):
            try:
                (self._dynamo if which == "dynamo" else self._legacy)(ctx, path)
                return {"exporter": which, **({"fallback_from": errors} if errors else {})}
            except Exception as e:  # exporters raise many types; report the first line
                errors[which] = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if ctx.source.kind == "torchscript" and ctx.source.info.get("constants"):
            # A TorchScript file called with bound (non-tensor) arguments: the exporter must trace
            # through the compiled module, which it cannot; the file itself is still served as is.
            from ...errors import TargetNotApplicable

            raise TargetNotApplicable("the ONNX exporter cannot trace through this TorchScript module with its bound "
                                      f"arguments {sorted(ctx.source.info['constants'])}: {errors.get('legacy', '')}",
                                      value=ctx.source.ref,
                                      hint="export the model to ONNX from its Python code, or serve the "
                                           "`torchscript` variant")
        raise ConversionError("ONNX export failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()),
                              value=ctx.source.ref,
                              hint="check the input signature; try `exporter: legacy` or `dynamo` explicitly")

    def _names(self, ctx):
        return [s.name for s in ctx.inputs], [s.name for s in ctx.outputs]

    def _dynamo(self, ctx: BuildContext, path) -> None:
        import inspect
        import logging

        import torch

        # The dynamo exporter logs a warning per torchvision op it cannot register (torchvision is
        # not a dependency); torch's logging setup resets levels on import, so set it here.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

        inputs, outputs = self._names(ctx)
        module = ctx.source.model
        try:
            params = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            params = inputs
        dims = {}
        for i, s in enumerate(ctx.inputs):
            dims[params[i] if i < len(params) else s.name] = {
                d: torch.export.Dim.AUTO for d, size in enumerate(s.shape) if size == -1}
        kwargs = {"opset_version": cfg_opset} if (cfg_opset := self.config.opset) else {}
        # Names are set afterwards: torch 2.13 renames the graph's inputs/outputs without checking
        # for clashes, so an output called `embedding` collided with the value of the `embedding`
        # op (Gather) and ONNX Runtime refused the file ("Duplicate definition of name").
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example_args(ctx), str(path), dynamic_shapes=dims, dynamo=True,
                              external_data=False, verbose=False, report=False, **kwargs)
        import onnx

        model = onnx.load(str(path))
        if rename_io(model, inputs, outputs):
            onnx.save(model, str(path))

    def _legacy(self, ctx: BuildContext, path) -> None:
        export_legacy(ctx.source.model, ctx, path, self.config.opset or 17)


def export_legacy(module, ctx: BuildContext, path, opset: int) -> None:
    """The TorchScript-based exporter with the signature's names and dynamic axes. It is also the
    one that exports Model Optimizer's quantized modules (dynamo fails on a data-dependent guard)."""
    import torch

    # Each tensor's own batch axis (state [2, batch, 128] has it on axis 1) shares the name "batch".
    axes = {s.name: {d: "batch" if d == s.batch_axis else f"{s.name}_dim{d}" for d, n in enumerate(s.shape) if n == -1}
            for s in [*ctx.inputs, *ctx.outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example_args(ctx), str(path), input_names=[s.name for s in ctx.inputs],
                          output_names=[s.name for s in ctx.outputs], dynamic_axes=axes, dynamo=False,
                          opset_version=opset)


def optimize_offline(path, level: str) -> None:
    """Run ONNX Runtime's graph optimizer once and save the optimized graph over `path`."""
    import onnxruntime as ort

    from ...runtime.backends.onnxruntime import session_options

    so = session_options(optimization=level)
    tmp = path.with_suffix(".opt.onnx")
    so.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tmp.replace(path)


def _graphs(graph):
    """`graph` and every subgraph (If/Loop/Scan bodies) below it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(g)


def rename_io(model, inputs: list[str], outputs: list[str]) -> bool:
    """Give the graph's inputs and outputs these names (in order), first renaming any other value
    that already holds one of them, so that every name stays defined once. Returns whether
    anything changed."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    old_in = [i.name for i in graph.input if i.name not in initializers]
    old_out = [o.name for o in graph.output]
    mapping = {o: n for o, n in [*zip(old_in, inputs), *zip(old_out, outputs)] if o != n}
    if not mapping:
        return False
    taken: set[str] = set()
    for g in _graphs(graph):
        taken.update(v.name for v in [*g.input, *g.output, *g.value_info, *g.initializer])
        for node in g.node:
            taken.update(node.input)
            taken.update(node.output)
    for new in list(mapping.values()):
        if new in taken and new not in mapping:
            fresh, i = f"{new}_0", 0
            while fresh in taken or fresh in mapping.values():
                i += 1
                fresh = f"{new}_{i}"
            mapping[new] = fresh
    for g in _graphs(graph):
        for v in [*g.input, *g.output, *g.value_info, *g.initializer]:
            v.name = mapping.get(v.name, v.name)
        for node in g.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]
    return True
