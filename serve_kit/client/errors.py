"""The client's exceptions. Every message names the URL (or the model) and the status, so a log
line alone says which replica answered what."""

from __future__ import annotations

from ..errors import ServeKitError


class ClientError(ServeKitError):
    """Base of every error the resilient client raises. `url`: the replica it concerns (or None)."""

    def __init__(self, message: str, *, url: str | None = None, hint: str | None = None):
        super().__init__(message, origin=url, hint=hint)
        self.url = url


class ServerError(ClientError):
    """The server answered an error. `status` is the HTTP status (a gRPC code is mapped to its HTTP
    equivalent, its name kept in `code`); `retry_after` the server's advice in seconds, if any."""

    def __init__(self, status: int, message: str, *, url: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{url}: {status}{f' {code}' if code else ''}: {message}", url=url)
        self.status, self.server_message, self.code, self.retry_after = status, message, code, retry_after


class ConnectionFailed(ClientError):
    """The request never got an answer: connection refused or reset, EOF before the response, or a
    per-try timeout. Always safe to retry (the Idempotency-Key makes the server run it once)."""


class DeadlineExceeded(ClientError):
    """The call's deadline passed before any attempt succeeded; `last` is the last attempt's error."""

    def __init__(self, message: str, *, url: str | None = None, last: BaseException | None = None):
        super().__init__(message, url=url)
        self.last = last


class NoReplicaAvailable(ClientError):
    """Every replica is ejected (or the call's circuit breaker is open): nothing to send to."""


class CircuitOpen(NoReplicaAvailable):
    """The client-side circuit breaker of this endpoint is open: the call is refused at once.
    `retry_after`: seconds left of the cool-down."""

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after
