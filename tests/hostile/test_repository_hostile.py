"""A repository is input too: crafted repositories (paths that leave their folder, symlinks, devices,
zip bombs, object arrays, ONNX external data outside, hostile names, oversized metadata) through
the one path check, `inspect`, the server's model manager, bench, package, and optimize's writes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_kit import repository as _r
from serve_kit.errors import RepositoryError
from serve_kit.repository import CONFIG, MANIFEST, SAMPLES, Repository, read_samples
from test_repository import make_config, relu_onnx, write_version

# The new checks, looked up when used, so the end-to-end tests here also run against code
# without them (each defect's test must fail there).
checked_file = getattr(_r, "checked_file", None)
check_model_name = getattr(_r, "check_model_name", None)
Limits = getattr(_r, "Limits", None)


def is_model_name(name) -> bool:
    import re

    return isinstance(name, str) and 0 < len(name) <= 255 and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None

TESTS = Path(__file__).resolve().parents[1]


def cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_kit", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kw)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def edit_manifest(vdir: Path, fn) -> None:
    m = json.loads((vdir / MANIFEST).read_text())
    fn(m)
    (vdir / MANIFEST).write_text(json.dumps(m))


def list_file(m: dict, rel: str, data: bytes) -> None:
    m["files"][rel] = {"sha256": sha(data), "size": len(data)}


def manager_index(root: Path, names=None, limits=None):
    from serve_kit.runtime.models import ModelManager

    async def main():
        m = ModelManager(root, names, **({"limits": limits} if limits is not None else {}))
        await m.start()
        try:
            return m.index(), m.ready
        finally:
            await m.shutdown(1)

    return asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# The path check (one function for inspect, the server, bench and package)

_PARTS = st.sampled_from(["a", "b", "c", "..", ".", "", "in", "out", "dev", "fifo", "d", "x\x00y", "e f",
                          "out-dir", "loop"])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """<t>/outside.bin, <t>/v/{a, b, d/c, in -> a, out -> ../outside.bin, out-dir -> .., dev -> /dev/null,
    fifo, loop -> loop}: a version folder with everything a hostile one may hold."""
    t = tmp_path_factory.mktemp("tree")
    (t / "outside.bin").write_bytes(b"secret")
    v = t / "v"
    (v / "d").mkdir(parents=True)
    for rel in ("a", "b", "d/c", "c"):
        (v / rel).write_bytes(b"x")
    (v / "in").symlink_to("a")
    (v / "d" / "in").symlink_to("../a")
    (v / "out").symlink_to("../outside.bin")
    (v / "d" / "out").symlink_to(str(t / "outside.bin"))
    (v / "out-dir").symlink_to("..")
    (v / "dev").symlink_to("/dev/null")
    (v / "loop").symlink_to("loop")
    os.mkfifo(v / "fifo")
    return v


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_PARTS, min_size=1, max_size=5), absolute=st.booleans())
def test_checked_file_refuses_every_path_that_resolves_outside_and_accepts_every_inside(tree, parts, absolute):
    rel = ("/" if absolute else "") + "/".join(parts)
    if absolute:
        rel = str(tree) + rel  # an absolute path *into* the folder is still refused: names are relative
    inside = False
    try:
        real = os.path.realpath(os.path.join(tree, rel))
        inside = (real.startswith(str(tree) + os.sep) and os.path.isfile(real)
                  and not Path(real).is_fifo() and Path(real).is_file())
    except ValueError:  # NUL
        pass
    canonical = (not absolute and "\x00" not in rel and all(p not in ("", ".", "..") for p in parts))
    try:
        got = checked_file(tree, rel)
    except RepositoryError as e:
        assert not (canonical and inside), (rel, e.render())
        assert str(tree) not in e.message  # never a server path in the message
        return
    assert canonical and inside, rel
    assert got.is_relative_to(tree.resolve()) and got.is_file()


@pytest.mark.parametrize("rel, why", [
    ("../outside.bin", "leaves its folder"), ("out", "outside its version folder"),
    ("d/out", "outside its version folder"), ("dev", "outside its version folder"), ("fifo", "a fifo"),
    ("d", "a folder"), ("loop", "resolve"), ("a\x00b", "NUL"), ("/etc/passwd", "absolute"), ("./a", "canonical"),
])
def test_checked_file_says_why(tree, rel, why):
    with pytest.raises(RepositoryError, match=why):
        checked_file(tree, rel)


def test_checked_file_accepts_links_inside(tree):
    assert checked_file(tree, "in") == (tree / "a").resolve()
    assert checked_file(tree, "d/in") == (tree / "a").resolve()


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_model_names_are_never_paths(name):
    if is_model_name(name):
        assert "/" not in name and name not in (".", "..") and not name.startswith(".") and "\x00" not in name
        assert check_model_name(name) == name
    else:
        with pytest.raises(RepositoryError, match="not a model name"):
            check_model_name(name)


def test_model_name_rule_is_config_yamls():
    from serve_kit.config import ModelConfig
    from serve_kit.repository import MODEL_NAME_PATTERN

    assert ModelConfig.model_fields["name"].metadata[0].pattern == MODEL_NAME_PATTERN


# ---------------------------------------------------------------------------------------------
# Crafted versions: verification (inspect) and the server give the same verdict


def _escape_dotdot(root: Path, vdir: Path):
    data = b"outside, listed with its true hash"
    (root.parent / "stolen.bin").write_bytes(data)
    edit_manifest(vdir, lambda m: list_file(m, "../../../stolen.bin", data))
    return "leaves its folder"


def _absolute_model_file(root: Path, vdir: Path):
    other = root.parent / "elsewhere"
    other.mkdir(exist_ok=True)
    (other / "model.onnx").write_bytes(relu_onnx())

    def fn(m):
        m["model_file"] = str(other / "model.onnx")
        list_file(m, str(other / "model.onnx"), relu_onnx())
    edit_manifest(vdir, fn)
    return "absolute path"


def _symlink_out(root: Path, vdir: Path):
    (root.parent / "real.onnx").write_bytes(relu_onnx())  # the same bytes: the hash matches
    (vdir / "model.onnx").unlink()
    (vdir / "model.onnx").symlink_to(root.parent / "real.onnx")
    return "outside its version folder"


def _fifo(root: Path, vdir: Path):
    os.mkfifo(vdir / "pipe")
    edit_manifest(vdir, lambda m: m["files"].__setitem__("pipe", {"sha256": sha(b""), "size": 0}))
    return "a fifo"


def _nul(root: Path, vdir: Path):
    edit_manifest(vdir, lambda m: list_file(m, "model.onnx\x00.txt", b""))
    return "NUL"


def _dir_link(root: Path, vdir: Path):
    (vdir / "etc").symlink_to("/etc")
    return "symlinked folder"


def _version_link(root: Path, vdir: Path):
    outside = root.parent / "v-outside"
    import shutil

    shutil.copytree(vdir, outside)
    shutil.rmtree(vdir)
    vdir.symlink_to(outside)
    return "resolves outside its model folder"


HOSTILE = [_escape_dotdot, _absolute_model_file, _symlink_out, _fifo, _nul, _dir_link, _version_link]


@pytest.fixture
def hostile_repo(tmp_path, request):
    root = tmp_path / "repo"
    repo = Repository(root)
    write_version(repo)
    vdir = root / "relu" / "1"
    why = request.param(root, vdir)
    return root, why


@pytest.mark.parametrize("hostile_repo", HOSTILE, indirect=True, ids=[f.__name__ for f in HOSTILE])
def test_hostile_version_fails_inspect_server_and_package_alike(hostile_repo, cli_env):
    root, why = hostile_repo
    repo = Repository(root)
    problems = repo.verify_version(repo.version("relu"))
    assert any(why in p for p in problems), problems

    run = cli(["--json", "inspect", str(root)], cli_env)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    doc = json.loads(run.stdout)
    assert doc["verified"] is False and doc["models"][0]["versions"][0]["verified"] is False

    index, ready = manager_index(root)
    (entry,) = [e for e in index if e["name"] == "relu"]
    assert entry["state"] == "UNAVAILABLE" and not ready
    assert why in entry["reason"]
    assert str(root.parent) not in entry["reason"]  # the index is unauthenticated: no server paths

    from serve_kit.packaging.context import select_versions

    with pytest.raises(RepositoryError, match="failed verification"):
        select_versions(root, None)


@pytest.mark.parametrize("fields", [
    {"validation": "not an object", "calibration": [1], "variant": "[/red] [bold", "created": {"x": 1}},
    {"validation": {"errors": [1, 2], "metric": "high"}, "backend": ["onnxruntime"]},
    {"validation": {"errors": {"y": "no"}}, "model_file": "model.onnx", "variant": "x" * 10_000},
])
def test_inspect_shows_hostile_manifest_fields_without_a_traceback(tmp_path, cli_env, fields):
    root = tmp_path / "repo"
    write_version(Repository(root))
    edit_manifest(root / "relu" / "1", lambda m: m.update(fields))
    for args in (["inspect", str(root)], ["--json", "inspect", str(root)]):
        run = cli(args, cli_env)
        assert run.returncode in (0, 1) and "Traceback" not in run.stderr, run.stderr


def test_model_folder_linked_from_outside_is_refused(tmp_path):
    outside = Repository(tmp_path / "outside")
    write_version(outside)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "relu").symlink_to(tmp_path / "outside" / "relu")
    with pytest.raises(RepositoryError, match="outside the repository"):
        Repository(tmp_path / "repo").config("relu")
    index, _ = manager_index(tmp_path / "repo")
    assert index[0]["state"] == "UNAVAILABLE" and "outside the repository" in index[0]["reason"]


def _onnx_with_external(vdir: Path, location: str) -> bytes:
    """model.onnx in vdir: output = input + W, W stored as external data at `location`."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    w = np.arange(4, dtype=np.float32)
    tensor = numpy_helper.from_array(w, "W")
    set_external_data(tensor, location=location, offset=0, length=w.nbytes)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    (vdir / location).parent.mkdir(parents=True, exist_ok=True)
    (vdir / location).write_bytes(w.tobytes())
    graph = helper.make_graph([helper.make_node("Add", ["input", "W"], ["output"])], "add",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
                              initializer=[tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("location, verdict", [("weights.bin", True), ("sub/weights.bin", True),
                                               ("../weights.bin", False), ("../../../weights.bin", False)])
def test_onnx_external_data_inspect_says_what_the_server_does(tmp_path, cli_env, location, verdict):
    root = tmp_path / "repo"
    repo = Repository(root)
    staged = tmp_path / "staged"
    (staged / "x").mkdir(parents=True)
    payload = _onnx_with_external(staged / "x", location)
    extra = {location: (staged / "x" / location).read_bytes()} if verdict else {}
    write_version(repo, payload=payload, extra=extra)
    if not verdict:  # the data lies outside the version folder, where the model points
        (root / "relu" / "1" / location).parent.mkdir(parents=True, exist_ok=True)
        (root / "relu" / "1" / location).write_bytes(np.arange(4, dtype=np.float32).tobytes())

    run = cli(["--json", "inspect", str(root)], cli_env)
    inspected = json.loads(run.stdout)["models"][0]["versions"][0]
    index, ready = manager_index(root)
    assert inspected["verified"] is verdict, inspected["problems"]
    assert ready is verdict and (index[0]["state"] == "READY") is verdict, index
    if not verdict:
        assert any("external data" in p and "leaves its folder" in p for p in inspected["problems"])
        assert "external data" in index[0]["reason"] and str(tmp_path) not in index[0]["reason"]


# ---------------------------------------------------------------------------------------------
# samples.npz: zip bombs, object arrays, only the rows needed


def _bomb(path: Path, rows: int, width: int = 1024) -> None:
    """samples.npz whose input.input is [rows, width] float32 zeros, deflated (~1000:1), streamed
    so the test never holds it whole."""
    from numpy.lib import format as npf

    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, width)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("input.input.npy", "w", force_zip64=True) as f:
            npf.write_array_header_1_0(f, header)
            chunk = bytes(4 * width * 256)
            for _ in range(rows // 256):
                f.write(chunk)


@pytest.fixture
def bomb_repo(tmp_path):
    root = tmp_path / "repo"
    repo = Repository(root)
    staged = tmp_path / "bomb.npz"
    _bomb(staged, rows=64 * 256)  # 64 MiB uncompressed, ~64 KiB on disk
    assert staged.stat().st_size < 1 << 20
    with repo.new_version("wide") as stage:
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "relu",
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1024])],
                                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1024])])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        (stage.dir / "model.onnx").write_bytes(m.SerializeToString())
        (stage.dir / SAMPLES).write_bytes(staged.read_bytes())
        from serve_kit.config import ModelConfig

        cfg = ModelConfig(name="wide", backend="onnxruntime", max_batch_size=8,
                          inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 1024]}],
                          outputs=[{"name": "output", "datatype": "FP32", "shape": [-1, 1024]}],
                          warmup={"batch_sizes": [1, 8]})
        stage.commit(cfg, {"model_file": "model.onnx", "backend": "onnxruntime"})
    return root


