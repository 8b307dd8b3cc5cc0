"""The daemonless builder's image side: a base image read from a registry or an OCI layout, new layers
appended, the image config and manifest written, and the result pushed to a registry or written as
an archive that `docker load` accepts (an OCI layout with Docker's manifest.json beside index.json).

Every JSON document is written with sorted keys and no whitespace, so the same inputs give the same
digests.
"""

from __future__ import annotations

import copy
import datetime as _dt
import gzip
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PackagingError
from .layers import Layer
from .reference import ImageReference
from .registry import (INDEX_TYPES, MANIFEST_TYPES, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST,
                       TO_OCI_LAYER, Descriptor, Registry, cached_blob, copy_or_link, sha256_bytes)
from .wheels import Platform, cache_dir

_MACHINES = {"amd64": "x86_64", "arm64": "aarch64", "ppc64le": "ppc64le", "s390x": "s390x"}
LAYOUT_PREFIX = "oci:"


def dumps(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def iso(epoch: int) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class BaseImage:
    """A base image's manifest, config and layer descriptors, and where its blobs come from."""

    name: str
    manifest_digest: str
    config: dict
    layers: list[Descriptor]
    registry: Registry | None = None
    repo: str | None = None
    layout: Path | None = None

    def blob(self, digest: str) -> Path:
        """A local file holding the blob: the layout's, or the cache's (fetched once)."""
        if self.layout is not None:
            path = self.layout / "blobs" / digest.replace(":", "/")
            if not path.is_file():
                raise PackagingError("the OCI layout lacks a blob its manifest names", value=digest,
                                     origin=str(self.layout))
            return path
        path = cached_blob(digest)
        if not path.is_file():
            self.registry.fetch_blob(self.repo, digest, path)
        return path

    @property
    def architecture(self) -> str:
        return self.config.get("architecture", "amd64")


def resolve_base(text: str, plain_http: bool | None = None, architecture: str = "amd64") -> BaseImage:
    """`REGISTRY/NAME[:TAG|@DIGEST]` (read through the distribution API) or `oci:DIR[:TAG]`."""
    if text.startswith(LAYOUT_PREFIX):
        return _from_layout(text, architecture)
    ref = ImageReference.parse(text, "--base", need_tag=True)
    if ref.registry is None:
        raise PackagingError("the daemonless builder reads its base image from a registry or an OCI layout, "
                             "and this base names neither", value=text, origin="--base",
                             hint="e.g. --base 127.0.0.1:5000/serve-kit/python:3.11-bookworm, or oci:DIR[:TAG] "
                                  "(engine-local image names need the Docker engine builder)")
    registry = Registry(ref.registry, plain_http)
    body, media, digest = registry.get_manifest(ref.repository, ref.digest or ref.tag)
    if media in INDEX_TYPES:
        chosen = _pick_platform(json.loads(body), architecture, text)
        body, media, digest = registry.get_manifest(ref.repository, chosen)
    if media not in MANIFEST_TYPES:
        raise PackagingError("the base is not an image manifest", value=media, origin=text)
    manifest = json.loads(body)
    cfg_digest = manifest["config"]["digest"]
    cfg_path = cached_blob(cfg_digest)
    if not cfg_path.is_file():
        registry.fetch_blob(ref.repository, cfg_digest, cfg_path)
    layers = [Descriptor(x["mediaType"], x["digest"], x["size"]) for x in manifest["layers"]]
    return BaseImage(text, digest, json.loads(cfg_path.read_bytes()), layers, registry, ref.repository)


def _pick_platform(index: dict, architecture: str, origin: str) -> str:
    for m in index.get("manifests", []):
        p = m.get("platform", {})
        if p.get("os") == "linux" and p.get("architecture") == architecture:
            return m["digest"]
    raise PackagingError(f"the base image has no linux/{architecture} variant", origin=origin)


def _from_layout(text: str, architecture: str) -> BaseImage:
    spec = text[len(LAYOUT_PREFIX):]
    path, tag = spec, None
    if not Path(spec).is_dir() and ":" in spec:
        path, tag = spec.rsplit(":", 1)
    layout = Path(path)
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise PackagingError(f"not an OCI image layout: {e}", value=str(layout), origin="--base") from None
    manifests = index.get("manifests", [])
    if tag is not None:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag]
    if len(manifests) != 1:
        raise PackagingError("the OCI layout must hold exactly one image" + (f" tagged {tag!r}" if tag else ""),
                             value=str(layout), origin="--base", hint="name one with oci:DIR:TAG")
    desc = manifests[0]
    body = (layout / "blobs" / desc["digest"].replace(":", "/")).read_bytes()
    if desc.get("mediaType") in INDEX_TYPES:
        digest = _pick_platform(json.loads(body), architecture, text)
        body = (layout / "blobs" / digest.replace(":", "/")).read_bytes()
    manifest = json.loads(body)
    config = json.loads((layout / "blobs" / manifest["config"]["digest"].replace(":", "/")).read_bytes())
    layers = [Descriptor(x["mediaType"], x["digest"], x["size"]) for x in manifest["layers"]]
    return BaseImage(text, sha256_bytes(body), config, layers, layout=layout)


