"""Versions of the real digits CNN for rollout tests: an identical copy, and a deliberately worse
one (the recipe's architecture trained on shuffled labels), written through the repository's
Staging API so the server's manifest verification accepts them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from serve_kit.repository import Repository


def copy_version(root: Path, model: str = "digits", version: int = 1) -> int:
    repo = Repository(root)
    src = root / model / str(version)
    with repo.new_version(model) as stage:
        for f in src.iterdir():
            if f.name != "manifest.json" and f.is_file():
                shutil.copy2(f, stage.dir / f.name)
        return stage.commit(repo.config(model), {"model_file": "model.onnx", "backend": "onnxruntime",
                                                 "variant": f"copy of version {version}"})


def shuffled_labels_version(root: Path, model: str = "digits", epochs: int = 10) -> int:
    import torch

    from serve_kit.recipes import digits

    torch.manual_seed(1)
    x, y = digits._data()
    y = np.random.default_rng(1).permutation(y)  # labels no longer match the images
    xt, yt = torch.from_numpy(x[: digits.N_TRAIN]), torch.from_numpy(y[: digits.N_TRAIN])
    net = digits.architecture()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(digits.N_TRAIN).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    repo = Repository(root)
    cfg = repo.config(model)
    with repo.new_version(model) as stage:
        torch.onnx.export(net, (xt[:1],), str(stage.dir / "model.onnx"), dynamo=False,
                          input_names=[cfg.inputs[0].name], output_names=[cfg.outputs[0].name],
                          dynamic_axes={cfg.inputs[0].name: {0: "batch"}, cfg.outputs[0].name: {0: "batch"}})
        return stage.commit(cfg, {"model_file": "model.onnx", "backend": "onnxruntime",
                                  "variant": "shuffled labels (a deliberately worse model)"})
