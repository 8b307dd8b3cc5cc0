"""The runtime's shared request/response types and errors.

The request path is: frontend (http.py / grpc.py decode with protocol.py) -> router (which model
and version; models.ModelManager) -> scheduler (batcher.py: batching, queue policy) -> backend
instance (backends/). Each piece only sees these types, so traffic splitting, fallbacks, ensembles
and continuous batching can slot in later without rewriting the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


class InferError(Exception):
    """An error answered to the client. `status` is the HTTP status; `grpc_code` the gRPC one."""

    status = 400
    grpc_code = "INVALID_ARGUMENT"
    retry_after: float | None = None
    """Seconds after which a retry may succeed (HTTP `Retry-After`, gRPC `grpc-retry-pushback-ms`);
    None: no advice."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(InferError):
    """Malformed request, or an input that does not fit the model's config (400)."""


class NotFound(InferError):
    status = 404
    grpc_code = "NOT_FOUND"


class PayloadTooLarge(InferError):
    status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(InferError):
    """Queue full, model not ready, or server shutting down (503): retry later / elsewhere."""

    status = 503
    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """Shed by the queue-time bound (`--max-queue-ms`): the request would wait (or has waited)
    longer than the bound for its batch to start. 503 with Retry-After (gRPC UNAVAILABLE), so a
    client or load balancer retries later or elsewhere instead of waiting on a backlog."""


class Timeout(InferError):
    """The request's deadline passed before it ran (Triton answers timeouts like this)."""

    status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class Internal(InferError):
    """The backend failed while running the model. The server stays up."""

    status = 500
    grpc_code = "INTERNAL"


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None
    """HTTP binary tensor extension: return this output as raw bytes (None = request default)."""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    model: str
    inputs: dict[str, np.ndarray]
    """Batch-first arrays, already checked against the model's config by the protocol layer."""
    version: int | None = None
    """None = the router picks (latest ready version)."""
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    """None = every output of the model."""
    priority: int = 0
    """1 is the highest; 0 = the model's default priority level."""
    timeout_us: int = 0
    """0 = the model's default timeout; a request may only shorten the model's default."""
    binary_output: bool = False
    """Request-level default for returning outputs as binary (`binary_data_output`)."""
    parameters: dict[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] | None = None
    """The request's HTTP headers or gRPC metadata (lower-case names): a route's sticky key."""


@dataclass
class InferResponse:
    model: str
    version: int
    outputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
