"""serve_kit.optimize.calibration: loading real data, checking it against the signature, splitting."""

from __future__ import annotations


import numpy as np
import pytest

from serve_kit.config import TensorSpec
from serve_kit.errors import DataError
from serve_kit.optimize.calibration import (SYNTHETIC_VARIABLE_DIM, Dataset, load_arrays, split,
                                            synthetic, to_dataset)

IMAGE = [TensorSpec.parse("input:FP32:-1x1x8x8")]
TWO = [TensorSpec.parse("ids:INT64:-1x-1"), TensorSpec.parse("mask:INT64:-1x-1")]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def reader(ds: Dataset, specs, batch_size: int, names=None):
    """The quantizers' calibration reader over a Dataset's arrays (labels are not among specs)."""
    from serve_kit.optimize.quantize.feeds import FeedReader

    return FeedReader(ds.inputs, specs, batch_size, names=names)


def ds_of(n: int, labels: bool = True) -> Dataset:
    x = np.arange(n * 64, dtype=np.float32).reshape(n, 1, 8, 8)
    return to_dataset({"input": x, **({"labels": np.arange(n)} if labels else {})}, IMAGE, "labels", "test")


# ---------------------------------------------------------------------------------------------
# load_arrays


def test_npz_with_named_arrays(tmp_path):
    x, y = images(5), np.arange(5)
    np.savez(tmp_path / "d.npz", input=x, labels=y)
    arrays, origin = load_arrays(tmp_path / "d.npz", IMAGE, "labels")
    assert origin == str(tmp_path / "d.npz")
    assert set(arrays) == {"input", "labels"}
    np.testing.assert_array_equal(arrays["input"], x)
    np.testing.assert_array_equal(arrays["labels"], y)


def test_single_npy(tmp_path):
    x = images(4)
    np.save(tmp_path / "whatever.npy", x)
    arrays, _ = load_arrays(tmp_path / "whatever.npy", IMAGE, "labels")
    assert list(arrays) == ["input"]  # a single-input model takes any file name
    np.testing.assert_array_equal(arrays["input"], x)


def test_folder_of_npz_concatenated_in_sorted_order(tmp_path):
    a, b, c = images(2, 1), images(3, 2), images(1, 3)
    # Written out of order; read back sorted by file name.
    np.savez(tmp_path / "part-c.npz", input=c, labels=np.array([5]))
    np.savez(tmp_path / "part-a.npz", input=a, labels=np.array([0, 1]))
    np.savez(tmp_path / "part-b.npz", input=b, labels=np.array([2, 3, 4]))
    (tmp_path / "README.txt").write_text("ignored")
    arrays, origin = load_arrays(tmp_path, IMAGE, "labels")
    assert origin == str(tmp_path)
    np.testing.assert_array_equal(arrays["input"], np.concatenate([a, b, c]))
    np.testing.assert_array_equal(arrays["labels"], np.arange(6))


def test_folder_of_per_sample_npy_gets_a_batch_dim(tmp_path):
    samples = images(3)
    for i in (2, 0, 1):
        np.save(tmp_path / f"sample-{i:03d}.npy", samples[i])  # (1, 8, 8): one sample, no batch dim
    arrays, _ = load_arrays(tmp_path, IMAGE, "labels")
    assert arrays["input"].shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(arrays["input"], samples)
    ds = to_dataset(arrays, IMAGE, "labels", "folder")
    assert len(ds) == 3


def test_folder_mixing_batched_and_per_sample_npy(tmp_path):
    x = images(3)
    np.save(tmp_path / "a.npy", x[:2])   # a batch of two
    np.save(tmp_path / "b.npy", x[2])    # one sample
    arrays, _ = load_arrays(tmp_path, IMAGE, "labels")
    np.testing.assert_array_equal(arrays["input"], x)


