"""Fixtures of the client tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_kit import Served  # noqa: E402


@pytest.fixture
def served():
    """Start servers with `served(repo)`; every one is killed at the end of the test."""
    started: list[Served] = []

    def start(repo: Path, *args: str) -> Served:
        s = Served(repo, args=args)
        started.append(s)
        return s

    yield start
    for s in started:
        try:
            s.kill()
        except (subprocess.TimeoutExpired, ValueError):
            pass
