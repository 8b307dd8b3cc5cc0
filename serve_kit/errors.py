"""The ServeKitError tree.

A ServeKitError is the user's problem (bad input, a failed quality gate): the CLI prints one red
message naming the bad value, where it came from and a hint, and exits with the error's code,
without a traceback. Any other exception is a bug in serve-kit and is shown with its traceback.

Exit codes (documented in the README; CI pipelines rely on them):
    0  success
    1  error (bad input, missing file, failed conversion)
    2  usage error (unknown flag, malformed flag value)
    3  a quality gate failed (accuracy, latency)
  130  interrupted (Ctrl-C); nothing half-written is left behind
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130


class ServeKitError(Exception):
    """A user-facing error: what was wrong, where it came from, and what to do about it."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, value: object = None, origin: str | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.value = value
        self.origin = origin
        self.hint = hint

    def render(self) -> str:
        """One human line (plus origin and hint), the text the CLI prints in red."""
        parts = [self.message]
        if self.value is not None and repr(self.value) not in self.message and str(self.value) not in self.message:
            parts[0] += f": {self.value!r}"
        if self.origin:
            parts.append(f"(from {self.origin})")
        text = " ".join(parts)
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "value": None if self.value is None else str(self.value),
            "origin": self.origin,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


class UsageError(ServeKitError):
    """A flag or argument is malformed or contradicts another."""

    exit_code = EXIT_USAGE


class InputError(ServeKitError):
    """A file, model, data set or config that the user gave us is missing or wrong."""


class ConfigError(InputError):
    """A config.yaml or recipe failed validation; `origin` names the file and the field path."""


class ModelLoadError(InputError):
    """A model file could not be loaded (missing, corrupt, or an unsafe pickle)."""


class DataError(InputError):
    """Calibration or evaluation data do not fit the model's input signature."""


class RepositoryError(InputError):
    """A model repository is malformed or fails verification (hash mismatch, missing file)."""


class ConversionError(ServeKitError):
    """An export or quantization step failed for a reason the user can act on."""


class TargetUnavailable(ServeKitError):
    """A target cannot run here (missing package or hardware, or the source kind does not allow it)."""


class TargetNotApplicable(ServeKitError):
    """A target does not apply to this model (no op it quantizes, weights that are not constants,
    a graph it cannot handle): reported as `not applicable` with the cause; it fails the run only
    under `--strict`."""


class GateFailed(ServeKitError):
    """A quality gate was missed; nothing failing the gate was written."""

    exit_code = EXIT_GATE


class TargetError(ConversionError):
    """An exception from a library a target drives (ONNX Runtime's quantizer, onnx, Model
    Optimizer) during a build: the message names the library and its own first line, so that the
    target's row says what failed without a traceback of someone else's code."""

    @classmethod
    def wrap(cls, library: str, step: str, exc: BaseException, *, value: object = None,
             hint: str | None = None) -> "TargetError":
        text = str(exc).strip()
        line = text.splitlines()[0][:300] if text else type(exc).__name__
        return cls(f"{step} failed in {library}: {type(exc).__name__}: {line}", value=value, hint=hint)