# ---------------------------------------------------------------------------------------------
# What Python the base has (read from its layers, never by running it)

_PYTHON = re.compile(r"^(usr/local/bin|usr/bin)/python3\.(\d+)$")
_LIBC = re.compile(r"^(usr/)?lib(64)?/([a-z0-9_]+-linux-gnu/)?libc\.so\.6$")


@dataclass(frozen=True)
class BaseFacts:
    python_exe: str
    platform: Platform

    def to_dict(self) -> dict:
        return {"python_exe": self.python_exe, "python": list(self.platform.python),
                "glibc": list(self.platform.glibc), "machine": self.platform.machine}


def base_facts(base: BaseImage) -> BaseFacts:
    """The interpreter path and the wheel platform of the base, from a scan of its layers (cached by
    the base's manifest digest)."""
    cache = cache_dir() / "base-facts" / (base.manifest_digest.replace(":", "-") + ".json")
    if cache.is_file():
        d = json.loads(cache.read_text())
        return BaseFacts(d["python_exe"], Platform(tuple(d["python"]), tuple(d["glibc"]), d["machine"]))
    pythons: dict[str, tuple[int, int]] = {}
    glibc: tuple[int, int] | None = None
    for desc in base.layers:
        path = base.blob(desc.digest)
        opener = gzip.open if "gzip" in desc.media_type else open
        with opener(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                name = member.name.lstrip("./").lstrip("/")
                folder, _, leaf = name.rpartition("/")
                if leaf.startswith(".wh."):
                    pythons.pop(f"{folder}/{leaf[4:]}", None)
                    continue
                m = _PYTHON.match(name)
                if m and (member.isfile() or member.issym() or member.islnk()):
                    pythons[name] = (3, int(m.group(2)))
                elif _LIBC.match(name) and member.isfile():
                    data = tar.extractfile(member).read()
                    found = [int(x) for x in re.findall(rb"GLIBC_2\.(\d+)", data)]
                    if found:
                        glibc = (2, max(found))
    if not pythons:
        raise PackagingError("the base image has no python3.N in /usr/bin or /usr/local/bin", value=base.name,
                             origin="--base", hint="use a Python base image (e.g. python:3.11-slim)")
    if glibc is None:
        raise PackagingError("the base image has no glibc (libc.so.6): manylinux wheels cannot run there",
                             value=base.name, origin="--base", hint="use a Debian/Ubuntu-based Python image")
    exe = sorted(pythons, key=lambda p: (not p.startswith("usr/local/"), p))[0]
    machine = _MACHINES.get(base.architecture, base.architecture)
    facts = BaseFacts("/" + exe, Platform(pythons[exe], glibc, machine))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(facts.to_dict()))
    return facts


# ---------------------------------------------------------------------------------------------
# The new image