def _peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_warmup_inflates_only_the_rows_it_runs(bomb_repo, tmp_path):
    write_version(Repository(tmp_path / "plain"))
    manager_index(tmp_path / "plain")  # imports (onnx, onnxruntime) out of the measurement
    _, baseline = _peak(lambda: manager_index(tmp_path / "plain"))  # the manager's own buffers
    (index, ready), peak = _peak(lambda: manager_index(bomb_repo))
    assert ready and index[0]["state"] == "READY", index
    # 64 MiB uncompressed; the warm-up reads 8 rows of 4 KiB.
    assert peak - baseline < 8 * 1024 * 1024, \
        f"{(peak - baseline) / 2**20:.1f} MiB more than a plain load, for a 64 MiB samples.npz"


def test_samples_read_whole_are_bounded(bomb_repo):
    path = bomb_repo / "wide" / "1" / SAMPLES
    with pytest.raises(RepositoryError, match="limit of 1048576 uncompressed bytes"):
        read_samples(path, max_bytes=1 << 20)
    assert read_samples(path, rows=3)[0]["input"].shape == (3, 1024)
    # A bound lower than what warm-up needs fails the load with the reason, not the process.
    index, ready = manager_index(bomb_repo, limits=Limits(max_samples_bytes=1000))
    assert not ready and "limit of 1000 uncompressed bytes" in index[0]["reason"], index


