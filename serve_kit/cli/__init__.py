"""The `serve-kit` command line. Commands are thin: flags -> typed config -> library call -> render.

Exit codes: 0 ok, 1 error, 2 usage, 3 a quality gate failed, 130 interrupted (see errors.py).
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.2x vendors its own click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as _click_errors

from .. import __version__
from ..errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, ServeKitError
from ._common import emit_json, err, state

app = typer.Typer(
    name="serve-kit",
    help="Take a trained model to production: optimize (verified export and quantization), inspect, "
         "and (soon) bench, package, serve.\n\nExit codes: 0 ok, 1 error, 2 usage, 3 quality gate failed, "
         "130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"serve-kit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout (progress stays on stderr)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    state.json = json_output


def _register() -> None:
    from . import bench, inspect, optimize, package, recipes, rollout, serve  # noqa: F401 - each module adds its command to `app`


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps errors to exit codes (see the module docstring)."""
    _quiet_libraries()
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="serve-kit", standalone_mode=False)
        if rc == EXIT_INTERRUPTED:  # Typer turns Ctrl-C into Exit(130) and returns its code
            _interrupted()
        sys.exit(rc if isinstance(rc, int) else 0)
    except ServeKitError as e:
        if state.json and not state.emitted:
            emit_json(e.to_dict())
        err.print(f"[bold red]error:[/] [red]{_escape(e.render())}[/]", soft_wrap=True)
        sys.exit(e.exit_code)
    except (typer.Exit, getattr(_click_errors, "Exit", typer.Exit)) as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # Typer turns Ctrl-C into Exit(130)
            _interrupted()
        sys.exit(e.exit_code)
    except _click_errors.UsageError as e:
        e.show()
        sys.exit(EXIT_USAGE)
    except _click_errors.ClickException as e:
        e.show()
        sys.exit(EXIT_ERROR)
    except (KeyboardInterrupt, typer.Abort, getattr(_click_errors, "Abort", typer.Abort)):
        _interrupted()


def _interrupted() -> None:
    err.print("[bold red]interrupted[/]: nothing half-written was left behind")
    sys.exit(EXIT_INTERRUPTED)


def _quiet_libraries() -> None:
    """torch, ONNX Runtime's quantizers and onnxscript log advice meant for their own developers;
    serve-kit reports what matters itself (in the table and report.json)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    logging.getLogger().setLevel(logging.ERROR)
    for name in ("torch", "onnxscript", "onnx_ir", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("torch", "onnxruntime", "onnxscript", "onnx_ir", "transformers", "sklearn"):
        warnings.filterwarnings("ignore", module=module)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
