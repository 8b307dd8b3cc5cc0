"""serve_kit.repository: atomic versions, manifests, verification, and `serve-kit inspect`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from serve_kit.config import ModelConfig, load_model_config
from serve_kit.errors import RepositoryError
from serve_kit.repository import CONFIG, MANIFEST, MANIFEST_FORMAT, Repository, atomic_write_text


def relu_onnx() -> bytes:
    """A real one-node ONNX model: output = relu(input), input FP32 [batch, 4]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_config(name: str = "relu", max_batch_size: int = 8) -> ModelConfig:
    return ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size,
                       inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
                       outputs=[{"name": "output", "datatype": "FP32", "shape": [-1, 4]}])


def write_version(repo: Repository, model: str = "relu", payload: bytes | None = None,
                  extra: dict[str, bytes] | None = None, manifest: dict | None = None) -> int:
    with repo.new_version(model) as stage:
        (stage.dir / "model.onnx").write_bytes(relu_onnx() if payload is None else payload)
        for rel, data in (extra or {}).items():
            (stage.dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage.dir / rel).write_bytes(data)
        return stage.commit(make_config(model), {"model_file": "model.onnx", "backend": "onnxruntime",
                                                 "variant": "onnx", **(manifest or {})})


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    """Every path under root with its bytes (files), mode and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[p.relative_to(root).as_posix()] = (p.read_bytes() if p.is_file() else None, st.st_mode, st.st_mtime_ns)
    return out


def hidden(model_dir: Path) -> list[str]:
    return [p.name for p in model_dir.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# Writing


def test_commit_writes_version_manifest_and_config(tmp_path):
    repo = Repository(tmp_path / "repo")
    samples = b"not really samples but bytes"
    v = write_version(repo, extra={"samples.npz": samples, "extra/notes.txt": b"hello"},
                      manifest={"tools": {"onnx": "x"}})
    assert v == 1
    vdir = tmp_path / "repo" / "relu" / "1"
    assert sorted(p.relative_to(vdir).as_posix() for p in vdir.rglob("*") if p.is_file()) == \
        ["extra/notes.txt", MANIFEST, "model.onnx", "samples.npz"]

    man = json.loads((vdir / MANIFEST).read_text())
    assert man["format"] == MANIFEST_FORMAT
    assert (man["model"], man["version"], man["model_file"]) == ("relu", 1, "model.onnx")
    assert man["tools"] == {"onnx": "x"} and man["variant"] == "onnx"
    assert man["created"]
    # Every file but the manifest itself, with its real sha256 and size.
    assert set(man["files"]) == {"model.onnx", "samples.npz", "extra/notes.txt"}
    for rel, meta in man["files"].items():
        data = (vdir / rel).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    assert load_model_config(tmp_path / "repo" / "relu" / CONFIG) == make_config()
    assert repo.config("relu") == make_config()
    assert repo.models() == ["relu"]
    assert hidden(tmp_path / "repo" / "relu") == []  # no staging dir, no temp file left
    info = repo.version("relu")
    assert info.model_file == vdir / "model.onnx"
    assert info.size_bytes == sum(p.stat().st_size for p in vdir.rglob("*") if p.is_file())


def test_versions_count_up(tmp_path):
    repo = Repository(tmp_path)
    assert [write_version(repo, payload=bytes([i])) for i in range(3)] == [1, 2, 3]
    assert repo.version_numbers("relu") == [1, 2, 3]
    assert repo.version("relu").version == 3
    assert repo.version("relu", 2).path == tmp_path / "relu" / "2"
    assert (tmp_path / "relu" / "2" / "model.onnx").read_bytes() == bytes([1])
    assert [i.version for i in repo.versions("relu")] == [1, 2, 3]
    # The numbering continues after the highest existing version, not after the count.
    import shutil
    shutil.rmtree(tmp_path / "relu" / "2")
    assert write_version(repo) == 4


def test_manifest_cannot_override_what_the_repository_vouches_for(tmp_path):
    repo = Repository(tmp_path)
    v = write_version(repo, manifest={"version": 99, "model": "other", "format": "mine", "files": {}})
    man = repo.version("relu", v).manifest
    assert (man["version"], man["model"], man["format"]) == (1, "relu", MANIFEST_FORMAT)
    assert "model.onnx" in man["files"]
    assert repo.verify_version(repo.version("relu", v)) == []


def test_commit_refuses_unstaged_model_file_and_leaves_nothing(tmp_path):
    repo = Repository(tmp_path)
    with pytest.raises(RepositoryError, match="model file that was not staged"):
        with repo.new_version("relu") as stage:
            (stage.dir / "model.pt").write_bytes(b"x")
            stage.commit(make_config(), {"model_file": "model.onnx"})
    assert repo.version_numbers("relu") == []
    assert hidden(tmp_path / "relu") == []
    assert not (tmp_path / "relu" / CONFIG).exists()


def test_commit_refuses_config_of_another_model(tmp_path):
    repo = Repository(tmp_path)
    with pytest.raises(RepositoryError) as ei:
        with repo.new_version("relu") as stage:
            (stage.dir / "model.onnx").write_bytes(b"x")
            stage.commit(make_config("other"), {"model_file": "model.onnx"})
    assert "'other'" in ei.value.render()
    assert repo.version_numbers("relu") == [] and hidden(tmp_path / "relu") == []


@pytest.mark.parametrize("exc", [RuntimeError("conversion blew up"), KeyboardInterrupt()])
def test_failure_inside_new_version_changes_nothing(tmp_path, exc):
    repo = Repository(tmp_path)
    write_version(repo, payload=b"v1")
    write_version(repo, payload=b"v2")
    # The model folder's own mtime changes (the staging dir came and went); nothing inside it may.
    before = snapshot(tmp_path / "relu")
    with pytest.raises(type(exc)):
        with repo.new_version("relu") as stage:
            (stage.dir / "model.onnx").write_bytes(b"half written")
            (stage.dir / "sub").mkdir()
            (stage.dir / "sub" / "x.bin").write_bytes(b"x" * 1000)
            assert stage.dir.is_dir()
            raise exc
    assert not stage.dir.exists()
    assert hidden(tmp_path / "relu") == []
    assert repo.version_numbers("relu") == [1, 2]
    # Existing versions and config.yaml: same paths, bytes, modes and mtimes.
    assert snapshot(tmp_path / "relu") == before
    assert all(repo.verify_version(i) == [] for i in repo.versions("relu"))


def test_failure_after_commit_keeps_the_committed_version(tmp_path):
    repo = Repository(tmp_path)
    with pytest.raises(RuntimeError):
        with repo.new_version("relu") as stage:
            (stage.dir / "model.onnx").write_bytes(b"v1")
            stage.commit(make_config(), {"model_file": "model.onnx"})
            raise RuntimeError("after the commit")
    assert repo.version_numbers("relu") == [1]
    assert repo.verify_version(repo.version("relu")) == []


def test_hidden_and_non_version_dirs_are_never_versions(tmp_path):
    repo = Repository(tmp_path)
    write_version(repo)
    mdir = tmp_path / "relu"
    for name in (".staging-abc123", ".5", "0", "01", "latest", "\u00b2"):  # "²".isdigit() is True
        (mdir / name).mkdir()
    (mdir / "7").write_text("a file, not a directory")
    assert repo.version_numbers("relu") == [1]
    with repo.new_version("relu") as stage:
        # While a version is being staged, its directory is invisible to readers.
        assert stage.dir.parent == mdir and stage.dir.name.startswith(".staging-")
        assert repo.version_numbers("relu") == [1]
        assert [i.version for i in repo.versions("relu")] == [1]
        (stage.dir / "model.onnx").write_bytes(b"x")
        assert stage.commit(make_config(), {"model_file": "model.onnx"}) == 2
    assert repo.version_numbers("relu") == [1, 2]
    # A hidden directory at the top level is not a model either.
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / CONFIG).write_text("name: x\n")
    (tmp_path / "no-config").mkdir()
    assert repo.models() == ["relu"]


def test_concurrent_commits_get_distinct_versions(tmp_path):
    repo = Repository(tmp_path)
    n = 8
    barrier = threading.Barrier(n)
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with Repository(tmp_path).new_version("relu") as stage:
                (stage.dir / "model.onnx").write_bytes(f"writer {i}".encode())
                barrier.wait(timeout=10)  # every writer computes "the next number" at once
                results[i] = stage.commit(make_config(), {"model_file": "model.onnx", "writer": i})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results.values()) == list(range(1, n + 1))
    assert repo.version_numbers("relu") == list(range(1, n + 1))
    for i, v in results.items():
        info = repo.version("relu", v)
        assert info.manifest["version"] == v and info.manifest["writer"] == i
        assert (info.path / "model.onnx").read_bytes() == f"writer {i}".encode()
        assert repo.verify_version(info) == []
    assert hidden(tmp_path / "relu") == []


def test_permissions_world_readable_even_under_strict_umask(tmp_path):
    old = os.umask(0o077)  # without this the test could not tell 0644 from what open() gave
    try:
        repo = Repository(tmp_path)
        write_version(repo, extra={"sub/weights.bin": b"w"})
    finally:
        os.umask(old)
    vdir = tmp_path / "relu" / "1"

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(vdir) == 0o755
    assert mode(vdir / "sub") == 0o755
    for p in [vdir / "model.onnx", vdir / MANIFEST, vdir / "sub" / "weights.bin", tmp_path / "relu" / CONFIG]:
        assert mode(p) == 0o644, p


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "d" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in p.parent.iterdir()] == ["f.txt"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------------------------
# Reading and verification


def test_reading_errors(tmp_path):
    repo = Repository(tmp_path)
    assert repo.version_numbers("nope") == [] and repo.models() == []
    with pytest.raises(RepositoryError, match="no versions"):
        repo.version("nope")
    write_version(repo)
    with pytest.raises(RepositoryError) as ei:
        repo.version("relu", 7)
    assert "no version 7" in ei.value.message and ei.value.hint == "versions: 1"
    with pytest.raises(RepositoryError) as ei:
        repo.config("other")
    assert "'other'" in ei.value.render() and ei.value.hint == "models here: relu"
    assert not Repository(tmp_path / "missing").exists() and Repository(tmp_path / "missing").models() == []


def _tamper_byte(v: Path):
    data = bytearray((v / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (v / "model.onnx").write_bytes(bytes(data))


def _truncate(v: Path):
    data = (v / "model.onnx").read_bytes()
    (v / "model.onnx").write_bytes(data[:-1])


@pytest.mark.parametrize("tamper, expected", [
    (_tamper_byte, "model.onnx: sha256 does not match the manifest"),
    (_truncate, "model.onnx: size"),
    (lambda v: (v / "samples.npz").unlink(), "samples.npz: missing"),
    (lambda v: (v / "model.onnx").unlink(), "model.onnx: missing"),
    (lambda v: (v / "evil.py").write_text("import os"), "evil.py: not listed in the manifest"),
    (lambda v: ((v / "sub").mkdir(), (v / "sub" / "x").write_text("x")), "sub/x: not listed in the manifest"),
    (lambda v: (v / MANIFEST).write_text((v / MANIFEST).read_text()[:-20]), f"{MANIFEST} is not valid JSON"),
    (lambda v: (v / MANIFEST).write_bytes(b"\xff\xfe\x00garbage"), f"{MANIFEST} is not valid JSON"),
    (lambda v: (v / MANIFEST).unlink(), f"{MANIFEST} is missing"),
    (lambda v: (v / MANIFEST).write_text("[1, 2]"), f"{MANIFEST} is not a JSON object"),
    (lambda v: ((v / MANIFEST).unlink(), (v / MANIFEST).mkdir()), f"{MANIFEST} cannot be read"),
])
def test_verify_reports_tampering(tmp_path, tamper, expected):
    repo = Repository(tmp_path)
    write_version(repo, extra={"samples.npz": b"s" * 64})
    info = repo.version("relu")
    assert repo.verify_version(info) == []  # clean before
    tamper(info.path)
    problems = repo.verify_version(repo.version("relu"))
    assert any(expected in p for p in problems), problems
    assert repo.verify() == {"relu": {1: problems}}


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(format="other@9"), "unknown manifest format 'other@9'"),
    (lambda m: m.update(files=["model.onnx"]), "`files` is not a mapping"),
    (lambda m: m["files"].update({"model.onnx": "abc"}), "model.onnx: manifest entry is not"),
    (lambda m: m["files"].pop("model.onnx"), "model.onnx: not listed in the manifest"),
    (lambda m: m["files"]["model.onnx"].update(sha256="0" * 64), "model.onnx: sha256 does not match"),
])
def test_verify_reports_edited_manifest(tmp_path, edit, expected):
    # An edited manifest must never crash verification (it used to: AttributeError on a list).
    repo = Repository(tmp_path)
    write_version(repo)
    path = tmp_path / "relu" / "1" / MANIFEST
    man = json.loads(path.read_text())
    edit(man)
    path.write_text(json.dumps(man))
    problems = repo.verify_version(repo.version("relu"))
    assert any(expected in p for p in problems), problems


def test_verify_whole_repository(tmp_path):
    repo = Repository(tmp_path)
    write_version(repo, "a")
    write_version(repo, "a")
    write_version(repo, "b")
    assert repo.verify() == {"a": {1: [], 2: []}, "b": {1: []}}
    (tmp_path / "a" / CONFIG).write_text("name: a\nbackend: nope\n")
    _tamper_byte(tmp_path / "b" / "1")
    report = repo.verify()
    assert report["a"][1] == [] and report["a"][2] == []
    assert "backend" in report["a"][0][0] and str(tmp_path / "a" / CONFIG) in report["a"][0][0]
    assert report["b"] == {1: ["model.onnx: sha256 does not match the manifest"]}


def test_committed_onnx_model_loads_and_runs(tmp_path):
    from serve_kit.runtime.backends import load_backend

    repo = Repository(tmp_path)
    write_version(repo)
    info = repo.version("relu")
    backend = load_backend(info.manifest["backend"], info.model_file, ["output"])
    x = np.array([[-1, 2, -3, 4], [5, -6, 7, -8]], dtype=np.float32)
    np.testing.assert_array_equal(backend.infer({"input": x})["output"], np.maximum(x, 0))


# ---------------------------------------------------------------------------------------------
# `serve-kit inspect`, as a user runs it


def run_cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_kit", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


@pytest.fixture
def built_repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    write_version(Repository(root), extra={"samples.npz": b"s" * 32})
    return root


def test_inspect_clean_repository(built_repo, cli_env):
    r = run_cli(["inspect", str(built_repo)], cli_env)
    assert r.returncode == 0, r.stderr
    assert "relu" in r.stdout and "backend=onnxruntime" in r.stdout and "max_batch_size=8" in r.stdout
    assert "input:FP32:-1x4" in r.stdout and "output:FP32:-1x4" in r.stdout
    assert "model.onnx" in r.stdout and "ok" in r.stdout and "FAILED" not in r.stdout
    assert "error" not in r.stderr


def test_inspect_tampered_repository_fails(built_repo, cli_env):
    _tamper_byte(built_repo / "relu" / "1")
    r = run_cli(["inspect", str(built_repo)], cli_env)
    assert r.returncode == 1
    assert "FAILED" in r.stdout
    assert "error:" in r.stderr and "verification failed" in r.stderr
    assert "relu/1: model.onnx: sha256 does not match the manifest" in r.stderr
    assert "Traceback" not in r.stderr
    # --no-verify only reads the manifests.
    assert run_cli(["inspect", "--no-verify", str(built_repo)], cli_env).returncode == 0


def test_inspect_json(built_repo, cli_env):
    r = run_cli(["--json", "inspect", str(built_repo)], cli_env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["verified"] is True
    (model,) = report["models"]
    assert model["name"] == "relu" and model["inputs"] == ["input:FP32:-1x4"]
    (version,) = model["versions"]
    assert version["version"] == 1 and version["verified"] is True and version["problems"] == []
    assert version["model_file"] == "model.onnx"


def test_inspect_json_tampered(built_repo, cli_env):
    (built_repo / "relu" / "1" / "samples.npz").unlink()
    r = run_cli(["--json", "inspect", str(built_repo)], cli_env)
    assert r.returncode == 1
    report, _ = json.JSONDecoder().raw_decode(r.stdout)
    assert report["verified"] is False
    assert report["models"][0]["versions"][0]["problems"] == ["samples.npz: missing"]


def test_inspect_json_tampered_stdout_is_one_document(built_repo, cli_env):
    (built_repo / "relu" / "1" / "samples.npz").unlink()
    r = run_cli(["--json", "inspect", str(built_repo)], cli_env)
    assert r.returncode == 1
    json.loads(r.stdout)


def test_inspect_missing_repository(tmp_path, cli_env):
    missing = tmp_path / "no-such-repo"
    env = {k: v for k, v in cli_env.items() if k != "NO_COLOR"}
    r = run_cli(["inspect", str(missing)], {**env, "FORCE_COLOR": "1", "TERM": "xterm"})
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "hint:" in lines[1]  # one error line, then its hint
    assert "repository folder not found" in lines[0] and str(missing) in lines[0]
    assert "\x1b[1;31merror:" in lines[0] and "\x1b[31m" in lines[0]  # red
    assert not missing.exists()


def test_inspect_unknown_model(built_repo, cli_env):
    r = run_cli(["inspect", "--model", "nope", str(built_repo)], cli_env)
    assert r.returncode == 1
    assert "'nope'" in r.stderr and "models here: relu" in r.stderr and "Traceback" not in r.stderr


def test_console_script_is_the_same_cli(built_repo, cli_env):
    script = Path(sys.executable).parent / "serve-kit"
    if not script.exists():
        pytest.skip("serve-kit console script not installed next to this interpreter")
    r = subprocess.run([str(script), "--json", "inspect", str(built_repo)], capture_output=True, text=True,
                       env=cli_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] is True