class _Boom:
    """Unpickling this writes a marker file: proves an object array was (never) unpickled."""

    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(_Boom.marker), "unpickled"))


@pytest.fixture
def object_repo(tmp_path):
    root = tmp_path / "repo"
    marker = tmp_path / "UNPICKLED"
    _Boom.marker = str(marker)
    arr = np.empty((2, 4), dtype=object)
    arr[:] = _Boom()
    buf = tmp_path / "obj.npz"
    np.savez(buf, **{"input.input": arr})
    write_version(Repository(root), extra={SAMPLES: buf.read_bytes()})
    return root, marker


def test_object_arrays_are_never_loaded_by_server_or_bench(object_repo, cli_env):
    root, marker = object_repo
    index, ready = manager_index(root)
    assert not ready and "Python objects" in index[0]["reason"], index
    run = cli(["bench", str(root), "--batch-sizes", "1", "--warmup", "0.01", "--window", "0.05", "--min-windows", "1",
               "--max-windows", "1", "--no-flops", "--no-eager"], cli_env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "Python objects" in run.stderr, run.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Metadata bounds and hostile JSON / YAML


def test_manifest_nested_too_deeply_is_a_problem_not_a_crash(tmp_path):
    repo = Repository(tmp_path)
    write_version(repo)
    (tmp_path / "relu" / "1" / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    problems = repo.verify_version(repo.version("relu"))
    assert any("nested too deeply" in p or "not valid JSON" in p for p in problems), problems


def test_oversized_metadata_is_refused(tmp_path):
    repo = Repository(tmp_path, Limits(max_metadata_bytes=4096))  # noqa - Limits: new
    write_version(repo)
    with open(tmp_path / "relu" / CONFIG, "a") as f:
        f.write("# " + "x" * 5000 + "\n")
    with pytest.raises(RepositoryError, match="larger than the limit of 4096 bytes"):
        repo.config("relu")
    edit_manifest(tmp_path / "relu" / "1", lambda m: m.__setitem__("pad", "x" * 5000))
    assert any("larger than the limit" in p for p in repo.verify_version(repo.version("relu")))


def test_yaml_aliases_are_refused(tmp_path):
    repo = Repository(tmp_path)
    write_version(repo)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    (tmp_path / "relu" / CONFIG).write_text(bomb)
    with pytest.raises(RepositoryError, match="aliases"):
        repo.config("relu")


def test_a_version_folder_of_5000_digits_is_not_a_version(tmp_path):
    repo = Repository(tmp_path)
    write_version(repo)
    (tmp_path / "relu" / ("9" * 5000)[:250]).mkdir()
    assert repo.version_numbers("relu") == [1]


# ---------------------------------------------------------------------------------------------
# load / unload names (HTTP and gRPC call the same ModelManager.load)


@settings(max_examples=60, deadline=None)
@given(name=st.one_of(st.sampled_from(["..", ".", "../outside", "/etc", "a/b", "", "relu/../..", "relu\x00",
                                       "-rf", ".staging-x", "x" * 300]),
                      st.text(max_size=20).filter(lambda s: not is_model_name(s))))
def test_load_of_a_non_name_is_refused_and_never_indexed(name):
    root = _NAMES_ROOT
    from serve_kit.runtime.models import ModelLoadFailed, ModelManager

    async def main():
        m = ModelManager(root)
        await m.start()
        before = m.index()
        with pytest.raises(ModelLoadFailed, match="not a model name"):
            await m.load(name)
        after = m.index()
        await m.shutdown(1)
        return before, after

    before, after = asyncio.run(main())
    assert before == after


_NAMES_ROOT: Path


@pytest.fixture(scope="module", autouse=True)
def _names_root(tmp_path_factory):
    """A repository beside an `outside/config.yaml` that a `..` load would parse."""
    global _NAMES_ROOT
    base = tmp_path_factory.mktemp("names")
    write_version(Repository(base / "repo"))
    (base / "outside").mkdir()
    (base / "outside" / CONFIG).write_text("name: outside\nbackend: nope\n")
    _NAMES_ROOT = base / "repo"


def test_failed_loads_show_no_server_paths_and_unknown_names_stay_out(tmp_path):
    from serve_kit.runtime.models import ModelLoadFailed, ModelManager

    root = tmp_path / "repo"
    write_version(Repository(root))
    (root / "broken").mkdir()
    (root / "broken" / CONFIG).write_text("name: broken\nbackend: nope\n")

    async def main():
        m = ModelManager(root)
        await m.start()
        with pytest.raises(ModelLoadFailed):
            await m.load("broken")
        with pytest.raises(ModelLoadFailed, match="has no config.yaml"):
            await m.load("absent")
        index = m.index()
        await m.shutdown(1)
        return index

    index = asyncio.run(main())
    assert {e["name"] for e in index} == {"relu", "broken"}
    text = json.dumps(index)
    assert str(tmp_path) not in text and "broken/config.yaml" in text


def test_grpc_load_of_a_path_is_invalid_argument(tmp_path):
    """End to end through the gRPC frontend, with the management token: a `..` load is refused
    before anything is read, and the index stays as it was."""
    grpc = pytest.importorskip("grpc")
    from serve_kit.runtime.proto import grpc_service_pb2 as pb
    from serve_kit.runtime.proto import grpc_service_pb2_grpc as pbg
    from runtime.rt_server import InProcessServer  # noqa: E402

    root = tmp_path / "repo"
    write_version(Repository(root))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / CONFIG).write_text("name: outside\nbackend: nope\n")
    srv = InProcessServer(root, management_token="t0ken")
    srv.options.grpc_port = 0
    srv.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.info['grpc_port']}")
        stub = pbg.GRPCInferenceServiceStub(channel)
        auth = (("authorization", "Bearer t0ken"),)
        for name in ("../outside", str(tmp_path / "outside")):
            with pytest.raises(grpc.RpcError) as ei:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), metadata=auth, timeout=30)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
            # The answer may echo the name the client sent, never the server's own paths.
            assert str(root) not in ei.value.details()
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
        assert [m.name for m in index.models] == ["relu"]
        channel.close()
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# Staging folders of killed writers


