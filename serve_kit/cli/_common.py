"""What every command shares: the consoles, `--json` state, Rich progress, and error rendering."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Iterator

from rich.console import Console

from ..progress import ProgressSink

# Human output goes to stdout; progress, warnings and errors to stderr so that `--json` stdout
# stays machine-readable.
# Off a terminal (CI logs, pipes) Rich would wrap tables at 80 columns; logs have room.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


class State:
    json: bool = False
    emitted: bool = False
    """A JSON document is already on stdout (an error then goes to stderr only: one document)."""


state = State()


def emit_json(data: Any) -> None:
    state.emitted = True
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def run_with_progress(run: Any, job: Any) -> Any:
    """Run a library job (`run(job, progress)`) with progress bars on stderr, silent under --json."""
    with RichProgress(quiet=state.json) as progress:
        return run(job, progress)


def show(result: Any, render: Any) -> None:
    """Print a command's result: JSON on stdout under --json, else its Rich rendering."""
    if state.json:
        emit_json(result)
    else:
        render(result)


class RichProgress(ProgressSink):
    """Progress bars on stderr for anything that takes a while; silent under `--json`."""

    def __init__(self, quiet: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=False, disable=quiet)

    def __enter__(self) -> "RichProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        tid = self.bar.add_task(description, total=total)
        try:
            yield lambda n=1: self.bar.advance(tid, n)
        finally:
            t = self.bar.tasks[[t.id for t in self.bar.tasks].index(tid)]
            self.bar.update(tid, total=t.total if t.total is not None else 1,
                            completed=t.total if t.total is not None else 1)

    def log(self, message: str, style: str = "") -> None:
        if style.startswith("bold yellow"):  # warnings show even under --json (on stderr)
            err.print(f"[{style}]{message}[/]" if style else message)
        elif not self.quiet:
            self.bar.console.print(f"[{style}]{message}[/]" if style else message, highlight=False)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