def test_npy_files_named_after_inputs(tmp_path):
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    mask = np.ones((3, 4), dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    np.save(tmp_path / "labels.npy", np.array([0, 1, 0]))
    arrays, _ = load_arrays(tmp_path, TWO, "labels")
    assert set(arrays) == {"ids", "mask", "labels"}
    ds = to_dataset(arrays, TWO, "labels", "folder")
    np.testing.assert_array_equal(ds.inputs["ids"], ids)
    np.testing.assert_array_equal(ds.inputs["mask"], mask)
    np.testing.assert_array_equal(ds.labels, [0, 1, 0])


def test_npy_not_named_after_an_input_of_a_multi_input_model(tmp_path):
    np.save(tmp_path / "tokens.npy", np.zeros((2, 4), np.int64))
    with pytest.raises(DataError) as ei:
        load_arrays(tmp_path, TWO, "labels")
    e = ei.value
    assert "'tokens'" in e.message and "several inputs" in e.message
    assert str(tmp_path / "tokens.npy") in e.render()
    assert "ids" in e.hint and "mask" in e.hint


def test_arrays_that_do_not_stack(tmp_path):
    np.savez(tmp_path / "a.npz", input=images(2))
    np.savez(tmp_path / "b.npz", input=np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match="'input'.*do not stack"):
        load_arrays(tmp_path, IMAGE, "labels")


@pytest.mark.parametrize("suffix, save", [
    (".npz", lambda p, a: np.savez(p, input=a)),
    (".npy", np.save),
])
def test_object_arrays_are_refused(tmp_path, suffix, save):
    path = tmp_path / f"data{suffix}"
    save(path, np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError) as ei:
        load_arrays(path, IMAGE, "labels")
    rendered = ei.value.render()
    assert "pickl" in rendered
    assert str(path) in rendered


def test_truncated_npz(tmp_path):
    good = tmp_path / "good.npz"
    np.savez_compressed(good, input=images(50))
    data = good.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as ei:
        load_arrays(bad, IMAGE, "labels")
    assert str(bad) in ei.value.render() and "npz" in ei.value.render()


def test_corrupt_npz_member(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, input=images(50))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the member: the zip's CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as ei:
        load_arrays(path, IMAGE, "labels")
    assert str(path) in ei.value.render()


@pytest.mark.parametrize("content", [
    b"",
    b"this is not an archive at all",
    None,  # a .npy saved under a .npz name: np.load returned an array and the code crashed
])
def test_npz_that_is_not_an_archive(tmp_path, content):
    path = tmp_path / "d.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, images(2))
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as ei:
        load_arrays(path, IMAGE, "labels")
    assert "not a .npz archive" in ei.value.message
    assert str(path) in ei.value.render()


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY garbage"])
def test_corrupt_npy(tmp_path, content):
    path = tmp_path / "d.npy"
    path.write_bytes(content)
    with pytest.raises(DataError) as ei:
        load_arrays(path, IMAGE, "labels")
    assert "cannot read .npy" in ei.value.message and str(path) in ei.value.render()


def test_truncated_npy(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, images(20))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot read .npy"):
        load_arrays(path, IMAGE, "labels")


def test_path_problems(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_arrays(tmp_path / "missing.npz", IMAGE, "labels")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npy or .npz"):
        load_arrays(tmp_path / "empty", IMAGE, "labels")
    (tmp_path / "d.csv").write_text("1,2,3")
    with pytest.raises(DataError, match=".npy, .npz"):
        load_arrays(tmp_path / "d.csv", IMAGE, "labels")


# ---------------------------------------------------------------------------------------------
# to_dataset


def test_to_dataset_valid():
    x, y = images(6), np.arange(6)
    ds = to_dataset({"input": x, "labels": y}, IMAGE, "labels", "here")
    assert len(ds) == 6 and ds.origin == "here" and not ds.synthetic
    np.testing.assert_array_equal(ds.inputs["input"], x)
    np.testing.assert_array_equal(ds.labels, y)
    assert ds.describe()["arrays"] == {"input": {"dtype": "float32", "shape": [6, 1, 8, 8]}}


def test_to_dataset_accepts_lists_and_non_contiguous_arrays():
    x = images(4).transpose(0, 1, 3, 2)  # a view, not C-contiguous
    ds = to_dataset({"input": x}, IMAGE, "labels", "o")
    assert ds.inputs["input"].flags.c_contiguous
    ids = to_dataset({"ids": [[1, 2], [3, 4]], "mask": [[1, 1], [1, 0]]}, TWO, "labels", "o")
    assert ids.inputs["ids"].dtype == np.int64 and len(ids) == 2


def test_single_input_accepts_any_array_name():
    x = images(3)
    ds = to_dataset({"arr_0": x, "labels": np.arange(3)}, IMAGE, "labels", "o")
    assert list(ds.inputs) == ["input"]
    np.testing.assert_array_equal(ds.inputs["input"], x)


def test_variable_dims_accept_any_size():
    ds = to_dataset({"ids": np.zeros((2, 7), np.int64), "mask": np.zeros((2, 7), np.int64)}, TWO, "labels", "o")
    assert ds.inputs["ids"].shape == (2, 7)


def test_wrong_dtype_names_array_dtype_datatype_and_fix():
    with pytest.raises(DataError) as ei:
        to_dataset({"input": images(2).astype(np.float64)}, IMAGE, "labels", "calib.npz")
    e = ei.value
    assert "'input'" in e.message and "float64" in e.message and "FP32" in e.message
    assert e.origin == "calib.npz"
    assert "astype(np.float32)" in e.hint
    assert "(from calib.npz)" in e.render()


def test_wrong_rank():
    with pytest.raises(DataError) as ei:
        to_dataset({"input": np.zeros((2, 8, 8), np.float32)}, IMAGE, "labels", "o")
    e = ei.value
    assert "rank 3" in e.message and "rank 4" in e.message and "input:FP32:-1x1x8x8" in e.message
    assert "batch-first" in e.hint


def test_wrong_fixed_dim():
    with pytest.raises(DataError) as ei:
        to_dataset({"input": np.zeros((2, 1, 8, 9), np.float32)}, IMAGE, "labels", "o")
    assert "[2, 1, 8, 9]" in ei.value.message and "size 8 in dimension 3" in ei.value.message


def test_missing_input_array():
    with pytest.raises(DataError) as ei:
        to_dataset({"ids": np.zeros((2, 3), np.int64)}, TWO, "labels", "o")
    e = ei.value
    assert "['mask']" in e.message
    assert "ids" in e.render()  # what the data do hold
    assert "labels" in e.hint


def test_single_input_with_two_unnamed_arrays_is_missing_input():
    with pytest.raises(DataError, match=r"no array for model input\(s\) \['input'\]"):
        to_dataset({"a": images(2), "b": images(2)}, IMAGE, "labels", "o")


def test_extra_array():
    arrays = {"ids": np.zeros((2, 3), np.int64), "mask": np.zeros((2, 3), np.int64),
              "token_type_ids": np.zeros((2, 3), np.int64)}
    with pytest.raises(DataError) as ei:
        to_dataset(arrays, TWO, "labels", "o")
    assert "['token_type_ids']" in ei.value.message and "ids" in ei.value.hint


def test_labels_under_another_key_are_an_extra_array():
    with pytest.raises(DataError, match=r"\['labels'\]"):
        to_dataset({"input": images(2), "labels": np.arange(2)}, IMAGE, "target", "o")


def test_mismatched_sample_counts():
    with pytest.raises(DataError) as ei:
        to_dataset({"ids": np.zeros((3, 4), np.int64), "mask": np.zeros((2, 4), np.int64)}, TWO, "labels", "o")
    assert "'ids': 3 along axis 0, 'mask': 2 along axis 0" in ei.value.message
    assert "@AXIS" in ei.value.hint


@pytest.mark.parametrize("labels, got", [(np.arange(5), "5 entries"), (np.arange(2), "2 entries"),
                                         (np.array(1), "a single value")])
def test_labels_of_the_wrong_length(labels, got):
    with pytest.raises(DataError) as ei:
        to_dataset({"input": images(3), "labels": labels}, IMAGE, "labels", "o")
    assert f"'labels' has {got} for 3 samples" in ei.value.message


def test_no_samples():
    with pytest.raises(DataError, match="no samples"):
        to_dataset({"input": np.zeros((0, 1, 8, 8), np.float32)}, IMAGE, "labels", "o")


# ---------------------------------------------------------------------------------------------
# split, synthetic, hashing, reader


def test_split_disjoint_and_complete():
    ds = ds_of(20)
    s = split(ds, max_calibration=100, max_evaluation=100, seed=3)
    cal, ev = s.calibration.labels.tolist(), s.evaluation.labels.tolist()
    assert len(cal) == 10 and len(ev) == 10  # half each when nothing caps them
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == list(range(20))
    # Inputs travel with their labels (label i belongs to sample i of ds_of).
    for part in (s.calibration, s.evaluation):
        np.testing.assert_array_equal(part.inputs["input"][:, 0, 0, 0], part.labels * 64)
    assert "calibration" in s.calibration.origin and "evaluation" in s.evaluation.origin


def test_split_is_deterministic_and_seeded():
    ds = ds_of(50)
    a, b = split(ds, 10, 10, seed=0), split(ds, 10, 10, seed=0)
    assert a.calibration.sha256() == b.calibration.sha256()
    assert a.evaluation.sha256() == b.evaluation.sha256()
    c = split(ds, 10, 10, seed=1)
    assert c.calibration.labels.tolist() != a.calibration.labels.tolist()


def test_split_caps_sizes():
    ds = ds_of(100)
    s = split(ds, max_calibration=7, max_evaluation=5)
    assert len(s.calibration) == 7 and len(s.evaluation) == 5
    assert not set(s.calibration.labels.tolist()) & set(s.evaluation.labels.tolist())
    s = split(ds, max_calibration=1000, max_evaluation=3)
    assert len(s.calibration) == 50 and len(s.evaluation) == 3  # calibration never takes more than half


def test_split_two_samples():
    s = split(ds_of(2), 512, 2048)
    assert len(s.calibration) == 1 and len(s.evaluation) == 1
    assert {s.calibration.labels[0], s.evaluation.labels[0]} == {0, 1}


def test_split_refuses_fewer_than_two():
    with pytest.raises(DataError) as ei:
        split(ds_of(1), 512, 2048)
    assert "at least 2 samples" in ei.value.message and ei.value.origin == "test"


def test_split_without_labels():
    s = split(ds_of(6, labels=False), 10, 10)
    assert s.calibration.labels is None and len(s.calibration) + len(s.evaluation) == 6


def test_synthetic_is_marked_and_shaped():
    specs = IMAGE + [TensorSpec.parse("ids:INT32:-1x-1"), TensorSpec.parse("flag:BOOL:-1x2")]
    ds = synthetic(specs, 5, seed=1)
    assert ds.synthetic is True
    assert "synthetic" in ds.origin.lower() and any("SYNTHETIC" in n for n in ds.notes)
    assert ds.describe()["synthetic"] is True and ds.describe()["notes"]
    assert ds.inputs["input"].shape == (5, 1, 8, 8) and ds.inputs["input"].dtype == np.float32
    assert ds.inputs["ids"].shape == (5, SYNTHETIC_VARIABLE_DIM) and ds.inputs["ids"].dtype == np.int32
    assert ds.inputs["flag"].dtype == np.bool_
    assert synthetic(specs, 5, seed=1).sha256() == ds.sha256()
    assert synthetic(specs, 5, seed=2).sha256() != ds.sha256()
    # Subsets (e.g. a split) stay marked.
    assert split(ds, 2, 2).calibration.synthetic and split(ds, 2, 2).evaluation.notes


def test_synthetic_refuses_bytes():
    with pytest.raises(DataError):
        synthetic([TensorSpec.parse("text:BYTES:-1")], 2)


def test_real_data_is_not_synthetic(tmp_path):
    np.savez(tmp_path / "d.npz", input=images(3))
    arrays, origin = load_arrays(tmp_path / "d.npz", IMAGE, "labels")
    ds = to_dataset(arrays, IMAGE, "labels", origin)
    assert ds.synthetic is False and ds.notes == [] and "notes" not in ds.describe()


def test_sha256_stable_and_sensitive():
    x, y = images(4), np.arange(4)
    h = to_dataset({"input": x, "labels": y}, IMAGE, "labels", "a").sha256()
    # Same values: same hash, whatever the origin or memory layout.
    assert to_dataset({"input": x.copy(), "labels": y.copy()}, IMAGE, "labels", "b").sha256() == h
    x2 = x.copy()
    x2[3, 0, 7, 7] = np.nextafter(x2[3, 0, 7, 7], np.float32(np.inf))  # one value, one ulp
    assert to_dataset({"input": x2, "labels": y}, IMAGE, "labels", "a").sha256() != h
    y2 = y.copy()
    y2[0] = 9
    assert to_dataset({"input": x, "labels": y2}, IMAGE, "labels", "a").sha256() != h
    assert to_dataset({"input": x}, IMAGE, "labels", "a").sha256() != h  # labels count
    assert len(h) == 64 and int(h, 16) >= 0


def test_sha256_covers_shape_and_dtype():
    a = Dataset({"x": np.zeros((2, 8), np.float32)})
    b = Dataset({"x": np.zeros((4, 4), np.float32)})  # same bytes, other shape
    c = Dataset({"x": np.zeros((2, 8), np.int32)})    # same bytes, other dtype
    assert len({a.sha256(), b.sha256(), c.sha256()}) == 3


def test_reader_adapter_batches_then_none_and_rewinds():
    ds = ds_of(10)
    r = reader(ds, IMAGE, 4)
    assert len(r) == 3
    batches = []
    while (b := r.get_next()) is not None:
        batches.append(b)
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), ds.inputs["input"])
    assert r.get_next() is None  # stays exhausted
    r.rewind()
    again = r.get_next()
    np.testing.assert_array_equal(again["input"], batches[0]["input"])
    assert "labels" not in again  # labels are never fed to the model