_WRITER = """
import sys, time
from serve_kit.repository import Repository
cm = Repository(sys.argv[1]).new_version("relu")  # kept: a dropped one would clean up at once
stage = cm.__enter__()
(stage.dir / "model.onnx").write_bytes(b"half")
print(stage.dir, flush=True)
time.sleep(600)
"""


def _start_writer(root: Path) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    return p, Path(p.stdout.readline().strip())


def test_stale_staging_of_a_killed_writer_is_removed_but_a_live_ones_is_kept(tmp_path):
    root = tmp_path / "repo"
    write_version(Repository(root))
    killed, stale = _start_writer(root)
    live, alive = _start_writer(root)
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(30)
        assert stale.is_dir() and alive.is_dir()
        assert write_version(Repository(root)) == 2
        assert not stale.exists(), "a killed writer's staging folder is removed by the next write"
        assert alive.is_dir() and (alive / "model.onnx").read_bytes() == b"half", "a live writer's is kept"
    finally:
        live.kill()
        live.wait(30)
        killed.stdout.close()
        live.stdout.close()


# ---------------------------------------------------------------------------------------------
# Disk full


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, filled: folders can still be made, no file data can be written."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        with open(mnt / ".filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_in_a_repository_write_is_one_error_and_leaves_nothing(full_disk):
    repo = Repository(full_disk / "repo")
    with pytest.raises(RepositoryError, match=r"no space left on the device \(ENOSPC\)") as ei:
        write_version(repo)
    assert str(full_disk) in ei.value.render()
    assert repo.version_numbers("relu") == []
    assert not [p for p in (full_disk / "repo" / "relu").iterdir() if p.name.startswith(".staging-")]


