"""Small real models for the tests, trained on scikit-learn's bundled digits (no downloads).

Importable as `sk_models:<factory>` (tests/ is on sys.path under pytest and in the CLI tests'
PYTHONPATH), which is how a user points `serve-kit optimize` at their own factory.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn


DIGITS_NPZ_ENV = "SERVE_KIT_TEST_DIGITS_NPZ"
"""A copy of scikit-learn's digits (arrays `data`, `target`) for machines without scikit-learn:
scripts/gpu-prepare.sh writes one for the GPU machine, where nothing can be installed from PyPI."""


@functools.lru_cache(maxsize=1)
def digits_flat() -> tuple[np.ndarray, np.ndarray]:
    import os

    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        data, target = d.data, d.target
    except ImportError:
        if not os.environ.get(DIGITS_NPZ_ENV):
            raise
        with np.load(os.environ[DIGITS_NPZ_ENV]) as f:
            data, target = f["data"], f["target"]
    x = (data.astype(np.float32) / 16.0)
    idx = np.random.default_rng(0).permutation(len(x))
    return x[idx], target.astype(np.int64)[idx]


class MLP(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _train(model: nn.Module, epochs: int = 15) -> nn.Module:
    torch.manual_seed(0)
    x, y = digits_flat()
    xt, yt = torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(1000).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict:
    """Trained once per machine and cached by the hash of this file: every process (the test's,
    and the children that `bench` and `serve` start to load the source by its factory) gets the
    very same weights, whatever torch state an earlier test left in its own process; the
    manifest's source hash then matches in all of them."""
    import hashlib
    import os
    from pathlib import Path

    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("SERVE_KIT_TEST_CACHE", Path.home() / ".cache" / "serve-kit" / "tests"))
    path = cache / f"sk_models-mlp-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign file: train again
            pass
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in _train(MLP()).state_dict().items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state


def mlp() -> nn.Module:
    """The digits MLP, trained (cached per process, so repeated calls give identical weights)."""
    m = MLP()
    m.load_state_dict(_trained_state())
    return m.eval()


def untrained_mlp() -> nn.Module:
    """Same architecture, for loading weights with --weights."""
    torch.manual_seed(123)
    return MLP().eval()


class OutlierMLP(nn.Module):
    """The digits MLP with a middle layer whose activation has one channel ~1000x larger than the
    others.

    Per-tensor uint8 quantization of that activation rounds the useful channels to nothing, so
    static INT8 misses a cosine gate until the layers around it are kept in float (the first layer
    can stay quantized): the case the int8 diagnosis must find.
    """

    def __init__(self):
        super().__init__()
        base = mlp()
        self.fc0 = base.fc1                      # 64 -> 64, quantizes fine
        self.mid = nn.Linear(64, 65)             # identity on 64 channels + one outlier channel
        self.fc2 = nn.Linear(65, 10)
        with torch.no_grad():
            self.mid.weight.zero_()
            self.mid.weight[:64, :64] = torch.eye(64)
            self.mid.bias.zero_()
            self.mid.bias[64] = 2000.0           # the outlier channel: constant, huge
            self.fc2.weight[:, :64] = base.fc2.weight
            self.fc2.weight[:, 64] = 0.0
            self.fc2.bias[:] = base.fc2.bias

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        return self.fc2(torch.relu(self.mid(h)))


def outlier_mlp() -> nn.Module:
    return OutlierMLP().eval()


def digits_npz(path, n: int = 600) -> str:
    """Write `x` (FP32 [n, 64]) and `labels` to an .npz; returns the path."""
    x, y = digits_flat()
    np.savez(path, x=x[1000:1000 + n], labels=y[1000:1000 + n])
    return str(path)


# The MLP as an optimize source, as the target tests build it (tests/test_targets.py, test_modelopt.py).
def mlp_specs():
    from serve_kit.config import TensorSpec

    return ([TensorSpec(name="x", datatype="FP32", shape=[-1, 64])],
            [TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])])


def mlp_datasets():
    """(calibration, evaluation): real digits, disjoint from the 1000 the MLP trained on."""
    from serve_kit.optimize.calibration import Dataset

    x, y = digits_flat()
    return Dataset({"x": x[1000:1200]}, y[1000:1200], "digits calibration"), \
        Dataset({"x": x[1200:1500]}, y[1200:1500], "digits evaluation")


def mlp_context(workdir, calibration):
    """A BuildContext for the trained MLP (its factory, as a user's would be loaded)."""
    from serve_kit.config import SourceSpec
    from serve_kit.optimize.source import load_source
    from serve_kit.optimize.target import BuildContext

    inputs, outputs = mlp_specs()
    source = load_source(SourceSpec(factory="sk_models:mlp"))
    source.inputs, source.outputs = inputs, outputs
    return BuildContext(source, inputs, outputs, calibration, workdir)
