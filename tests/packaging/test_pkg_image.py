"""End to end with the real Docker engine and registry: optimize -> package -> build -> run the image ->
tritonclient inference equals the reference -> push -> pull by digest; the same through the
daemonless builder, whose rebuild gives the same digest."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from pk_helpers import (RUN_ID, cleanup_images, cosine_min, host_outputs, running, samples, sk, triton_grpc,
                        triton_http)


def _manifest(repo: Path) -> dict:
    return json.loads((repo / "digits" / "1" / "manifest.json").read_text())


def _read_from_image(client, image: str, path: str) -> bytes:
    container = client.containers.create(image)
    try:
        stream, _ = container.get_archive(path)
        data = b"".join(stream)
    finally:
        container.remove(force=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return t.extractfile(t.getmembers()[0]).read()


# -- the Docker engine builder ------------------------------------------------------------------

def test_engine_build_passes_smoke_test_and_reports_layers(engine_build):
    result, _ = engine_build
    smoke = result["smoke_test"]
    assert smoke["passed"] and smoke["health"] == "healthy"
    (m,) = smoke["models"]
    assert m["model"] == "digits" and m["samples"] == 8 and m["passed"]
    files = [x for x in result["layers"] if x["size"] > 0]
    # base | venv | SBOM | models: the model files are the last layer, alone.
    assert len(files) == 3, files
    assert "/opt/serve-kit/venv" in files[0]["created_by"]
    assert "/models" in files[-1]["created_by"] and files[-1]["size"] < 1_000_000
    assert 50e6 < result["size_over_base"] <= 300e6  # the goal for an ONNX Runtime CPU model
    assert result["size_over_base"] == sum(x["size"] for x in result["layers"])
    print(f"\nengine build: {result['size_over_base'] / 1e6:.1f} MB over the base; "
          f"layers {[(x['created_by'][-40:], x['size']) for x in files]}; seconds {result['seconds']}")


def test_engine_image_config_labels_and_sbom(engine_build, services, digits_repo):
    result, out = engine_build
    image = services.client.images.get(result["image_id"])
    cfg = image.attrs["Config"]
    assert cfg["User"] == "10001:10001"
    assert set(cfg["ExposedPorts"]) == {"8000/tcp", "8001/tcp"}
    assert cfg["Entrypoint"][:3] == ["/opt/serve-kit/venv/bin/serve-kit", "serve", "/models"]
    assert "0.0.0.0" in cfg["Entrypoint"]
    assert "/v2/health/ready" in " ".join(cfg["Healthcheck"]["Test"])
    manifest = _manifest(digits_repo)
    labels = cfg["Labels"]
    assert labels["serve-kit.model.digits.1.sha256"] == manifest["files"]["model.onnx"]["sha256"]
    assert labels["serve-kit.models"] == "digits:1"
    assert labels["org.opencontainers.image.version"] == f"engine-{RUN_ID}"
    assert labels["org.opencontainers.image.base.name"] == services.base
    # The SBOM inside the image is the one beside it, and lists every wheel in the context.
    inside = _read_from_image(services.client, result["image_id"], "/opt/serve-kit/sbom.cdx.json")
    beside = (out / "context" / "sbom.cdx.json").read_bytes()
    assert inside == beside
    sbom = json.loads(inside)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    libs = {c["name"].lower().replace("_", "-"): c for c in sbom["components"] if c["type"] == "library"}
    wheels = sorted((out / "context" / "wheels").glob("*.whl"))
    assert len(libs) == len(wheels) == result["wheels"]
    assert {"serve-kit", "onnxruntime", "numpy", "grpcio"} <= set(libs)
    # Only the runtime's dependencies: no torch, no onnx (optimize's), no test tools.
    assert not {"torch", "onnx", "mlflow", "pytest", "docker"} & set(libs)
    (model,) = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert model["hashes"][0]["content"] == manifest["files"]["model.onnx"]["sha256"]
    # The model manifest travels inside the image too.
    assert json.loads(_read_from_image(services.client, result["image_id"], "/models/digits/1/manifest.json")) \
        == manifest
    # --triton: Triton's twin config beside config.yaml in the packaged repository.
    pbtxt = _read_from_image(services.client, result["image_id"], "/models/digits/config.pbtxt").decode()
    assert 'platform: "onnxruntime_onnx"' in pbtxt and "max_batch_size: 64" in pbtxt


def test_engine_image_serves_the_reference_answers_to_tritonclient(engine_build, services, digits_repo):
    result, _ = engine_build
    inputs, reference = samples(digits_repo)
    here = host_outputs(digits_repo / "digits" / "1" / "model.onnx", inputs)["logits"]
    recorded = _manifest(digits_repo)["validation"]["errors"]["logits"]
    with running(services.client, result["image_id"]) as (http, grpc):
        got_http = triton_http(http, "digits", inputs, "logits")
        got_grpc = triton_grpc(grpc, "digits", inputs, "logits")
    for got in (got_http, got_grpc):
        # The image runs the very model file: its answers are ONNX Runtime's here, to float noise...
        np.testing.assert_allclose(got, here, rtol=1e-5, atol=1e-5)
        # ...and as close to the PyTorch reference as the version was validated to be.
        assert np.max(np.abs(got - reference["logits"])) <= recorded["max_abs_error"] * 1.001 + 1e-5
        assert cosine_min(got, reference["logits"]) >= recorded["cosine_min"] - 1e-5
        assert (got.argmax(1) == reference["logits"].argmax(1)).all()


def test_engine_push_then_pull_by_digest(engine_build, services):
    from serve_kit.packaging.reference import ImageReference
    from serve_kit.packaging.registry import Registry, sha256_bytes

    result, _ = engine_build
    push = result["push"]
    assert push["digest"].startswith("sha256:") and push["pinned"].endswith(push["digest"])
    ref = ImageReference.parse(push["reference"])
    body, media, digest = Registry(services.registry).get_manifest(ref.repository, ref.tag)
    assert digest == push["digest"] == sha256_bytes(body)
    services.client.images.remove(push["reference"], force=False)  # the tag; the pull must bring it back
    pulled = services.client.images.pull(push["pinned"])
    assert pulled.id == result["image_id"]
    assert push["pinned"] in pulled.attrs["RepoDigests"]


# -- the daemonless builder ---------------------------------------------------------------------

def test_oci_build_smoke_test_and_sizes(oci_build):
    result, out, _ = oci_build
    assert result["builder"] == "oci" and result["smoke_test"]["passed"]
    assert [x["created_by"].split(":")[1].split()[0] for x in result["layers"]] == ["venv", "SBOM", "model"]
    assert result["size_over_base"] <= 300e6
    assert Path(result["output"]).is_file() and Path(result["output_sbom"]).is_file()
    print(f"\ndaemonless build: {result['size_over_base'] / 1e6:.1f} MB over the base "
          f"({result['compressed_size_over_base'] / 1e6:.1f} MB compressed); seconds {result['seconds']}; "
          f"digest {result['digest']}")


def test_oci_rebuild_without_engine_gives_the_same_digest_and_bytes(oci_build, digits_repo, sk_wheel, services,
                                                                    tmp_path):
    """Same inputs, another context folder, no Docker engine reachable at all: the same image digest
    and a byte-identical archive."""
    first, out, tag = oci_build
    r = sk("--json", "package", digits_repo, "--tag", tag, "--base", services.base_in_registry, "--no-push",
           "--context-dir", tmp_path / "ctx", "--output", tmp_path / "again.tar", "--serve-kit-wheel", sk_wheel,
           "--source-date-epoch", "1700000000", env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(r.stdout)
    assert second["builder"] == "oci"  # auto: no engine answered
    assert second["digest"] == first["digest"]
    assert [x["digest"] for x in second["layers"]] == [x["digest"] for x in first["layers"]]
    assert (tmp_path / "again.tar").read_bytes() == (out / "image.tar").read_bytes()
    # Another epoch is another image (the timestamps are inputs, and they are in it).
    r = sk("--json", "package", digits_repo, "--tag", tag, "--base", services.base_in_registry, "--no-push",
           "--context-dir", tmp_path / "ctx2", "--output", tmp_path / "other.tar", "--serve-kit-wheel", sk_wheel,
           "--source-date-epoch", "1700000001", env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["digest"] != first["digest"]


def test_oci_layers_are_normalized(oci_build):
    import gzip

    result, out, _ = oci_build
    with tarfile.open(out / "image.tar") as archive:
        index = json.load(archive.extractfile("index.json"))
        manifest = json.load(archive.extractfile("blobs/" + index["manifests"][0]["digest"].replace(":", "/")))
        model_layer = manifest["layers"][-1]["digest"]
        data = archive.extractfile("blobs/" + model_layer.replace(":", "/")).read()
    assert data[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as layer:
        members = layer.getmembers()
    names = [m.name.rstrip("/") for m in members]
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert names[0] == "models" and "models/digits/1/model.onnx" in names
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (1700000000, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)


def test_oci_archive_loads_into_docker_and_serves(oci_build, services, digits_repo):
    result, out, tag = oci_build
    with open(out / "image.tar", "rb") as f:
        (image,) = services.client.images.load(f)
    assert image.id == result["image_id"]
    cfg = image.attrs["Config"]
    assert cfg["User"] == "10001:10001" and cfg["Cmd"] is None
    assert cfg["Labels"]["org.opencontainers.image.created"] == "2023-11-14T22:13:20Z"
    inputs, reference = samples(digits_repo)
    here = host_outputs(digits_repo / "digits" / "1" / "model.onnx", inputs)["logits"]
    with running(services.client, image.id) as (http, _):
        got = triton_http(http, "digits", inputs, "logits")
    np.testing.assert_allclose(got, here, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == reference["logits"].argmax(1)).all()


def test_oci_push_and_pull_by_digest(oci_build, services, digits_repo, sk_wheel, tmp_path):
    """The daemonless builder pushes through the distribution API; the engine pulls it by digest,
    and it runs."""
    first, _, _ = oci_build
    ref = f"{services.registry}/sk-test/digits-oci:{RUN_ID}"
    t0 = time.monotonic()
    r = sk("--json", "package", digits_repo, "--tag", ref, "--base", services.base_in_registry, "--builder", "oci",
           "--context-dir", tmp_path / "ctx", "--serve-kit-wheel", sk_wheel, "--source-date-epoch", "1700000000")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    pinned = result["push"]["pinned"]
    # Same inputs but the tag (a label and the SBOM's name), pushed in the same registry.
    assert result["push"]["digest"] == result["digest"]
    print(f"\ndaemonless build + push: {time.monotonic() - t0:.1f} s -> {pinned}")
    try:
        pulled = services.client.images.pull(pinned)
        assert pulled.id == result["image_id"]
        with running(services.client, pinned) as (http, _):
            inputs, reference = samples(digits_repo)
            got = triton_http(http, "digits", inputs, "logits")
        assert (got.argmax(1) == reference["logits"].argmax(1)).all()
    finally:
        cleanup_images(services.client, [result["image_id"]])


@pytest.mark.parametrize("field", ["User", "Healthcheck", "ExposedPorts", "Entrypoint"])
def test_both_builders_configure_the_image_alike(engine_build, oci_build, services, field):
    engine_cfg = services.client.images.get(engine_build[0]["image_id"]).attrs["Config"]
    oci_cfg = json.loads(_oci_config(oci_build[1] / "image.tar"))["config"]
    assert engine_cfg[field] == oci_cfg[field]


def _oci_config(archive: Path) -> bytes:
    with tarfile.open(archive) as t:
        manifest = json.load(t.extractfile("manifest.json"))
        return t.extractfile(manifest[0]["Config"]).read()


def test_oci_base_from_an_oci_layout(oci_build, services, digits_repo, sk_wheel, tmp_path):
    """The daemonless builder takes its base from an OCI image layout folder as well as from a
    registry; the layers it adds do not depend on where the base came from."""
    from serve_kit.packaging.reference import ImageReference
    from serve_kit.packaging.registry import OCI_INDEX, Registry

    first, _, tag = oci_build
    ref = ImageReference.parse(services.base_in_registry)
    registry = Registry(ref.registry)
    body, media, digest = registry.get_manifest(ref.repository, ref.tag)
    layout = tmp_path / "base-layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / digest.split(":")[1]).write_bytes(body)
    manifest = json.loads(body)
    for d in [manifest["config"], *manifest["layers"]]:
        registry.fetch_blob(ref.repository, d["digest"], blobs / d["digest"].split(":")[1])
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": media, "digest": digest, "size": len(body),
         "annotations": {"org.opencontainers.image.ref.name": "3.11"}}]}))
    r = sk("--json", "package", digits_repo, "--tag", tag, "--no-push", "--base", f"oci:{layout}:3.11",
           "--builder", "oci", "--context-dir", tmp_path / "ctx", "--output", tmp_path / "x.tar",
           "--serve-kit-wheel", sk_wheel, "--source-date-epoch", "1700000000")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["base"]["digest"] == digest
    # venv and model layers are the same bytes; the SBOM names its base, so it differs.
    same = [a["digest"] == b["digest"] for a, b in zip(result["layers"], first["layers"])]
    assert same == [True, False, True]
