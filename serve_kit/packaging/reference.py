"""Image references (`[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`), parsed and checked by the grammar of
the Distribution project (github.com/distribution/reference), which every registry and engine uses.

A reference is checked before anything is built or pushed: a malformed tag must never cost a build
nor leave half of an image in a registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

# distribution/reference's grammar, spelled out.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$")
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")

DEFAULT_REGISTRY = "docker.io"


def _looks_like_registry(component: str) -> bool:
    # The rule Docker applies: the first component is a registry when it has a dot or a port, or is
    # localhost; otherwise "a/b" is a repository on Docker Hub.
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference. `registry` is None for a name without one (an engine-local name,
    or Docker Hub when pushed)."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, origin: str = "--tag", *, need_tag: bool = False) -> "ImageReference":
        text = (text or "").strip()
        m = _REFERENCE.match(text)
        if not m or len(m.group("path")) + len(m.group("domain") or "") + 1 > 255:
            raise UsageError("not a valid image reference", value=text, origin=origin,
                             hint="use [REGISTRY/]NAME[:TAG], lowercase name components, e.g. "
                                  "127.0.0.1:5000/models/digits:1 (tags: letters, digits, '_', '.', '-')")
        domain, path = m.group("domain"), m.group("path")
        if domain and not _looks_like_registry(domain):
            # "team/model" parsed the first component as a domain; Docker's rule makes it a path.
            if not re.fullmatch(_PATH_COMPONENT, domain):
                raise UsageError("not a valid image reference", value=text, origin=origin,
                                 hint="repository name components are lowercase letters, digits and . _ -")
            path, domain = f"{domain}/{path}", None
        digest = m.group("digest")
        if digest and not _SHA256.match(digest):
            raise UsageError("only sha256 digests are supported", value=digest, origin=origin)
        ref = cls(domain, path, m.group("tag"), digest)
        if need_tag and ref.tag is None and ref.digest is None:
            ref = cls(domain, path, "latest", None)
        return ref

    @property
    def name(self) -> str:
        """REGISTRY/REPOSITORY (or REPOSITORY), without tag or digest."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def with_tag(self, tag: str | None) -> "ImageReference":
        return ImageReference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> "ImageReference":
        return ImageReference(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s
