"""The Docker engine side (docker SDK): reachability, the base image's Python, build, layer sizes,
push, load, and running a container. `docker` is imported only here, only when needed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .errors import PackagingError
from .reference import ImageReference
from .wheels import Platform

_FACTS = ("import json, platform, sys, os; "
          "print(json.dumps({'python_exe': os.path.realpath(sys.executable), 'python': list(sys.version_info[:2]), "
          "'python_full': platform.python_version(), 'libc': platform.libc_ver(), 'machine': platform.machine()}))")


def connect(timeout: float = 10):
    """A docker client when an engine answers (DOCKER_HOST or the default socket), else None."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except (DockerException, OSError, Exception):  # noqa: BLE001 - requests' errors surface unwrapped
        return None


def ensure_image(client, name: str, log=lambda m: None):
    """The engine's image `name`, pulled when missing and the name points at a registry."""
    from docker.errors import APIError, ImageNotFound

    try:
        return client.images.get(name)
    except ImageNotFound:
        pass
    ref = ImageReference.parse(name, "--base", need_tag=True)
    log(f"pulling {ref}")
    try:
        return client.images.pull(str(ref))
    except APIError as e:
        raise PackagingError(f"the base image is not in the engine and could not be pulled: {e.explanation or e}",
                             value=name, origin="--base",
                             hint="build or load it first (scripts/ci-services.sh makes serve-kit/python:3.11-bookworm "
                                  "from Debian packages)") from None


def base_facts(client, image) -> tuple[str, Platform]:
    """The base's interpreter path and wheel platform, asked of the base itself (a throwaway
    container without network)."""
    from docker.errors import APIError, ContainerError

    try:
        out = client.containers.run(image.id, ["-c", _FACTS], entrypoint=["python3"], network_mode="none",
                                    remove=True, stdout=True, stderr=True, user="0")
    except (ContainerError, APIError) as e:
        raise PackagingError(f"the base image cannot run python3: {e}", value=image.tags or image.id, origin="--base",
                             hint="use a Python base image (Debian/Ubuntu-based, python3 on PATH)") from None
    d = json.loads(out.decode().strip().splitlines()[-1])
    lib, ver = d["libc"]
    if lib != "glibc" or not ver:
        raise PackagingError("the base image has no glibc: manylinux wheels cannot run there", value=d["libc"],
                             origin="--base")
    glibc = tuple(int(x) for x in ver.split(".")[:2])
    return d["python_exe"], Platform(tuple(d["python"]), glibc, d["machine"], d["python_full"])


def build(client, context: Path, tag: str, log=lambda m: None) -> Any:
    """Build the context's Dockerfile without network (the wheels are in the context); the image."""
    from docker.errors import APIError, BuildError

    lines: list[str] = []
    try:
        for chunk in client.api.build(path=str(context), tag=tag, rm=True, forcerm=True, network_mode="none",
                                      pull=False, decode=True):
            if "stream" in chunk:
                text = chunk["stream"].rstrip()
                if text:
                    lines.append(text)
                    if text.startswith("Step "):
                        first = text.splitlines()[0]
                        log(first if len(first) <= 120 else first[:117] + "...")
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise PackagingError("the image build failed: " + detail.strip(), origin=str(context / "Dockerfile"),
                                     hint="last build output: " + " | ".join(lines[-5:]))
    except (APIError, BuildError) as e:
        raise PackagingError(f"the image build failed: {e}", origin=str(context / "Dockerfile")) from None
    return client.images.get(tag)


def layer_report(client, image, base) -> dict:
    """Per-layer sizes (uncompressed, as `docker history` shows them), the base's total and the total
    over the base."""
    hist = list(reversed(client.api.history(image.id)))  # oldest first
    base_hist = client.api.history(base.id)
    ours = hist[len(base_hist):]
    layers = [{"created_by": h.get("CreatedBy", ""), "size": int(h.get("Size", 0))} for h in ours]
    return {"base_size": int(base.attrs.get("Size", 0)), "layers": layers,
            "size_over_base": sum(x["size"] for x in layers), "size": int(image.attrs.get("Size", 0))}


def push(client, ref: ImageReference, log=lambda m: None) -> str:
    """docker push; the digest the registry stored the manifest under."""
    from docker.errors import APIError

    digest = None
    try:
        for chunk in client.images.push(ref.name, tag=ref.tag, stream=True, decode=True):
            if "error" in chunk:
                raise PackagingError("push failed: " + (chunk.get("errorDetail", {}).get("message") or chunk["error"]),
                                     value=str(ref), origin="--push")
            aux = chunk.get("aux") or {}
            if aux.get("Digest"):
                digest = aux["Digest"]
    except APIError as e:
        raise PackagingError(f"push failed: {e.explanation or e}", value=str(ref), origin="--push") from None
    if not digest:
        raise PackagingError("the engine reported no digest for the push", value=str(ref), origin="--push")
    return digest


def load(client, archive: Path):
    """docker load an image archive; the loaded image."""
    from docker.errors import APIError

    try:
        with open(archive, "rb") as f:
            images = client.images.load(f)  # streamed: an image archive is hundreds of MB
    except APIError as e:
        raise PackagingError(f"docker load failed: {e.explanation or e}", value=str(archive)) from None
    if not images:
        raise PackagingError("docker load gave no image", value=str(archive))
    return images[0]


def wait_health(container, timeout: float) -> str:
    """Poll Docker's health status until healthy/unhealthy or the deadline; returns the last status."""
    deadline = time.monotonic() + timeout
    status = "starting"
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs.get("State", {})
        if state.get("Status") in ("exited", "dead"):
            return "exited"
        status = (state.get("Health") or {}).get("Status", "none")
        if status in ("healthy", "unhealthy", "none"):
            return status
        time.sleep(0.5)
    return status


def host_port(container, port: int) -> int:
    container.reload()
    bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp") or []
    for b in bindings:
        if b.get("HostIp") in ("127.0.0.1", "0.0.0.0", ""):
            return int(b["HostPort"])
    raise PackagingError(f"the container's port {port} is not published", value=container.short_id)