def test_reader_adapter_filters_input_names():
    ds = to_dataset({"ids": np.zeros((3, 2), np.int64), "mask": np.ones((3, 2), np.int64)}, TWO, "labels", "o")
    r = reader(ds, TWO, 2, names=["mask"])
    assert list(r.get_next()) == ["mask"]
    assert len(reader(ds, TWO, 16)) == 1


def test_tiled_repeats_real_samples():
    ds = ds_of(3)
    batch = ds.tiled(7)["input"]
    assert batch.shape == (7, 1, 8, 8)
    np.testing.assert_array_equal(batch[3], ds.inputs["input"][0])
    np.testing.assert_array_equal(batch[6], ds.inputs["input"][0])


def test_reader_adapter_iterates_from_the_start():
    r = reader(ds_of(5), IMAGE, 2)
    r.get_next()  # a partly consumed reader
    assert [len(b["input"]) for b in r] == [2, 2, 1]
    assert [len(b["input"]) for b in r] == [2, 2, 1]


# ---------------------------------------------------------------------------------------------
# Dataset functions (a recipe's `data.function`)


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    (tmp_path / "sk_test_data.py").write_text(
        "import numpy as np\n"
        "def good():\n"
        "    x = np.zeros((4, 1, 8, 8), np.float32)\n"
        "    return {'calibration': {'input': x, 'labels': np.arange(4)}, 'evaluation': {'input': x[:2]}}\n"
        "def bad_shape():\n"
        "    return {'calibration': {}}\n"
        "def bad_dtype():\n"
        "    x = np.zeros((4, 1, 8, 8))\n"
        "    return {'calibration': {'input': x}, 'evaluation': {'input': x}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sk_test_data"


def test_from_function(data_module):
    from serve_kit.optimize.calibration import from_function

    s = from_function(f"{data_module}:good", IMAGE, "labels")
    assert len(s.calibration) == 4 and len(s.evaluation) == 2
    assert s.calibration.labels.tolist() == [0, 1, 2, 3] and s.evaluation.labels is None
    assert s.calibration.origin == f"{data_module}:good [calibration]"


def test_from_function_errors(data_module):
    from serve_kit.errors import InputError
    from serve_kit.optimize.calibration import from_function

    with pytest.raises(DataError, match="must return"):
        from_function(f"{data_module}:bad_shape", IMAGE, "labels")
    with pytest.raises(DataError) as ei:
        from_function(f"{data_module}:bad_dtype", IMAGE, "labels")
    assert ei.value.origin == f"{data_module}:bad_dtype [calibration]"
    for ref, fragment in [(data_module, "package.module:function"),
                          ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                          (f"{data_module}:nope", "has no attribute 'nope'")]:
        with pytest.raises(InputError) as ei:
            from_function(ref, IMAGE, "labels")
        assert fragment in ei.value.message and ei.value.origin == "recipe data.function"


# ---------------------------------------------------------------------------------------------
# Inputs with their own batch axes, and inputs without one (issue 12: silero-vad's signature)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VAD = [TensorSpec.parse("input:FP32:-1x576"), TensorSpec.parse("state:FP32:2x-1x128@1"),
       TensorSpec.parse("sr:INT64:scalar")]