def test_full_disk_during_optimize_is_one_line_not_a_traceback(full_disk, tmp_path, cli_env):
    torch = pytest.importorskip("torch")
    import sk_models

    src = tmp_path / "m.onnx"
    torch.onnx.export(sk_models.mlp(), (torch.zeros(2, 64),), str(src), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    data = sk_models.digits_npz(tmp_path / "digits.npz", n=200)
    run = cli(["optimize", str(src), "-r", str(full_disk / "repo"), "--name", "mlp", "--calibration-data", data,
               "--target", "onnx", "--latency-seconds", "0.02", "--batch-sizes", "1", "--min-speedup", "0.001"],
              cli_env, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "no space left on the device" in run.stderr, run.stderr
    mdir = full_disk / "repo" / "mlp"
    left = [p.name for p in mdir.iterdir()] if mdir.exists() else []
    assert not [n for n in left if n.startswith(".staging-") or n.isdigit()], left


# ---------------------------------------------------------------------------------------------
# package: the build context


def test_package_context_holds_only_what_it_lists_and_the_sbom_hashes_it(tmp_path):
    from serve_kit.packaging import context as ctx
    from serve_kit.packaging.sbom import build_sbom

    root = tmp_path / "repo"
    write_version(Repository(root), extra={SAMPLES: b"s" * 10, "sub/notes.txt": b"n"})
    selection = ctx.select_versions(root, None)
    dest = tmp_path / "context" / "models"
    copied = ctx.copy_models(selection, dest, triton=True)
    on_disk = ctx.hash_files(dest)
    assert {f"relu/1/{rel}": h for rel, h in copied[("relu", 1)].items()} == \
        {k: v for k, v in on_disk.items() if k.startswith("relu/1/")}
    sbom = build_sbom(image_name="x", image_version="1", base_name="b", base_digest=None, wheels=[],
                      versions=selection.versions, created="1970-01-01T00:00:00Z", copied=copied)
    props = {p["name"]: p["value"] for c in sbom["components"] for p in c.get("properties", [])}
    assert props["serve-kit:file:model.onnx:sha256"] == on_disk["relu/1/model.onnx"]
    assert props["serve-kit:file:sub/notes.txt:sha256"] == on_disk["relu/1/sub/notes.txt"]


def test_package_refuses_a_manifest_that_reaches_into_the_build_context(tmp_path):
    """The reported case: `../../../wheels/<name>.whl` listed with the hash of a wheel in the
    repository; nothing may be copied over the context's own wheel."""
    from serve_kit.packaging import context as ctx

    root = tmp_path / "repo"
    write_version(Repository(root))
    wheel = b"PK fake wheel"
    (tmp_path / "wheels").mkdir()  # where relu/1/../../../ points, with the hash listed: verified on main
    (tmp_path / "wheels" / "serve_kit-0-py3-none-any.whl").write_bytes(wheel)
    edit_manifest(root / "relu" / "1", lambda m: list_file(m, "../../../wheels/serve_kit-0-py3-none-any.whl", wheel))
    with pytest.raises(RepositoryError, match="leaves its folder"):
        ctx.select_versions(root, None)
    # Even past verification (a selection built by hand), the copy refuses names and collisions.
    sel = ctx.Selection(Repository(root), {"relu": make_config()}, [Repository(root).version("relu")])
    context = tmp_path / "ctx"
    (context / "wheels").mkdir(parents=True)
    (context / "wheels" / "serve_kit-0-py3-none-any.whl").write_bytes(b"the real one")
    with pytest.raises(RepositoryError):
        ctx.copy_models(sel, context / "models")
    assert (context / "wheels" / "serve_kit-0-py3-none-any.whl").read_bytes() == b"the real one"


def test_package_refuses_manifest_json_listed_as_a_file(tmp_path):
    from serve_kit.packaging import context as ctx

    root = tmp_path / "repo"
    write_version(Repository(root))
    info = Repository(root).version("relu")
    info.manifest["files"][MANIFEST] = {"sha256": "0" * 64, "size": 1}
    sel = ctx.Selection(Repository(root), {"relu": make_config()}, [info])
    with pytest.raises(RepositoryError, match="manifest.json"):
        ctx.copy_models(sel, tmp_path / "ctx" / "models")


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "a/b", ".hidden"])
def test_optimize_refuses_a_model_name_that_is_a_path_before_any_work(tmp_path, name):
    from serve_kit.config import DataSpec, SourceSpec
    from serve_kit.optimize.pipeline import OptimizeJob, run

    src = tmp_path / "relu.onnx"
    src.write_bytes(relu_onnx())
    job = OptimizeJob(source=SourceSpec(path=str(src)), repository=tmp_path / "repo", model_name=name,
                      data=DataSpec(calibration=str(tmp_path / "absent.npz")))
    with pytest.raises(RepositoryError, match="not a model name"):
        run(job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relu.onnx"]


@pytest.mark.parametrize("which", [CONFIG, f"1/{MANIFEST}", f"1/{SAMPLES}"])
def test_a_fifo_in_place_of_metadata_is_refused_not_waited_on(tmp_path, which):
    """A read of a fifo blocks until someone writes to it: the server must refuse it at once."""
    import threading

    root = tmp_path / "repo"
    write_version(Repository(root), extra={SAMPLES: b"x"} if which.endswith(SAMPLES) else None)
    target = root / "relu" / which
    target.unlink()
    os.mkfifo(target)
    box = []
    t = threading.Thread(target=lambda: box.append(manager_index(root)), daemon=True)
    t.start()
    t.join(120)
    if t.is_alive():  # unblock the reader so the test process can end
        with open(target, "wb"):
            pass
        t.join(30)
        pytest.fail(f"loading blocked on a fifo {which}")
    index, ready = box[0]
    assert not ready and "fifo" in json.dumps(index), index


_DTYPES = st.sampled_from(["<f4", ">f8", "<i8", "u1", "?", "<f2", "S5", "<U3", "<c8"])


@settings(max_examples=150, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=3), dtype=_DTYPES, fortran=st.booleans(),
       rows=st.one_of(st.none(), st.integers(0, 7)), compressed=st.booleans())
