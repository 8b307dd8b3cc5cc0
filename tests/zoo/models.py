"""MTCNN's PNet/RNet/ONet from the facenet-pytorch wheel, as factories for `serve-kit optimize`.

`import facenet_pytorch` is not possible here (its __init__ imports modules with dependencies
this project does not have, and its metadata pins old torch/numpy), so the three network classes
are compiled from the wheel's own mtcnn.py: only their class definitions, which need nothing but
torch. The weights are the wheel's state_dicts (data/*.pt), given to optimize with --weights as a
user would; `pretrained=False` keeps the classes from loading them through an unrestricted
torch.load themselves.

Usage: serve-kit optimize zoo.models:onet --weights .../data/onet.pt (tests/ on PYTHONPATH).
"""

from __future__ import annotations

import ast
from functools import lru_cache

CLASSES = ("PNet", "RNet", "ONet")


@lru_cache(maxsize=None)
def _classes() -> dict[str, type]:
    import numpy as np
    import torch
    from torch import nn

    from .wheels import asset

    path = asset("mtcnn-py")
    tree = ast.parse(path.read_text(), filename=str(path))
    body = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in CLASSES]
    missing = set(CLASSES) - {n.name for n in body}
    if missing:
        raise RuntimeError(f"{path} defines no {sorted(missing)}")
    namespace = {"torch": torch, "nn": nn, "np": np, "os": __import__("os"), "__name__": "facenet_mtcnn"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in CLASSES}


def pnet():
    return _classes()["PNet"](pretrained=False).eval()


def rnet():
    return _classes()["RNet"](pretrained=False).eval()


def onet():
    return _classes()["ONet"](pretrained=False).eval()


def load(name: str):
    """A net with the wheel's weights (for tests and data checks outside optimize)."""
    import torch

    from .wheels import asset

    net = {"pnet": pnet, "rnet": rnet, "onet": onet}[name]()
    net.load_state_dict(torch.load(str(asset(name)), map_location="cpu", weights_only=True))
    return net