def vad_arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((n, 576)).astype(np.float32),
            "state": rng.standard_normal((2, n, 128)).astype(np.float32),
            "sr": np.array(16000, np.int64)}


def test_samples_are_counted_along_each_inputs_axis_and_scalars_fed_whole():
    ds = to_dataset(vad_arrays(10), VAD, "labels", "vad")
    assert len(ds) == 10
    batch = ds.slice(2, 5)
    assert batch["input"].shape == (3, 576) and batch["state"].shape == (2, 3, 128)
    assert batch["sr"].shape == () and int(batch["sr"]) == 16000
    assert ds.tiled(13)["state"].shape == (2, 13, 128)
    sub = ds.subset(np.array([9, 0]))
    np.testing.assert_array_equal(sub.inputs["state"], vad_arrays(10)["state"][:, [9, 0]])
    assert ds.describe()["arrays"]["state"]["batch_axis"] == 1
    assert ds.describe()["arrays"]["sr"]["batch_axis"] is None


def test_split_and_reader_keep_axes():
    parts = split(to_dataset(vad_arrays(20), VAD, "labels", "vad"), 8, 100)
    assert len(parts.calibration) == 8 and len(parts.evaluation) == 12
    batches = list(reader(parts.calibration, VAD, 3))
    assert [b["state"].shape[1] for b in batches] == [3, 3, 2]
    assert all(b["sr"].shape == () for b in batches)


