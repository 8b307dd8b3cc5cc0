"""Export targets: TorchScript and ONNX (FP32)."""

from __future__ import annotations


def example_args(ctx, batch_size: int = 2):
    """Real calibration samples as torch tensors, in signature order, for tracing/exporting."""
    import numpy as np
    import torch

    batch = ctx.calibration.tiled(batch_size)
    return tuple(torch.from_numpy(np.asarray(batch[s.name], order="C")) for s in ctx.inputs)
