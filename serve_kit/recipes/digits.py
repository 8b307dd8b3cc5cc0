"""The `digits-cnn` recipe: a small CNN trained in seconds on scikit-learn's bundled 8x8 digits.

Real data, no download: sklearn ships the 1797 images. A fixed seed makes the trained weights,
and so the source hash, reproducible. Split: 1000 images train the model, 200 (never trained on)
calibrate quantizers, the other 597 are held out for validation; the metric is top-1 accuracy.
"""

from __future__ import annotations

import numpy as np

SEED = 0
N_TRAIN, N_CALIBRATION = 1000, 200


def _data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(SEED).permutation(len(x))
    return x[idx], y[idx]


def architecture():
    import torch.nn as nn

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),                                   # 64 x 4 x 4
            )
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, input):  # noqa: A002 - the tensor is called `input` in the model's signature
            return self.classifier(self.features(input))

    return DigitsCNN()


def build_model(epochs: int = 30, shuffled_labels: bool = False):
    """Train the CNN (about 3 s on 2 cores) and return it in eval mode."""
    import torch

    torch.manual_seed(SEED)
    x, y = _data()
    if shuffled_labels:
        y = y.copy()
        y[:N_TRAIN] = np.random.default_rng(SEED + 1).permutation(y[:N_TRAIN])
    xt, yt = torch.from_numpy(x[:N_TRAIN]), torch.from_numpy(y[:N_TRAIN])
    model = architecture()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(N_TRAIN, generator=gen).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def build_shuffled_label_model():
    """The same CNN trained on the same images with their labels shuffled: a deliberately worse
    candidate (about chance on held-out digits) for trying a canary rollout and its rollback."""
    return build_model(shuffled_labels=True)


def dataset() -> dict:
    x, y = _data()
    cal = slice(N_TRAIN, N_TRAIN + N_CALIBRATION)
    ev = slice(N_TRAIN + N_CALIBRATION, None)
    return {"calibration": {"input": x[cal], "labels": y[cal]},
            "evaluation": {"input": x[ev], "labels": y[ev]}}
