"""The resilient serve-kit client: `Client` (sync) and `AsyncClient` (asyncio) over HTTP or gRPC,
with retries under a deadline, Idempotency-Key, a circuit breaker per endpoint, replica balancing
with outlier ejection, and hedging. It speaks the Open Inference Protocol and imports only the
protocol codec, never the server."""

from .client import AsyncClient, Client, InferResult
from .errors import (CircuitOpen, ClientError, ConnectionFailed, DeadlineExceeded, NoReplicaAvailable,
                     ServerError)
from .policy import BreakerPolicy, EjectionPolicy, HedgePolicy, RetryPolicy

__all__ = ["AsyncClient", "BreakerPolicy", "CircuitOpen", "Client", "ClientError", "ConnectionFailed",
           "DeadlineExceeded", "EjectionPolicy", "HedgePolicy", "InferResult", "NoReplicaAvailable",
           "RetryPolicy", "ServerError"]
