"""A small client of the OCI distribution API (the registry HTTP API v2): what the daemonless builder
needs to read a base image and push an image. Standard library only.

Pushing is ordered so that a failure never leaves a half-pushed image: every blob is uploaded (or
mounted, or found already there) first, and the manifest, which is what makes a tag point at an
image, goes last. Blobs left by a failed push are unreferenced and the registry's garbage collection
removes them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import PackagingError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
#: Docker's layer media types and their OCI equivalents (the same bytes).
TO_OCI_LAYER = {DOCKER_LAYER_GZIP: OCI_LAYER_GZIP, "application/vnd.docker.image.rootfs.diff.tar": OCI_LAYER_TAR}


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def is_local_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0].strip("[]") if not host.startswith("[") else host[1:host.index("]")]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Registry:
    """One registry host. Plain HTTP for loopback hosts (as Docker does), HTTPS otherwise unless
    `plain_http`. Anonymous access, with the bearer-token handshake public registries ask for."""

    def __init__(self, host: str, plain_http: bool | None = None, timeout: float = 30):
        self.host = host
        self.plain_http = is_local_host(host) if plain_http is None else plain_http
        self.base = f"{'http' if self.plain_http else 'https'}://{host}"
        self.timeout = timeout
        self._token: str | None = None

    # -- HTTP ----------------------------------------------------------------------------------
    def _open(self, method: str, url: str, data=None, headers: dict | None = None, length: int | None = None):
        headers = dict(headers or {})
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if length is not None:
            headers["Content-Length"] = str(length)
        req = urllib.request.Request(url if url.startswith("http") else self.base + url, data=data,
                                     headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 401 and self._token is None and self._authenticate(e.headers.get("WWW-Authenticate", "")):
                if hasattr(data, "seek"):
                    data.seek(0)
                return self._open(method, url, data, headers, length)
            raise
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PackagingError(f"cannot reach the registry {self.host}: {reason}", value=self.host,
                                 origin=url if url.startswith("http") else self.base + url,
                                 hint="is the registry running and the address right? (plain HTTP is used for "
                                      "loopback addresses only; see --plain-http)") from None

    def _authenticate(self, challenge: str) -> bool:
        """Anonymous bearer token (what a public registry hands out for pulls)."""
        if not challenge.lower().startswith("bearer "):
            return False
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if "realm" not in params:
            return False
        query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
        try:
            with urllib.request.urlopen(f"{params['realm']}?{query}", timeout=self.timeout) as r:
                doc = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        self._token = doc.get("token") or doc.get("access_token")
        return bool(self._token)

    def _error(self, e: urllib.error.HTTPError, what: str) -> PackagingError:
        try:
            body = json.loads(e.read() or b"{}")
            detail = "; ".join(f"{x.get('code')}: {x.get('message')}" for x in body.get("errors", []))
        except (ValueError, AttributeError):
            detail = ""
        hint = None
        if e.code in (401, 403):
            hint = "this registry needs credentials; serve-kit's builder pushes anonymously (use the Docker " \
                   "engine builder, which uses `docker login`)"
        return PackagingError(f"registry {self.host}: {what} failed with HTTP {e.code}"
                              + (f" ({detail})" if detail else ""), origin=self.base, hint=hint)

    # -- API -----------------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise a PackagingError unless the registry answers its API root."""
        try:
            with self._open("GET", "/v2/"):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 401:  # 401 without a token service still proves a registry is there
                raise self._error(e, "GET /v2/") from None

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index."""
        accept = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
        try:
            with self._open("GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": accept}) as r:
                body = r.read()
                media = r.headers.get("Content-Type", "").split(";")[0].strip()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise PackagingError(f"image not found in registry {self.host}", value=f"{repo}:{reference}"
                                     if not reference.startswith("sha256:") else f"{repo}@{reference}",
                                     origin=self.base) from None
            raise self._error(e, f"GET manifest {repo}:{reference}") from None
        digest = sha256_bytes(body)
        if reference.startswith("sha256:") and digest != reference:
            raise PackagingError("the registry sent a manifest whose digest is not the one asked for",
                                 value=digest, origin=f"{self.base}/v2/{repo}/manifests/{reference}")
        if not media:
            media = json.loads(body).get("mediaType", "")
        return body, media, digest

    def blob_exists(self, repo: str, digest: str) -> bool:
        try:
            with self._open("HEAD", f"/v2/{repo}/blobs/{digest}"):
                return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise self._error(e, f"HEAD blob {digest}") from None

    def fetch_blob(self, repo: str, digest: str, dest: Path) -> Path:
        """Download a blob to `dest`, checking its digest (written to a temporary name first)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=dest.parent)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f, self._open("GET", f"/v2/{repo}/blobs/{digest}") as r:
                while block := r.read(1 << 20):
                    h.update(block)
                    f.write(block)
            if "sha256:" + h.hexdigest() != digest:
                raise PackagingError("a blob from the registry does not match its digest", value=digest,
                                     origin=f"{self.base}/v2/{repo}")
            os.replace(tmp, dest)
        except urllib.error.HTTPError as e:
            raise self._error(e, f"GET blob {digest}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount (no data sent); False when the registry would rather have an upload."""
        query = urllib.parse.urlencode({"mount": digest, "from": from_repo})
        try:
            with self._open("POST", f"/v2/{repo}/blobs/uploads/?{query}", data=b"", length=0) as r:
                if r.status == 201:
                    return True
                location = r.headers.get("Location")
        except urllib.error.HTTPError as e:
            raise self._error(e, f"mount blob {digest}") from None
        if location:  # an upload session was opened instead: cancel it
            try:
                self._open("DELETE", self._absolute(location)).close()
            except (urllib.error.HTTPError, PackagingError):
                pass
        return False

    def _absolute(self, location: str) -> str:
        return urllib.parse.urljoin(self.base + "/", location)

    def upload_blob(self, repo: str, path: Path, digest: str) -> None:
        """Monolithic upload: POST opens a session, one PUT sends the data with its digest."""
        try:
            with self._open("POST", f"/v2/{repo}/blobs/uploads/", data=b"", length=0) as r:
                location = r.headers["Location"]
            url = self._absolute(location)
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
            size = path.stat().st_size
            with open(path, "rb") as f, self._open("PUT", url, data=f, length=size,
                                                    headers={"Content-Type": "application/octet-stream"}) as r:
                if r.status not in (201, 204):
                    raise PackagingError(f"registry {self.host}: blob upload answered HTTP {r.status}",
                                         value=digest)
        except urllib.error.HTTPError as e:
            raise self._error(e, f"upload blob {digest}") from None

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        try:
            with self._open("PUT", f"/v2/{repo}/manifests/{reference}", data=body, length=len(body),
                            headers={"Content-Type": media_type}) as r:
                digest = r.headers.get("Docker-Content-Digest") or sha256_bytes(body)
        except urllib.error.HTTPError as e:
            raise self._error(e, f"PUT manifest {repo}:{reference}") from None
        if digest != sha256_bytes(body):
            raise PackagingError("the registry stored the manifest under another digest", value=digest,
                                 origin=self.base)
        return digest


# ---------------------------------------------------------------------------------------------
# A local blob cache (base layers fetched once)

def blob_cache() -> Path:
    from .wheels import cache_dir

    return cache_dir() / "blobs"


def cached_blob(digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return blob_cache() / algo / hexd


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_dict(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def copy_or_link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
