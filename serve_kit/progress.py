"""Progress reporting that the library emits and the CLI renders (Rich bars on stderr).

Library code never imports Rich: it calls `progress.task(...)` and `progress.log(...)` on
whatever sink the caller passed, so tests and `--json` runs stay quiet.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


class ProgressSink:
    """No-op sink; the CLI's subclass draws bars."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def log(self, message: str, style: str = "") -> None:
        pass

    def warn(self, message: str) -> None:
        self.log(message, "bold yellow")
