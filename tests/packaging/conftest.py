"""Fixtures of the packaging tests: the real services (Docker engine, registry on 127.0.0.1, a base
image made from Debian packages by scripts/ci-services.sh), a real digits repository, and the images
built once per session and shared by the tests that look at them.

Without the engine or the registry the image tests skip with the reason, except in CI (CI=true),
where they fail: CI runs scripts/ci-services.sh first, so a missing service there is a broken setup,
not a reason to pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGING_TESTS = Path(__file__).resolve().parent
if str(PACKAGING_TESTS) not in sys.path:
    sys.path.insert(0, str(PACKAGING_TESTS))

REGISTRY = os.environ.get("SERVE_KIT_TEST_REGISTRY", "127.0.0.1:5000")
BASE = os.environ.get("SERVE_KIT_TEST_BASE", "serve-kit/python:3.11-bookworm")
from pk_helpers import RUN_ID, cleanup_images, free_port, sk  # noqa: E402,F401 - shared with the tests


@dataclass
class Services:
    client: object
    registry: str
    base: str
    """The base in the engine (engine builds)."""
    base_in_registry: str
    """The same base in the registry (daemonless builds)."""


@pytest.fixture(scope="session")
def services() -> Services:
    from serve_kit.packaging import engine
    from serve_kit.packaging.errors import PackagingError
    from serve_kit.packaging.reference import ImageReference
    from serve_kit.packaging.registry import Registry

    problems = []
    client = engine.connect()
    if client is None:
        problems.append("no Docker engine answers (DOCKER_HOST or /var/run/docker.sock)")
    else:
        try:
            client.images.get(BASE)
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound
            problems.append(f"the base image {BASE} is not in the engine")
    ref = ImageReference.parse(f"{REGISTRY}/{BASE}")
    try:
        Registry(REGISTRY).get_manifest(ref.repository, ref.tag)
    except PackagingError as e:
        problems.append(f"registry {REGISTRY}: {e.message}")
    if problems:
        reason = "; ".join(problems) + " -- run `sudo bash scripts/ci-services.sh`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must provide the image-test services: " + reason)
        pytest.skip(reason)
    return Services(client, REGISTRY, BASE, f"{REGISTRY}/{BASE}")


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory) -> Path:
    """A real repository: `serve-kit optimize --recipe digits-cnn -t onnx-int8-static` (trained on
    scikit-learn's digits, INT8-quantized, validated; samples.npz with the reference's outputs)."""
    repo = tmp_path_factory.mktemp("digits") / "repo"
    r = sk("optimize", "--recipe", "digits-cnn", "-t", "onnx-int8-static", "-r", repo, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return repo


@pytest.fixture(scope="session")
def sk_wheel(tmp_path_factory) -> Path:
    """serve-kit's wheel built once: builds that must be identical use this one file, so that an edit
    of the source tree during the session cannot make them differ."""
    from serve_kit.packaging.wheels import build_serve_kit_wheel

    return build_serve_kit_wheel(tmp_path_factory.mktemp("wheel"), 0)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, proxied artifacts), killed by PID at the end."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = Path(sys.executable).parent / "mlflow"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        # The server's own group (its uvicorn/gunicorn workers): started by us, ended by its id.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture(scope="session", autouse=True)
def _prune_build_stages():
    """The engine keeps each build's venv stage as a dangling image (~450 MB, build cache): the
    session removes those left by the images it built."""
    yield
    from serve_kit.packaging import engine

    client = engine.connect()
    if client is not None:
        try:
            client.images.prune(filters={"dangling": True, "label": "serve-kit.stage=venv"})
        except Exception:  # noqa: BLE001 - best effort; an engine gone at exit is fine
            pass


@pytest.fixture(scope="session")
def engine_build(services, digits_repo, mlflow_server, tmp_path_factory):
    """The whole flow once, through the CLI with the Docker engine: package -> build (network none)
    -> smoke test -> push to the registry -> register in MLflow -> Kubernetes manifests."""
    out = tmp_path_factory.mktemp("engine")
    tag = f"{services.registry}/sk-test/digits:engine-{RUN_ID}"
    t0 = time.monotonic()
    r = sk("--json", "package", digits_repo, "--tag", tag, "--base", services.base, "--builder", "docker",
           "--context-dir", out / "context", "--smoke-test", "--triton", "--k8s", out / "k8s",
           "--register", "digits-e2e", "--tracking-uri", mlflow_server)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    result["_wall_seconds"] = seconds
    yield result, out
    cleanup_images(services.client, [result["image_id"], tag])


@pytest.fixture(scope="session")
def oci_build(services, digits_repo, sk_wheel, tmp_path_factory):
    """The daemonless builder once: base from the registry, an archive, a push, and a smoke test (the
    archive loaded into the engine)."""
    out = tmp_path_factory.mktemp("oci")
    tag = f"{services.registry}/sk-test/digits:oci-{RUN_ID}"
    r = sk("--json", "package", digits_repo, "--tag", tag, "--base", services.base_in_registry, "--builder", "oci",
           "--context-dir", out / "context", "--output", out / "image.tar", "--serve-kit-wheel", sk_wheel,
           "--smoke-test", "--source-date-epoch", "1700000000")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    yield result, out, tag
    cleanup_images(services.client, [result["image_id"], tag])
