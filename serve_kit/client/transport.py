"""One replica's wire: HTTP (aiohttp; OIP JSON plus the binary tensor extension, the codec of
runtime/protocol.py) or gRPC (grpc.aio; the generated runtime/proto messages). Each turns every
failure into ServerError (an answer) or ConnectionFailed (no answer); the retry decisions are the
client's."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import datatype_of
from ..runtime import protocol
from .errors import ConnectionFailed, ServerError

_GRPC_TO_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
                 "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "ABORTED": 409,
                 "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNKNOWN": 500,
                 "DATA_LOSS": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499}


@dataclass
class Answer:
    """A successful inference answer as the transport read it."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    id: str | None
    parameters: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _datatype(arr: np.ndarray) -> str:
    """BYTES for strings and objects, else the numpy dtype's datatype (ConfigError names the dtype)."""
    return "BYTES" if arr.dtype.kind in "OSU" else datatype_of(arr.dtype)


def _retry_after(text: str | None, scale: float = 1.0) -> float | None:
    try:
        return max(0.0, float(text) * scale) if text else None
    except ValueError:
        return None  # an HTTP-date Retry-After: no advice we use


def _infer_path(model: str, version: int | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/infer"


class HttpTransport:
    def __init__(self, url: str, session):
        self.url, self.session = url.rstrip("/"), session

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None,
                    outputs: Sequence[str] | None, request_id: str, timeout_us: int, headers: Mapping[str, str],
                    try_timeout: float) -> Answer:
        import aiohttp

        body, head = protocol.encode_infer_request(inputs, binary=True, outputs=outputs, binary_output=True,
                                                   id=request_id, parameters={"timeout": timeout_us})
        head = {**head, **headers, "Idempotency-Key": request_id}
        url = self.url + _infer_path(model, version)
        try:
            async with self.session.post(url, data=body, headers=head,
                                         timeout=aiohttp.ClientTimeout(total=try_timeout)) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise self._error(resp.status, raw, resp.headers.get("Retry-After"))
                length = resp.headers.get(protocol.HEADER_LENGTH)
                decoded = protocol.decode_infer_response(raw, int(length) if length is not None else None)
                return Answer(decoded.model, decoded.version, decoded.outputs, decoded.id,
                              dict(decoded.parameters), {k.lower(): v for k, v in resp.headers.items()})
        except asyncio.TimeoutError as e:
            raise ConnectionFailed(f"{self.url}: no answer within the per-try timeout of {try_timeout:.3g} s",
                                   url=self.url) from e
        except aiohttp.ClientError as e:
            raise ConnectionFailed(f"{self.url}: {type(e).__name__}: {e}", url=self.url) from e

    def _error(self, status: int, raw: bytes, retry_after: str | None) -> ServerError:
        try:
            import json
            message = json.loads(raw).get("error") or raw[:200].decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - any non-JSON error body is shown as text
            message = raw[:200].decode("utf-8", "replace")
        return ServerError(status, message, url=self.url, retry_after=_retry_after(retry_after))

    async def _get(self, path: str, try_timeout: float):
        import aiohttp

        try:
            async with self.session.get(self.url + path, timeout=aiohttp.ClientTimeout(total=try_timeout)) as resp:
                raw = await resp.read()
                return resp.status, raw, resp.headers
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            raise ConnectionFailed(f"{self.url}: {type(e).__name__}: {e}", url=self.url) from e

    async def ready(self, try_timeout: float) -> bool:
        status, _, _ = await self._get("/v2/health/ready", try_timeout)
        return status == 200

    async def metadata(self, model: str, try_timeout: float) -> dict:
        import json

        status, raw, headers = await self._get(f"/v2/models/{model}", try_timeout)
        if status != 200:
            raise self._error(status, raw, headers.get("Retry-After"))
        return json.loads(raw)

    async def close(self) -> None:
        pass  # the session is the client's


class GrpcTransport:
    def __init__(self, url: str):
        from grpc import aio

        from ..runtime.proto import grpc_service_pb2_grpc as pbg

        self.url = url
        self.channel = aio.insecure_channel(url.split("://", 1)[1])
        self.stub = pbg.GRPCInferenceServiceStub(self.channel)

    def _error(self, e) -> Exception:
        import grpc

        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE,) and not any(k == "grpc-retry-pushback-ms"
                                                              for k, _ in (e.trailing_metadata() or ())):
            details = e.details() or ""
            # No answer from a server (refused, reset, EOF): gRPC reports those as UNAVAILABLE too.
            if any(s in details.lower() for s in ("connect", "socket", "reset", "eof", "closed", "unavailable:")):
                return ConnectionFailed(f"{self.url}: UNAVAILABLE: {details}", url=self.url)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and e.details() == "Deadline Exceeded":
            return ConnectionFailed(f"{self.url}: no answer within the per-try timeout", url=self.url)
        pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        name = code.name
        status = _GRPC_TO_HTTP.get(name, 500)
        if name == "RESOURCE_EXHAUSTED" and any(s in (e.details() or "").lower()
                                                 for s in ("larger than max", "too large", "exceeds the limit")):
            status = 413  # a message over the size limit: the same request would be refused again
        return ServerError(status, e.details() or "", url=self.url, code=name,
                           retry_after=_retry_after(pushback, 0.001))

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None,
                    outputs: Sequence[str] | None, request_id: str, timeout_us: int, headers: Mapping[str, str],
                    try_timeout: float) -> Answer:
        import grpc

        from ..runtime.proto import grpc_service_pb2 as pb

        req = pb.ModelInferRequest(model_name=model, model_version="" if version is None else str(version),
                                   id=request_id)
        req.parameters["timeout"].int64_param = timeout_us
        for name, value in inputs.items():
            arr = np.asarray(value)
            datatype = _datatype(arr)
            req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
            req.raw_input_contents.append(protocol.array_to_bytes(arr, datatype))
        for name in outputs or ():
            req.outputs.add(name=name)
        metadata = [(k.lower(), v) for k, v in headers.items()] + [("idempotency-key", request_id)]
        try:
            resp = await self.stub.ModelInfer(req, timeout=try_timeout, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e
        arrays = {}
        for i, out in enumerate(resp.outputs):
            arrays[out.name] = protocol.array_from_bytes(resp.raw_output_contents[i], out.datatype, list(out.shape),
                                                         name=out.name)
        params = {k: getattr(p, p.WhichOneof("parameter_choice")) for k, p in resp.parameters.items()
                  if p.WhichOneof("parameter_choice")}
        version_text = resp.model_version
        return Answer(resp.model_name, int(version_text) if version_text.isdigit() else 0, arrays,
                      resp.id or None, params, {})

    async def ready(self, try_timeout: float) -> bool:
        import grpc

        from ..runtime.proto import grpc_service_pb2 as pb

        try:
            return (await self.stub.ServerReady(pb.ServerReadyRequest(), timeout=try_timeout)).ready
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

    async def metadata(self, model: str, try_timeout: float) -> dict:
        import grpc

        from ..runtime.proto import grpc_service_pb2 as pb

        try:
            m = await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=try_timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

        def tensors(ts):
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {"name": m.name, "versions": list(m.versions), "platform": m.platform,
                "inputs": tensors(m.inputs), "outputs": tensors(m.outputs)}

    async def close(self) -> None:
        await self.channel.close()