def test_batch_axis_mismatch_names_arrays_counts_axes_and_hint():
    # state declared batch-first although its batch is on axis 1
    specs = [VAD[0], TensorSpec(name="state", datatype="FP32", shape=[-1, -1, 128])]
    with pytest.raises(DataError) as ei:
        to_dataset({k: v for k, v in vad_arrays(10).items() if k != "sr"}, specs, "labels", "vad.npz")
    e = ei.value
    assert "'input': 10 along axis 0" in e.message and "'state': 2 along axis 0" in e.message
    assert "state:FP32:2x-1x128@1" in e.hint and e.origin == "vad.npz"


def test_scalar_input_given_per_sample_is_refused_clearly():
    arrays = {**vad_arrays(4), "sr": np.full(4, 16000, np.int64)}
    with pytest.raises(DataError) as ei:
        to_dataset(arrays, VAD, "labels", "vad")
    assert "rank 1" in ei.value.message and "sr:INT64:scalar" in ei.value.message
    assert "fed to every call" in ei.value.hint


def test_zero_d_arrays_never_hit_len():
    # 0-d label or sequence arrays were a `len() of unsized object` traceback before.
    with pytest.raises(DataError, match="a single value"):
        to_dataset({**vad_arrays(3), "labels": np.array(1)}, VAD, "labels", "vad")
    with pytest.raises(DataError, match="sequence"):
        to_dataset({**vad_arrays(3), "sequence": np.array(1)}, VAD, "labels", "vad")
    only_scalars = to_dataset({"sr": np.array(8000, np.int64)}, [VAD[2]], "labels", "o")
    assert len(only_scalars) == 1 and only_scalars.slice(0, 1)["sr"].shape == ()