@dataclass
class ImageSpec:
    """What the image runs and says about itself (the Dockerfile's ENV/USER/EXPOSE/LABEL/... lines)."""

    env: dict[str, str]
    user: str
    entrypoint: list[str]
    exposed_ports: list[int]
    labels: dict[str, str]
    healthcheck: dict
    workdir: str = "/"
    stop_signal: str = "SIGTERM"


@dataclass
class BuiltImage:
    base: BaseImage
    layers: list[Layer]
    config_bytes: bytes
    manifest_bytes: bytes
    annotations: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_bytes(self.manifest_bytes)

    @property
    def config_digest(self) -> str:
        return sha256_bytes(self.config_bytes)

    @property
    def image_id(self) -> str:
        """What `docker images` shows as the ID (the config's digest)."""
        return self.config_digest

    # -- outputs -------------------------------------------------------------------------------
    def push(self, ref: ImageReference, plain_http: bool | None = None, log=lambda m: None) -> str:
        """Push the blobs (mounting the base's from its repository when it lives on the same registry),
        then the manifest: a failure before the last step leaves no tag behind."""
        registry = Registry(ref.registry, plain_http)
        registry.ping()
        repo = ref.repository
        same = self.base.registry is not None and self.base.registry.host == registry.host
        for desc in self.base.layers:
            if registry.blob_exists(repo, desc.digest):
                continue
            if same and registry.mount_blob(repo, desc.digest, self.base.repo):
                continue
            log(f"uploading base layer {desc.digest[:19]} ({desc.size / 1e6:.1f} MB)")
            registry.upload_blob(repo, self.base.blob(desc.digest), desc.digest)
        for layer in self.layers:
            if not registry.blob_exists(repo, layer.digest):
                log(f"uploading layer {layer.digest[:19]} ({layer.size / 1e6:.1f} MB): {layer.created_by}")
                registry.upload_blob(repo, layer.path, layer.digest)
        with tempfile.NamedTemporaryFile(prefix="serve-kit-config-") as tmp:
            tmp.write(self.config_bytes)
            tmp.flush()
            if not registry.blob_exists(repo, self.config_digest):
                registry.upload_blob(repo, Path(tmp.name), self.config_digest)
        return registry.put_manifest(repo, ref.tag or self.digest, self.manifest_bytes, OCI_MANIFEST)

    def write_archive(self, path: Path, ref: ImageReference | None, epoch: int = 0) -> Path:
        """An OCI image layout as one tar, with Docker's `manifest.json` too, so that both OCI tools and
        `docker load` (which reads manifest.json and the gzip'd layers) accept it. Written to a temporary
        name and renamed: no half-written archive is ever left under `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        layer_files = [(d.digest, self.base.blob(d.digest)) for d in self.base.layers]
        layer_files += [(x.digest, x.path) for x in self.layers]
        annotations = {}
        repo_tags = []
        if ref is not None:
            annotations["org.opencontainers.image.ref.name"] = ref.tag or "latest"
            annotations["io.containerd.image.name"] = str(ref.with_tag(ref.tag or "latest"))
            repo_tags = [str(ref.with_tag(ref.tag or "latest"))]
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                 "manifests": [{"mediaType": OCI_MANIFEST, "digest": self.digest, "size": len(self.manifest_bytes),
                                **({"annotations": annotations} if annotations else {})}]}
        docker_manifest = [{"Config": "blobs/" + self.config_digest.replace(":", "/"), "RepoTags": repo_tags,
                            "Layers": ["blobs/" + d.replace(":", "/") for d, _ in layer_files]}]
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                def add(name: str, data: bytes | None = None, source: Path | None = None, kind=tarfile.REGTYPE):
                    info = tarfile.TarInfo(name)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "", ""
                    info.type = kind
                    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
                    if kind == tarfile.DIRTYPE:
                        tar.addfile(info)
                    elif data is not None:
                        info.size = len(data)
                        tar.addfile(info, _bytes_io(data))
                    else:
                        info.size = source.stat().st_size
                        with open(source, "rb") as f:
                            tar.addfile(info, f)

                add("blobs/", kind=tarfile.DIRTYPE)
                add("blobs/sha256/", kind=tarfile.DIRTYPE)
                blobs = {self.config_digest: self.config_bytes, self.digest: self.manifest_bytes}
                for digest, data in sorted(blobs.items()):
                    add("blobs/" + digest.replace(":", "/"), data=data)
                seen = set(blobs)
                for digest, src in layer_files:
                    if digest not in seen:
                        seen.add(digest)
                        add("blobs/" + digest.replace(":", "/"), source=src)
                add("index.json", data=dumps(index))
                add("manifest.json", data=json.dumps(docker_manifest, separators=(",", ":")).encode())
                add("oci-layout", data=dumps({"imageLayoutVersion": "1.0.0"}))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def write_layout(self, folder: Path) -> None:
        """The same as an OCI layout folder (another builder's `oci:DIR` base)."""
        blobs = folder / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        for digest, data in ((self.config_digest, self.config_bytes), (self.digest, self.manifest_bytes)):
            (blobs / digest.split(":")[1]).write_bytes(data)
        for d in self.base.layers:
            copy_or_link(self.base.blob(d.digest), blobs / d.digest.split(":")[1])
        for x in self.layers:
            copy_or_link(x.path, blobs / x.digest.split(":")[1])
        (folder / "oci-layout").write_bytes(dumps({"imageLayoutVersion": "1.0.0"}))
        (folder / "index.json").write_bytes(dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": self.digest, "size": len(self.manifest_bytes)}]}))


def _bytes_io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def assemble(base: BaseImage, layers: list[Layer], spec: ImageSpec, epoch: int) -> BuiltImage:
    """The image config (the base's, with the new layers, settings and history) and its manifest."""
    config = copy.deepcopy(base.config)
    for stale in ("container", "container_config", "docker_version", "id", "parent"):
        config.pop(stale, None)
    created = iso(epoch)
    config["created"] = created
    config.setdefault("os", "linux")
    config.setdefault("architecture", "amd64")
    c = dict(config.get("config") or {})
    env = {}
    for item in c.get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    env.update(spec.env)
    c.update({
        "Env": [f"{k}={v}" for k, v in env.items()],
        "User": spec.user,
        "Entrypoint": list(spec.entrypoint),
        "Cmd": None,  # as Docker does when a Dockerfile sets ENTRYPOINT: the base's CMD would become arguments
        "ExposedPorts": {f"{p}/tcp": {} for p in spec.exposed_ports},
        "Labels": dict(sorted({**(c.get("Labels") or {}), **spec.labels}.items())),
        "Healthcheck": spec.healthcheck,
        "WorkingDir": spec.workdir,
        "StopSignal": spec.stop_signal,
    })
    config["config"] = c
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    if len(rootfs.get("diff_ids", [])) != len(base.layers):
        raise PackagingError("the base image's config and manifest disagree on its layers", origin=base.name)
    rootfs["diff_ids"] = [*rootfs["diff_ids"], *[x.diff_id for x in layers]]
    history = list(config.get("history") or [])
    history += [{"created": created, "created_by": x.created_by, "comment": "serve-kit daemonless builder"}
                for x in layers]
    config["history"] = history
    config_bytes = dumps(config)
    annotations = {"org.opencontainers.image.base.name": base.name,
                   "org.opencontainers.image.base.digest": base.manifest_digest,
                   "org.opencontainers.image.created": created}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256_bytes(config_bytes), "size": len(config_bytes)},
        "layers": [*[{"mediaType": TO_OCI_LAYER.get(d.media_type, d.media_type), "digest": d.digest, "size": d.size}
                     for d in base.layers],
                   *[{"mediaType": OCI_LAYER_GZIP, "digest": x.digest, "size": x.size} for x in layers]],
        "annotations": annotations,
    }
    return BuiltImage(base, layers, config_bytes, dumps(manifest), annotations)