def test_read_samples_reads_what_numpy_wrote(tmp_path_factory, shape, dtype, fortran, rows, compressed):
    """The header-first reader gives numpy's own arrays (and only the first `rows` rows)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, size=shape).astype(dtype)
    if fortran:
        a = np.asfortranarray(a)
    path = tmp_path_factory.mktemp("npz") / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, **{"input.x": a, "reference.y": a[::-1] if a.ndim else a})
    got, ref = read_samples(path, rows)
    stored_fortran = a.flags.f_contiguous and not a.flags.c_contiguous  # as numpy writes the header
    want = a if rows is None or a.ndim == 0 or stored_fortran else a[:rows]
    assert got["x"].dtype == a.dtype and got["x"].shape == want.shape
    np.testing.assert_array_equal(got["x"], want)
    np.testing.assert_array_equal(read_samples(path)[1]["y"], np.load(path)["reference.y"])


def test_http_load_of_a_path_is_400_and_the_index_shows_no_server_paths(tmp_path):
    import http.client

    from runtime.rt_server import InProcessServer  # noqa: E402

    root = tmp_path / "repo"
    write_version(Repository(root))
    (root / "broken").mkdir()
    (root / "broken" / CONFIG).write_text("name: broken\nbackend: nope\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / CONFIG).write_text("name: outside\nbackend: nope\n")
    srv = InProcessServer(root, management_token="t0ken").start()
    try:
        def post(path: str) -> tuple[int, str]:
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            c.request("POST", path, body=b"{}", headers={"Authorization": "Bearer t0ken",
                                                         "Content-Type": "application/json"})
            r = c.getresponse()
            out = r.status, r.read().decode()
            c.close()
            return out

        for name in ("..", "..%2Foutside", "%2e%2e", ".staging-x", "-x"):
            status, body = post(f"/v2/repository/models/{name}/load")
            assert status in (400, 404), (name, status, body)
            assert str(tmp_path) not in body
        status, body = post("/v2/repository/index")
        assert status == 200
        index = json.loads(body)
        assert {e["name"] for e in index} == {"relu", "broken"}, index
        assert str(tmp_path) not in body and "broken/config.yaml" in body
    finally:
        srv.stop()


def test_a_huge_warmup_batch_in_config_yaml_is_a_refused_load_not_an_allocation(tmp_path):
    root = tmp_path / "repo"
    write_version(Repository(root))
    cfg = (root / "relu" / CONFIG).read_text()
    cfg = cfg.replace("max_batch_size: 8", "max_batch_size: 1000000000")
    cfg += "\n" if not cfg.endswith("\n") else ""
    import yaml

    doc = yaml.safe_load(cfg)
    doc["warmup"] = {"batch_sizes": [1, 1_000_000_000], "source": "zeros"}
    (root / "relu" / CONFIG).write_text(yaml.safe_dump(doc))
    index, ready = manager_index(root)
    assert not ready and "warm-up batch 1000000000" in index[0]["reason"], index