def test_optional_state_may_be_absent_and_sequence_is_kept():
    arrays = {"input": vad_arrays(6)["input"], "sr": np.array(16000, np.int64),
              "sequence": np.repeat(np.arange(2), 3)}
    ds = to_dataset(arrays, VAD, "labels", "vad", optional={"state"})
    assert "state" not in ds.inputs and list(ds.sequence) == [0, 0, 0, 1, 1, 1]
    assert list(ds.subset(np.array([4, 5])).sequence) == [1, 1]


def test_stream_split_keeps_order_and_whole_sequences():
    arrays = {"input": np.arange(12 * 576, dtype=np.float32).reshape(12, 576), "sr": np.array(16000, np.int64)}
    one = split(to_dataset(arrays, VAD, "labels", "s", optional={"state"}), 4, 100, streams=True)
    assert list(one.calibration.inputs["input"][:, 0] // 576) == [0, 1, 2, 3]
    assert list(one.evaluation.inputs["input"][:, 0] // 576) == list(range(4, 12))
    arrays["sequence"] = np.repeat(np.arange(4), 3)
    many = split(to_dataset(arrays, VAD, "labels", "s", optional={"state"}), 100, 100, streams=True)
    cal_ids, ev_ids = set(many.calibration.sequence), set(many.evaluation.sequence)
    assert cal_ids and ev_ids and not cal_ids & ev_ids and len(many.calibration) == 6


def test_npy_folder_stacks_along_the_axis(tmp_path):
    spec = [TensorSpec.parse("state:FP32:2x-1x4@1")]
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((2, 4), np.float32))  # one sample: axis 1 is added
    arrays, _ = load_arrays(tmp_path, spec, "labels")
    assert arrays["state"].shape == (2, 4, 4)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.data())
