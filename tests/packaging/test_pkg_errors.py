"""Bad input to `serve-kit package`: a clear one-line error, a non-zero exit, and nothing built, written
or pushed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pk_helpers import RUN_ID, cleanup_images, free_port, sk


def _copy(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest)
    return dest


def test_hash_mismatch_builds_nothing(digits_repo, tmp_path):
    repo = _copy(digits_repo, tmp_path / "repo")
    model = repo / "digits" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    model.write_bytes(bytes(data))
    ctx = tmp_path / "ctx"
    r = sk("package", repo, "--tag", "sk-test/never:1", "--context-dir", ctx, "--output", tmp_path / "x.tar",
           "--builder", "oci", "--base", "127.0.0.1:1/none:1")
    assert r.returncode == 1, r.stderr
    assert "failed verification" in r.stderr and "digits/1: model.onnx: sha256 does not match" in r.stderr
    assert "Traceback" not in r.stderr
    assert not ctx.exists() and not (tmp_path / "x.tar").exists()
    # An unlisted file is refused the same way.
    repo2 = _copy(digits_repo, tmp_path / "repo2")
    (repo2 / "digits" / "1" / "extra.bin").write_bytes(b"x")
    r = sk("package", repo2, "--tag", "sk-test/never:1", "--context-dir", ctx)
    assert r.returncode == 1 and "extra.bin: not listed in the manifest" in r.stderr


@pytest.mark.parametrize("tag", ["Digits:1", "digits:bad tag", "digits:-x", "127.0.0.1:5000/", "a//b:1",
                                 "digits@sha256:1234"])
def test_invalid_tag_is_a_usage_error(digits_repo, tmp_path, tag):
    r = sk("package", digits_repo, "--tag", tag, "--context-dir", tmp_path / "ctx")
    assert r.returncode == 2, r.stderr
    assert ("not a valid image reference" in r.stderr or "not a digest" in r.stderr
            or "only sha256 digests" in r.stderr), r.stderr
    assert not (tmp_path / "ctx").exists()


def test_no_engine_and_no_registry(digits_repo, tmp_path):
    no_engine = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    dead = f"127.0.0.1:{free_port()}"
    # Nowhere to put the image.
    r = sk("package", digits_repo, "--tag", "sk-test/x:1", "--base", f"{dead}/base:1", "--context-dir",
           tmp_path / "ctx", env=no_engine)
    assert r.returncode == 1 and "no Docker engine answers and the image has nowhere to go" in r.stderr, r.stderr
    # An output, but the base's registry does not answer.
    t0 = time.monotonic()
    r = sk("package", digits_repo, "--tag", "sk-test/x:1", "--base", f"{dead}/base:1", "--output",
           tmp_path / "x.tar", "--context-dir", tmp_path / "ctx", env=no_engine)
    assert r.returncode == 1 and f"cannot reach the registry {dead}" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60
    # Pushing to a registry that does not answer fails before anything is built.
    r = sk("package", digits_repo, "--tag", f"{dead}/sk-test/x:1", "--base", f"{dead}/base:1",
           "--context-dir", tmp_path / "ctx", env=no_engine)
    assert r.returncode == 1 and "cannot reach the registry" in r.stderr, r.stderr
    # An engine-local base name needs the engine.
    r = sk("package", digits_repo, "--tag", "sk-test/x:1", "--base", "serve-kit/python:3.11-bookworm",
           "--output", tmp_path / "x.tar", "--context-dir", tmp_path / "ctx", env=no_engine)
    assert r.returncode == 1 and "names neither" in r.stderr, r.stderr
    # Asking for the engine explicitly, or for a smoke test, without one.
    r = sk("package", digits_repo, "--tag", "sk-test/x:1", "--builder", "docker", "--context-dir", tmp_path / "ctx",
           env=no_engine)
    assert r.returncode == 1 and "no Docker engine answers" in r.stderr, r.stderr
    for out in (r.stderr,):
        assert "Traceback" not in out
    assert not (tmp_path / "ctx").exists() and not (tmp_path / "x.tar").exists()


def test_unreachable_mlflow_fails_fast_before_building(digits_repo, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = sk("package", digits_repo, "--tag", "sk-test/x:1", "--register", "digits", "--tracking-uri", dead,
           "--context-dir", tmp_path / "ctx", "--output", tmp_path / "x.tar", "--builder", "oci",
           "--base", "127.0.0.1:1/none:1")
    assert r.returncode == 1 and "cannot reach the MLflow tracking server" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "ctx").exists()
    r = sk("promote", "digits", "--version", "1", "--tracking-uri", dead)
    assert r.returncode == 1 and "cannot reach the MLflow tracking server" in r.stderr, r.stderr


def test_json_error_document(digits_repo, tmp_path):
    r = sk("--json", "package", digits_repo, "--tag", "Bad:1", "--context-dir", tmp_path / "ctx")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["error"] == "UsageError" and doc["origin"] == "--tag" and doc["exit_code"] == 2


def test_wrong_answers_fail_the_smoke_test_with_exit_3_and_push_nothing(digits_repo, services, tmp_path):
    """A version whose stored reference outputs disagree with its model (consistent hashes, so it
    verifies): the smoke test catches it, exit 3, and the tag never reaches the registry."""
    from serve_kit.config import load_model_config
    from serve_kit.packaging.errors import PackagingError
    from serve_kit.packaging.reference import ImageReference
    from serve_kit.packaging.registry import Registry
    from serve_kit.repository import Repository

    repo = _copy(digits_repo, tmp_path / "repo")
    src = repo / "digits" / "1"
    manifest = json.loads((src / "manifest.json").read_text())
    config = load_model_config(repo / "digits" / "config.yaml")
    with Repository(repo).new_version("digits") as stage:
        shutil.copyfile(src / "model.onnx", stage.dir / "model.onnx")
        with np.load(src / "samples.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arrays["reference.logits"] = -arrays["reference.logits"]
        np.savez(stage.dir / "samples.npz", **arrays)
        keep = {k: v for k, v in manifest.items() if k not in ("format", "model", "version", "files", "created")}
        assert stage.commit(config, keep) == 2
    tag = f"{services.registry}/sk-test/wrong:{RUN_ID}"
    r = sk("package", repo, "--tag", tag, "--base", services.base, "--builder", "docker", "--smoke-test",
           "--context-dir", tmp_path / "ctx")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "do not match the repository's reference" in r.stderr and "nothing was pushed" in r.stderr
    ref = ImageReference.parse(tag)
    with pytest.raises(PackagingError, match="not found"):
        Registry(services.registry).get_manifest(ref.repository, ref.tag)
    # The smoke test's container is gone.
    assert not services.client.containers.list(all=True, filters={"label": "serve-kit.smoke-test=1"})
    cleanup_images(services.client, [tag])
