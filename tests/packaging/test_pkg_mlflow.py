"""The MLflow model registry, read back from a real `mlflow server` on 127.0.0.1 and from the embedded
default (a local SQLite store, no server)."""

from __future__ import annotations

import json

import pytest

from pk_helpers import sk

mlflow = pytest.importorskip("mlflow")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_package_registers_version_tags_alias_and_artifacts(engine_build, mlflow_server, digits_repo):
    result, _ = engine_build
    reg = result["registered"]
    assert reg["name"] == "digits-e2e" and reg["alias"] == "candidate" and reg["tracking_uri"] == mlflow_server
    client = _client(mlflow_server)
    mv = client.get_model_version("digits-e2e", str(reg["version"]))
    assert client.get_model_version_by_alias("digits-e2e", "candidate").version == mv.version
    manifest = json.loads((digits_repo / "digits" / "1" / "manifest.json").read_text())
    # Tags: the image reference and digest, and every hash of the manifest.
    assert mv.tags["serve-kit.image"] == result["push"]["pinned"]
    assert mv.tags["serve-kit.image.digest"] == result["push"]["digest"]
    for rel, meta in manifest["files"].items():
        assert mv.tags[f"sha256.digits/1/{rel}"] == meta["sha256"]
    # The run: validation and benchmark numbers as metrics, the model files and reports as artifacts.
    run = client.get_run(mv.run_id)
    errors = manifest["validation"]["errors"]["logits"]
    assert run.data.metrics["digits.v1.logits.max_abs_error"] == pytest.approx(errors["max_abs_error"])
    assert run.data.metrics["digits.v1.metric"] == pytest.approx(manifest["validation"]["metric"])
    assert run.data.metrics["digits.v1.latency.b1.p50_ms"] == pytest.approx(manifest["latency"]["1"]["p50_ms"])
    assert run.data.params["digits.v1.precision"] == "int8"
    files = {a.path for a in client.list_artifacts(mv.run_id, "model/digits/1")}
    assert {"model/digits/1/model.onnx", "model/digits/1/manifest.json", "model/digits/1/samples.npz"} <= files
    reports = {a.path for a in client.list_artifacts(mv.run_id, "reports")}
    assert "reports/sbom.cdx.json" in reports and "reports/digits-1-validation.json" in reports
    # The artifact is the real model file, byte for byte.
    local = client.download_artifacts(mv.run_id, "model/digits/1/model.onnx")
    assert open(local, "rb").read() == (digits_repo / "digits" / "1" / "model.onnx").read_bytes()


def test_promote_moves_the_alias(engine_build, mlflow_server, digits_repo):
    from serve_kit.packaging.context import select_versions
    from serve_kit.packaging.mlflow_registry import register

    first = engine_build[0]["registered"]["version"]
    second = register(mlflow_server, "digits-e2e", select_versions(digits_repo, None), image_ref="example/x:2",
                      digest=None, sbom_path=None)
    assert second["version"] == first + 1
    client = _client(mlflow_server)
    assert client.get_model_version_by_alias("digits-e2e", "candidate").version == str(second["version"])
    r = sk("--json", "promote", "digits-e2e", "--version", first, "--alias", "champion", "--tracking-uri", mlflow_server)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["previous"] is None
    assert client.get_model_version_by_alias("digits-e2e", "champion").version == str(first)
    r = sk("--json", "promote", "digits-e2e", "--version", second["version"], "--alias", "champion",
           "--tracking-uri", mlflow_server)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["previous"] == first
    assert client.get_model_version_by_alias("digits-e2e", "champion").version == str(second["version"])
    r = sk("promote", "digits-e2e", "--version", 99, "--tracking-uri", mlflow_server)
    assert r.returncode == 1 and "has no version 99" in r.stderr


def test_embedded_default_store_needs_no_server(digits_repo, tmp_path, monkeypatch):
    from serve_kit.packaging.context import select_versions
    from serve_kit.packaging.mlflow_registry import check_reachable, register, resolve_tracking_uri

    monkeypatch.setenv("SERVE_KIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    check_reachable(uri)
    reg = register(uri, "digits-local", select_versions(digits_repo, None), image_ref="example/digits:1",
                   digest="sha256:" + "0" * 64, sbom_path=None)
    assert (tmp_path / "home" / "mlflow" / "mlflow.db").is_file()
    client = _client(uri)
    mv = client.get_model_version_by_alias("digits-local", "candidate")
    assert str(mv.version) == str(reg["version"]) and mv.tags["serve-kit.image"] == "example/digits:1"
    # Artifacts beside the store, not in whatever folder the command ran in.
    assert reg["source"].startswith((tmp_path / "home" / "mlflow" / "artifacts").as_uri())
    env = {"SERVE_KIT_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": ""}
    r = sk("promote", "digits-local", "--version", reg["version"], "--alias", "champion", env=env)
    assert r.returncode == 0, r.stderr
    assert str(client.get_model_version_by_alias("digits-local", "champion").version) == str(mv.version)