def test_slicing_along_any_axis_matches_moving_it_first(rank, data):
    """Whatever the axis, slice/subset/tiled pick the same samples as on a batch-first copy."""
    axis = data.draw(st.integers(0, rank - 1))
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    n = data.draw(st.integers(1, 6))
    shape[axis] = n
    arr = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1 if i == axis else d for i, d in enumerate(shape)],
                      batch_axis=axis)
    const = TensorSpec(name="c", datatype="INT64", shape=[])
    ds = to_dataset({"x": arr, "c": np.array(7, np.int64)}, [spec, const], "labels", "h")
    first = np.moveaxis(arr, axis, 0)
    assert len(ds) == n
    a, b = sorted(data.draw(st.tuples(st.integers(0, n), st.integers(0, n))))
    np.testing.assert_array_equal(np.moveaxis(ds.slice(a, b)["x"], axis, 0), first[a:b])
    idx = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8)))
    np.testing.assert_array_equal(np.moveaxis(ds.subset(idx).inputs["x"], axis, 0), first[idx])
    k = data.draw(st.integers(1, 9))
    np.testing.assert_array_equal(np.moveaxis(ds.tiled(k)["x"], axis, 0), first[np.arange(k) % n])
    assert ds.slice(a, b)["c"].shape == () and ds.subset(idx).inputs["c"].shape == ()
