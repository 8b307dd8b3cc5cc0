"""Task metrics for the zoo, in percent (higher is better), usable as `--metric zoo.metrics:NAME`.

Each takes (outputs: dict[name, ndarray] over the evaluation set, labels: ndarray), the contract of
serve_kit.optimize.validate.Metric. Outputs are found by name where the model names them, else by
shape, so a variant with the same signature scores the same way.
"""

from __future__ import annotations

import numpy as np

VAD_THRESHOLD = 0.5  # silero-vad's own default speech threshold
DET_THRESHOLD = 0.3  # PaddleOCR DB's default binarization threshold (det_db_thresh)


def _pick(outputs: dict[str, np.ndarray], name: str, want=None) -> np.ndarray:
    if name in outputs:
        return outputs[name]
    for v in outputs.values():
        if want is None or want(v):
            return v
    raise ValueError(f"no output {name!r} among {sorted(outputs)}")


def vad_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Share of 32 ms chunks whose speech decision (probability > 0.5) matches the label."""
    prob = _pick(outputs, "output").reshape(-1)
    return 100.0 * float(np.mean((prob > VAD_THRESHOLD) == (labels.reshape(-1) > 0)))


def ctc_greedy(probs: np.ndarray) -> list[list[int]]:
    """Greedy CTC decode of [N, T, classes]: best class per step, repeats merged, blanks (0) dropped."""
    best = probs.argmax(-1)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(c) for c in row[keep] if c != 0])
    return out


def edit_distance(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def ocr_char_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """1 - (character edit distance / label length) over the set, from the greedy CTC decode.
    Labels: [N, L] class ids of the model's CTC list (data.ctc_characters()), -1 padded."""
    probs = _pick(outputs, "fetch_name_0", lambda v: v.ndim == 3)
    decoded = ctc_greedy(probs)
    errors = total = 0
    for got, row in zip(decoded, labels):
        want = [int(c) for c in row if c >= 0]
        errors += edit_distance(got, want)
        total += len(want)
    return 100.0 * max(0.0, 1.0 - errors / max(total, 1))


def det_pixel_f1(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Pixel F1 of the text probability map (> 0.3) against the text-box mask."""
    prob = _pick(outputs, "fetch_name_0", lambda v: v.ndim == 4)
    pred = prob.reshape(labels.shape) > DET_THRESHOLD
    truth = labels > 0
    tp = float(np.logical_and(pred, truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 100.0 * (2 * tp / denom if denom else 1.0)


def face_accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Face / non-face accuracy from MTCNN's two-class probability output (argmax)."""
    n = len(labels)
    prob = _pick(outputs, "prob", lambda v: v.size == 2 * n)
    return 100.0 * float(np.mean(prob.reshape(n, 2).argmax(-1) == labels.reshape(-1)))
