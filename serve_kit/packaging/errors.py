"""Errors of `serve-kit package`, in the ServeKitError tree (one red line, exit 1 unless noted)."""

from __future__ import annotations

from ..errors import GateFailed, ServeKitError


class PackagingError(ServeKitError):
    """A build, push, registry or engine step failed for a reason the user can act on."""


class SmokeTestFailed(GateFailed):
    """The built image did not answer its model's evaluation samples as the repository's reference
    did (exit 3, like every failed quality gate); nothing was pushed or registered."""
