"""The pieces of `serve-kit package` that need no engine: references, deterministic layers, wheels,
SBOM, the build context."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from serve_kit.errors import RepositoryError, UsageError
from serve_kit.packaging.errors import PackagingError
from serve_kit.packaging.layers import Entry, parents, stage_venv, tree, write_layer
from serve_kit.packaging.reference import ImageReference
from serve_kit.packaging.wheels import NOT_IN_RUNTIME, Platform, runtime_requirements


@pytest.mark.parametrize("text,expected", [
    ("digits", (None, "digits", None, None)),
    ("digits:1", (None, "digits", "1", None)),
    ("team/digits:v1.2", (None, "team/digits", "v1.2", None)),
    ("127.0.0.1:5000/models/digits:1", ("127.0.0.1:5000", "models/digits", "1", None)),
    ("localhost/digits", ("localhost", "digits", None, None)),
    ("ghcr.io/org/digits@sha256:" + "a" * 64, ("ghcr.io", "org/digits", None, "sha256:" + "a" * 64)),
    ("registry.example.com:443/a/b/c:latest", ("registry.example.com:443", "a/b/c", "latest", None)),
])
def test_reference_parse(text, expected):
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    assert str(ref) == text


@pytest.mark.parametrize("text", ["", "Digits", "digits:", "digits:a b", "-digits", "digits:" + "x" * 129,
                                  "a:b/c", "digits@sha256:abc", "digits@md5:" + "a" * 32, "a..b"])
def test_reference_rejects(text):
    with pytest.raises(UsageError):
        ImageReference.parse(text)


def test_reference_default_tag():
    assert ImageReference.parse("digits", need_tag=True).tag == "latest"


def _members(layer_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer_path.read_bytes()))) as t:
        return t.getmembers()


def test_layer_is_deterministic_and_normalized(tmp_path):
    root = tmp_path / "src"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "b" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "b" / "run.sh", 0o700)
    os.chmod(root / "a.txt", 0o600)
    os.symlink("a.txt", root / "link")
    one = write_layer(tree(root, "/opt/x"), tmp_path / "1.tar.gz", epoch=123)
    # Other mtimes, other creation order: the same bytes.
    os.utime(root / "a.txt", (1, 1))
    copy = tmp_path / "src2"
    (copy / "b").mkdir(parents=True)
    os.symlink("a.txt", copy / "link")
    (copy / "b" / "run.sh").write_text("#!/bin/sh\n")
    (copy / "a.txt").write_text("a")
    os.chmod(copy / "b" / "run.sh", 0o755)
    two = write_layer(tree(copy, "/opt/x"), tmp_path / "2.tar.gz", epoch=123)
    assert (one.digest, one.diff_id) == (two.digest, two.diff_id)
    assert (tmp_path / "1.tar.gz").read_bytes() == (tmp_path / "2.tar.gz").read_bytes()
    members = _members(tmp_path / "1.tar.gz")
    assert [m.name for m in members] == ["opt", "opt/x", "opt/x/a.txt", "opt/x/b", "opt/x/b/run.sh", "opt/x/link"]
    modes = {m.name: m.mode for m in members}
    assert modes["opt/x/a.txt"] == 0o644 and modes["opt/x/b/run.sh"] == 0o755 and modes["opt/x/b"] == 0o755
    assert all(m.mtime == 123 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert [m for m in members if m.issym()][0].linkname == "a.txt"
    three = write_layer(tree(root, "/opt/x"), tmp_path / "3.tar.gz", epoch=124)
    assert three.digest != one.digest


def test_layer_entries_and_owner(tmp_path):
    layer = write_layer([*parents("/a/b/c"), Entry("/a/b/c", "file", 0o644, data=b"hi", uid=10001, gid=10001)],
                        tmp_path / "l.tar.gz")
    members = _members(tmp_path / "l.tar.gz")
    assert [(m.name, m.uid) for m in members] == [("a", 0), ("a/b", 0), ("a/b/c", 10001)]
    assert layer.files == 1 and layer.tar_size % 512 == 0


def test_platform_tags():
    p = Platform((3, 11), (2, 36))
    assert p.platforms[0] == "manylinux_2_36_x86_64" and "manylinux2014_x86_64" in p.platforms
    tags = {str(t) for t in p.tags}
    assert "cp311-cp311-manylinux_2_28_x86_64" in tags and "py3-none-any" in tags and "cp310-abi3-manylinux2014_x86_64" in tags
    assert not any("musllinux" in t or "macosx" in t for t in tags)
    old = Platform((3, 11), (2, 17))
    assert "manylinux_2_28_x86_64" not in old.platforms


@pytest.fixture(scope="module")
def sk_wheel_here(tmp_path_factory):
    from serve_kit.packaging.wheels import build_serve_kit_wheel

    return build_serve_kit_wheel(tmp_path_factory.mktemp("w"), 0)


def test_serve_kit_wheel_is_reproducible(sk_wheel_here, tmp_path):
    from serve_kit.packaging.wheels import build_serve_kit_wheel

    again = build_serve_kit_wheel(tmp_path, 0)
    assert again.read_bytes() == sk_wheel_here.read_bytes()
    with zipfile.ZipFile(again) as z:
        names = z.namelist()
    assert "serve_kit/runtime/server.py" in names and not any("__pycache__" in n for n in names)


def test_runtime_requirements_are_the_runtime_closure(sk_wheel_here):
    import importlib.metadata as md

    pins = dict(runtime_requirements(sk_wheel_here, Platform((3, 11), (2, 36))))
    assert {"onnxruntime", "numpy", "grpcio", "protobuf", "orjson", "httptools", "uvloop", "typer", "pydantic"} <= set(pins)
    assert not (set(pins) & ({"torch", "onnx", "mlflow", "docker", "pytest"} | NOT_IN_RUNTIME))
    assert "serve-kit" not in pins
    assert pins["onnxruntime"] == md.version("onnxruntime")  # the versions optimize validated with
    # uvloop's marker excludes Windows only; on a Windows target it would not be pulled.
    assert "uvloop" in pins


def test_stage_venv_lays_out_a_virtual_environment(sk_wheel_here, tmp_path):
    venv = stage_venv([sk_wheel_here], tmp_path, "/usr/bin/python3.11", (3, 11))
    assert os.readlink(venv / "bin" / "python") == "/usr/bin/python3.11"
    assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text()
    script = (venv / "bin" / "serve-kit").read_text()
    assert script.startswith("#!/opt/serve-kit/venv/bin/python\n")
    assert os.stat(venv / "bin" / "serve-kit").st_mode & 0o111
    site = venv / "lib" / "python3.11" / "site-packages"
    assert (site / "serve_kit" / "runtime" / "server.py").is_file()
    dist = next(site.glob("serve_kit-*.dist-info"))
    assert (dist / "INSTALLER").read_text() == "serve-kit\n" and (dist / "RECORD").is_file()
    assert not list(venv.rglob("*.pyc"))


def test_selection_refuses_unknown_models_and_bad_repositories(tmp_path):
    from serve_kit.packaging.context import select_versions

    with pytest.raises(RepositoryError, match="not found"):
        select_versions(tmp_path / "none", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match="no models"):
        select_versions(tmp_path / "empty", None)


def test_context_dir_is_never_clobbered(tmp_path):
    from serve_kit.packaging.context import ContextDir

    mine = tmp_path / "user-folder"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    with pytest.raises(PackagingError, match="not written by serve-kit"):
        ContextDir(mine)
    c = ContextDir(tmp_path / "ctx")
    (c.tmp / "Dockerfile").write_text("one")
    c.commit()
    c2 = ContextDir(tmp_path / "ctx")  # ours: replaced as a whole, atomically
    (c2.tmp / "Dockerfile").write_text("two")
    c2.commit()
    assert (tmp_path / "ctx" / "Dockerfile").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx", "user-folder"]


def test_sbom_is_reproducible_and_complete(sk_wheel_here, digits_repo):
    from serve_kit.packaging.context import select_versions
    from serve_kit.packaging.sbom import build_sbom
    from serve_kit.packaging.wheels import wheel_info

    sel = select_versions(digits_repo, None)
    kw = dict(image_name="x/digits", image_version="1", base_name="base:1", base_digest="sha256:" + "b" * 64,
              wheels=[wheel_info(sk_wheel_here)], versions=sel.versions, created="1970-01-01T00:00:00Z")
    a, b = build_sbom(**kw), build_sbom(**kw)
    assert a == b and a["serialNumber"].startswith("urn:uuid:")
    assert build_sbom(**{**kw, "image_version": "2"})["serialNumber"] != a["serialNumber"]
    types = [c["type"] for c in a["components"]]
    assert types == ["container", "library", "machine-learning-model"]
    lib = a["components"][1]
    assert lib["purl"] == "pkg:pypi/serve-kit@0.1.0" and len(lib["hashes"][0]["content"]) == 64
    model = a["components"][2]
    manifest = json.loads((digits_repo / "digits" / "1" / "manifest.json").read_text())
    props = {p["name"]: p["value"] for p in model["properties"]}
    for rel, meta in manifest["files"].items():
        assert props[f"serve-kit:file:{rel}:sha256"] == meta["sha256"]
    assert a["dependencies"][0]["dependsOn"] == [c["bom-ref"] for c in a["components"]]


def test_dockerfile_is_hermetic_and_puts_models_last(digits_repo):
    from serve_kit.packaging.context import dockerfile, image_spec, labels, select_versions

    sel = select_versions(digits_repo, None)
    text = dockerfile("base@sha256:" + "c" * 64, image_spec(labels(ImageReference.parse("d:1"), sel, 0, "abc",
                                                                    "base", None)), sel)
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert lines[-1] == "COPY models/ /models/"
    assert "--no-index" in text and "pip install" in text and "USER 10001:10001" in text
    assert 'HEALTHCHECK' in text and "/v2/health/ready" in text and "EXPOSE 8000 8001" in text
    assert '"org.opencontainers.image.revision"="abc"' in text
    assert text.count("FROM base@sha256:") == 2
