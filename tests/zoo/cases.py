"""The zoo's cases: one real model as shipped, the flags a user would give, targets, budgets.

A case says nothing about which targets must pass: the rows' statuses come from serve-kit, and the
harness checks they obey the contracts (every target a row, no traceback, the report written, the
exit code, a written variant served and matching the original, peak RSS under the budget).
`size` scales the data: "ci" keeps calibration sets small (the whole zoo within ~6 minutes on two
cores), "bench" is the larger run of benchmarks/zoo.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import data
from .wheels import asset

INT8 = ("onnx-int8-static", "onnx-int8-dynamic")
QUANT = (*INT8, "onnx-int4")

SIZES = {
    # (calibration, evaluation) sizes per data kind
    "ci": {"vad": (2, 5.0, 2, 6.0), "rec": (24, 24), "det": (8, 8), "faces": (20, 20)},
    "bench": {"vad": (4, 20.0, 4, 20.0), "rec": (200, 200), "det": (100, 50), "faces": (100, 150)},
}


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], str]
    """The MODEL argument: a file out of a wheel, or a factory module:function."""
    data: Callable[[str], tuple[Path, Path]]
    """size -> (calibration .npz, evaluation .npz); the evaluation file is held out (other seed)."""
    targets: tuple[str, ...]
    """-t arguments: NAME or NAME:KEY=VALUE,... (the row is named NAME). On an ONNX source `onnx`
    is the FP32 variant (the graph optimized offline by ONNX Runtime)."""
    metric: str
    flags: Callable[[], tuple[str, ...]] = lambda: ()
    ci_settings: dict[str, str] = field(default_factory=dict)
    """Target settings added at size "ci" only (to keep CI short), e.g. {"onnx-int8-static":
    "max_diagnose_rounds=1"}: still one diagnosis round, so its memory is measured. (The diagnosis
    was 60 of the OCR recognizer's 88 s: 10 quantize_static calls for 8 candidates.)"""
    constants: dict[str, int] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    """OUTPUT -> INPUT fed back at the next chunk (the --state flags)."""
    rss_budget_mb: int = 1536
    """Peak RSS of the whole `serve-kit optimize` process at size "ci" (measured on the merged
    branches, 2026-12-03: VAD 190 MB, MTCNN 450-580 MB, OCR recognizer 1.4 GB, detector 1.9 GB
    with 12 pages)."""
    expect_written: bool = True
    """False where every target may honestly miss its gate (exit 3 is then a right answer)."""
    keep_going: bool = True
    """--keep-going: write the fastest passing variant although another target missed its gate
    (a CNN's INT4, say); without it one miss blocks writing (contract 5, fail-closed)."""
    reference: str = "onnx"
    """How the harness runs the original for the served check: onnx | torchscript | factory."""
    factory_net: str | None = None
    min_reference_metric: float | None = None
    """Floor for the reference's task metric in the report: serve-kit fed the original its real
    data the right way (test_zoo_data.py measures the same models directly, well above it)."""
    served_samples: int = 16
    """Held-out requests sent to the served version (steps of every stream for stateful models)."""
    timeout_s: int = 600


def _vad_data(context: bool) -> Callable[[str], tuple[Path, Path]]:
    def make(size: str) -> tuple[Path, Path]:
        cs, csec, es, esec = SIZES[size]["vad"]
        return (data.vad(streams=cs, seconds=csec, seed=1, context=context),
                data.vad(streams=es, seconds=esec, seed=2, context=context))
    return make


def _rec(size):
    c, e = SIZES[size]["rec"]
    return data.text_crops(c, seed=1), data.text_crops(e, seed=2)


def _det(size):
    c, e = SIZES[size]["det"]
    return data.text_pages(c, seed=1), data.text_pages(e, seed=2)


def _faces(px: int):
    def make(size):
        c, e = SIZES[size]["faces"]
        # Different LFW halves and scene crops: the evaluation set shares no image with calibration.
        return data.faces(px, nonface_crops=c, seed=1, part=0), data.faces(px, nonface_crops=e, seed=2, part=1)
    return make


VAD_ONNX_FLAGS = ("--input", "input:FP32:-1x576", "--input", "state:FP32:2x-1x128@1", "--input", "sr:INT64:scalar",
                  "--constant", "sr=16000", "--state", "stateN=state")


def _mtcnn_flags(net: str, px: int, outputs: tuple[str, ...]) -> Callable[[], tuple[str, ...]]:
    def flags():
        out = ("--weights", str(asset(net)), "--input", f"input:FP32:-1x3x{px}x{px}")
        for o in outputs:
            out += ("--output", o)
        return out
    return flags


CASES = [
    # silero-vad as shipped: the `If`-wrapped opset-16 graph, the op15 graph, the TorchScript file.
    Case("vad-onnx", lambda: str(asset("silero-onnx")), _vad_data(True), ("onnx", *QUANT),
         "zoo.metrics:vad_accuracy",
         lambda: VAD_ONNX_FLAGS, constants={"sr": 16000}, state={"stateN": "state"}, served_samples=64, rss_budget_mb=768,
         min_reference_metric=85),
    # The case: INT8 static passed with a 0.98 probability error. It must now miss its
    # default gate, or pass honestly (served, its probabilities stay close): nothing else written.
    Case("vad-op15-int8", lambda: str(asset("silero-op15")), _vad_data(True), ("onnx-int8-static",),
         "zoo.metrics:vad_accuracy", lambda: VAD_ONNX_FLAGS, constants={"sr": 16000}, state={"stateN": "state"},
         expect_written=False, keep_going=False, served_samples=64, min_reference_metric=85, rss_budget_mb=768),
    Case("vad-op15", lambda: str(asset("silero-op15")), _vad_data(True),
         # -t with settings (contract 9): dynamic INT8 of the convolutions too.
         ("onnx", "onnx-int8-dynamic:op_types=Conv+MatMul", "onnx-int4"),
         "zoo.metrics:vad_accuracy", lambda: VAD_ONNX_FLAGS, constants={"sr": 16000}, state={"stateN": "state"},
         served_samples=64, min_reference_metric=85, rss_budget_mb=768),
    # The TorchScript file: forward(x, sr: int), its state kept inside the module. optimize finds
    # that (two identical calls differ) and runs it chunk by chunk, as served: the floor holds
    # (batches of consecutive chunks, read as parallel streams by the module, gave 66.6%).
    Case("vad-jit", lambda: str(asset("silero-jit")), _vad_data(False), ("torchscript", "onnx", "onnx-int8-dynamic"),
         "zoo.metrics:vad_accuracy", lambda: ("--input", "x:FP32:-1x512", "--constant", "sr=16000", "--output", "output:FP32:-1x1"),
         constants={"sr": 16000}, reference="torchscript", served_samples=64, rss_budget_mb=1024,
         min_reference_metric=85),
    # PaddleOCR tiny models: opset 11, weights stored 8-bit and dequantized in the graph.
    Case("ocr-rec", lambda: str(asset("ocr-rec")), _rec, ("onnx", *QUANT), "zoo.metrics:ocr_char_accuracy",
         ci_settings={"onnx-int8-static": "max_diagnose_rounds=1,diagnose_candidates=4"}, rss_budget_mb=2048,
         served_samples=6, min_reference_metric=90),
    Case("ocr-det", lambda: str(asset("ocr-det")), _det, ("onnx", *INT8), "zoo.metrics:det_pixel_f1",
         ci_settings={"onnx-int8-static": "max_diagnose_rounds=1,diagnose_candidates=4"}, rss_budget_mb=3072,
         served_samples=4, min_reference_metric=55),
    # MTCNN from facenet-pytorch: factories over the wheel's classes, its state_dicts as --weights.
    Case("mtcnn-onet", lambda: "zoo.models:onet", _faces(48), ("torchscript", "onnx", *QUANT),
         "zoo.metrics:face_accuracy",
         _mtcnn_flags("onet", 48, ("box:FP32:-1x4", "landmarks:FP32:-1x10", "prob:FP32:-1x2")),
         reference="factory", factory_net="onet", min_reference_metric=95),
    Case("mtcnn-rnet", lambda: "zoo.models:rnet", _faces(24), ("onnx", *INT8), "zoo.metrics:face_accuracy",
         _mtcnn_flags("rnet", 24, ("box:FP32:-1x4", "prob:FP32:-1x2")), reference="factory", factory_net="rnet",
         min_reference_metric=95),
    Case("mtcnn-pnet", lambda: "zoo.models:pnet", _faces(12), ("onnx", "onnx-int8-static"), "zoo.metrics:face_accuracy",
         _mtcnn_flags("pnet", 12, ("box:FP32:-1x4x1x1", "prob:FP32:-1x2x1x1")), reference="factory",
         factory_net="pnet", min_reference_metric=95),
]
BY_NAME = {c.name: c for c in CASES}
