"""gRPC frontend: KServe v2 `inference.GRPCInferenceService` plus the Triton extensions clients use.

tritonclient, perf_analyzer and other KServe v2 gRPC clients work unmodified: the messages are
those of the public protocol (proto/*.proto, field numbers as published). Like the HTTP frontend,
handlers only decode (with protocol.py's checks and raw-tensor codec, so both frontends accept and
refuse exactly the same requests), route (ModelManager) and encode. Every client mistake is a gRPC
status with a message naming what was wrong; a bug in serve-kit is INTERNAL and the server goes on.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelStreamInfer, ModelConfig, ModelStatistics, RepositoryIndex, RepositoryModelLoad and
RepositoryModelUnload. Load and unload need the management token as `authorization: Bearer TOKEN`
metadata. Anything else (shared memory, trace and log settings) is UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from typing import Any, Sequence

import grpc
import numpy as np
from google.protobuf import json_format
from grpc import aio

from .. import __version__
from ..config import ModelConfig, numpy_dtype
from ..errors import ServeKitError
from . import protocol
from .proto import grpc_service_pb2 as pb
from .proto import grpc_service_pb2_grpc as pb_grpc
from .proto import model_config_pb2 as mc_pb
from .types import BadRequest, InferError, InferRequest, InferResponse, Internal, NotFound, RequestedOutput

log = logging.getLogger("serve_kit.runtime")

SERVER_NAME = "serve-kit"
EXTENSIONS = ["model_configuration", "statistics", "model_repository", "schedule_policy"]
"""Triton extensions this service implements (binary_tensor_data and metrics are HTTP's)."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest request or response message. gRPC's own default (4 MiB) is too small for batches;
`serve` passes --max-body-mb, so that both frontends take the same largest request."""
MAX_METADATA_BYTES = 8 * 1024
"""Largest request metadata (headers), gRPC's own default (8 KiB), set explicitly: over it the
call fails with RESOURCE_EXHAUSTED before any handler runs."""

# Where each datatype's values travel in InferTensorContents. FP16 has no typed form.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS_FIELDS = sorted(set(_CONTENTS_FIELD.values()))


class ManagementDisabled(InferError):
    """Load/unload asked of a server started without a management token."""

    status = 403
    grpc_code = "UNAVAILABLE"  # Triton's answer when its model control mode forbids loading


class ManagementDenied(InferError):
    """Load/unload without the right bearer token."""

    status = 401
    grpc_code = "PERMISSION_DENIED"


def _short(value: object, limit: int = 80) -> str:
    """repr() cut short: a hostile name must not become a megabyte error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _code(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)


_version = protocol.parse_version  # the same versions accepted and refused as over HTTP


def _parameter_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _set_parameter(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, (bool, np.bool_)):
        p.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        value = int(value)
        if value >= 1 << 63:
            p.uint64_param = value
        else:
            p.int64_param = value
    elif isinstance(value, (float, np.floating)):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def _non_negative_int(params: dict[str, Any], key: str) -> int:
    value = params.pop(key, None)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise BadRequest(f"request parameter {key!r} must be a non-negative integer, got {_short(value)}")
    return value


def _typed_contents(name: str, datatype: str, shape: list[int], count: int,
                    contents: pb.InferTensorContents) -> np.ndarray:
    """An input's array from its typed `contents` (the slow, non-raw way some clients send data)."""
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"input {name!r}: {datatype} data has no typed form; send it in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        others = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(contents, f))]
        if not values and others:
            raise BadRequest(f"input {name!r}: {datatype} data belongs in contents.{field}, "
                             f"the request filled contents.{others[0]}")
        raise BadRequest(f"input {name!r}: contents.{field} holds {len(values)} values, but shape "
                         f"{shape} needs {count}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    target = numpy_dtype(datatype)
    if target.kind in "iu" and target.itemsize < 8 and count:
        # int_contents / uint_contents carry 32 bits for every narrower type: check the range
        # instead of letting numpy wrap 300 into an INT8.
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(target)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise BadRequest(f"input {name!r}: value {bad} does not fit {datatype} "
                             f"({info.min}..{info.max})")
        return wide.astype(target).reshape(shape)
    return np.asarray(values, dtype=target).reshape(shape)


def decode_infer_request(request: pb.ModelInferRequest, config: ModelConfig,
                         max_elements: int = protocol.DEFAULT_MAX_ELEMENTS) -> InferRequest:
    """A ModelInferRequest as an InferRequest whose inputs have been checked against `config`.

    Input data come from `raw_input_contents` (one entry per input, in input order: what
    tritonclient sends) or, when that is empty, from each input's typed `contents`. Names,
    datatypes, shapes and sizes are checked before any data is decoded. Parameters `priority` and
    `timeout` (microseconds) fill the request's fields; others are kept. Raises BadRequest only.
    """
    inputs = request.inputs
    raw = request.raw_input_contents
    protocol.check_input_names([t.name for t in inputs], config)
    if raw and len(raw) != len(inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; "
                         "give one per input, in the order of `inputs`")
    decoded = []
    for i, t in enumerate(inputs):
        shape = list(t.shape)
        count = protocol.check_input(t.name, t.datatype, shape, config, max_elements=max_elements)
        if raw:
            if t.HasField("contents"):
                raise BadRequest(f"input {t.name!r}: has typed `contents` although the request uses "
                                 "raw_input_contents; use one or the other")
            arr = protocol.array_from_bytes(raw[i], t.datatype, shape, name=t.name)
        else:
            arr = _typed_contents(t.name, t.datatype, shape, count, t.contents)
        decoded.append((t.name, t.datatype, arr))
    arrays = protocol.check_inputs(decoded, config, max_elements=max_elements)

    params = {k: _parameter_value(v) for k, v in request.parameters.items()}
    priority = _non_negative_int(params, "priority")
    timeout = _non_negative_int(params, "timeout")

    outputs = None
    if request.outputs:
        known = [t.name for t in config.outputs]
        seen: set[str] = set()
        outputs = []
        for o in request.outputs:
            if o.name not in known:
                raise BadRequest(f"unknown output {_short(o.name)} requested: model "
                                 f"{config.name!r} has outputs {known}")
            if o.name in seen:
                raise BadRequest(f"output {o.name!r} is requested more than once")
            seen.add(o.name)
            oparams = {k: _parameter_value(v) for k, v in o.parameters.items()}
            if "classification" in oparams:
                raise BadRequest(f"output {o.name!r}: the classification extension is not supported; "
                                 "request the raw output")
            oparams.pop("binary_data", None)  # an HTTP notion; gRPC outputs are always raw
            outputs.append(RequestedOutput(name=o.name, parameters=oparams))
    return InferRequest(model=request.model_name, version=_version(request.model_version), inputs=arrays,
                        id=request.id or None, outputs=outputs, priority=priority, timeout_us=timeout,
                        parameters=params)


def encode_infer_response(resp: InferResponse, config: ModelConfig, req: InferRequest) -> pb.ModelInferResponse:
    """Outputs in the request's order (or the config's), data in raw_output_contents."""
    out = pb.ModelInferResponse(model_name=resp.model, model_version=str(resp.version))
    request_id = resp.id if resp.id is not None else req.id
    if request_id:
        out.id = request_id
    for key, value in resp.parameters.items():
        _set_parameter(out.parameters[key], value)
    names = [o.name for o in req.outputs] if req.outputs else [t.name for t in config.outputs]
    for name in names:
        if name not in resp.outputs:
            raise Internal(f"the model returned no output {name!r} (it returned {sorted(resp.outputs)})")
        datatype, arr = protocol.output_array(config, name, resp.outputs[name])
        out.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        out.raw_output_contents.append(protocol.array_to_bytes(arr, datatype))
    return out


def _metadata(context: aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata, names lower-case (gRPC's own), as the router reads headers."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _from_json(doc: Any, message):
    """Fill a message from a document shaped like Triton's HTTP JSON (the manager's and codec's)."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


async def _maybe_await(value):
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return await value
    return value


def _failure(e: Exception, what: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed call answers with."""
    if isinstance(e, InferError):
        return _code(e.grpc_code), e.message
    if isinstance(e, ServeKitError):  # the user's problem (e.g. a model that fails to load)
        return grpc.StatusCode.INVALID_ARGUMENT, e.render()
    log.error("gRPC %s failed", what, exc_info=e)  # a bug: answer INTERNAL, keep serving
    # The exception's text can name server paths; the client gets its type, the log the rest.
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); the details are in the server's log"


def _unary(method):
    """Turn every exception of a unary handler into a status with a message, never a crash."""
    @functools.wraps(method)
    async def handler(self, request, context: aio.ServicerContext):
        try:
            return await method(self, request, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            code, message = _failure(e, method.__name__)
            # A 503's Retry-After as gRPC's retry pushback (gRFC A6), which gRPC clients honour.
            retry_after = getattr(e, "retry_after", None)
            trailing = (("grpc-retry-pushback-ms", str(int(retry_after * 1000))),) if retry_after else ()
        await context.abort(code, message, trailing)
    return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Maps gRPC calls to the ModelManager."""

    def __init__(self, manager, management_token: str | None = None,
                 max_elements: int = protocol.DEFAULT_MAX_ELEMENTS, max_stream_inflight: int = 256):
        self.manager = manager
        self.management_token = management_token
        self.max_elements = max_elements
        self.max_stream_inflight = max_stream_inflight

    # -- health and metadata ------------------------------------------------------------------
    @_unary
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=bool(self.manager.live))

    @_unary
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.manager.ready))

    @_unary
    async def ModelReady(self, request, context):
        version = _version(request.version)
        try:
            ready = self.manager.model_ready(request.name, version)
        except NotFound:
            ready = False  # like Triton: an unknown model is simply not ready
        return pb.ModelReadyResponse(ready=bool(ready))

    @_unary
    async def ServerMetadata(self, request, context):
        return _from_json(protocol.server_metadata(SERVER_NAME, __version__, EXTENSIONS), pb.ServerMetadataResponse())

    @_unary
    async def ModelMetadata(self, request, context):
        version = _version(request.version)
        config = self.manager.config(request.name)
        if version is not None:
            self.manager.resolve(request.name, version)
            versions: Sequence[int] = [version]
        else:
            versions = self.manager.versions(request.name)
        return _from_json(protocol.model_metadata(config, versions), pb.ModelMetadataResponse())

    @_unary
    async def ModelConfig(self, request, context):
        version = _version(request.version)
        config = self.manager.config(request.name)
        if version is not None:
            self.manager.resolve(request.name, version)
        return pb.ModelConfigResponse(config=_from_json(protocol.model_config_json(config), mc_pb.ModelConfig()))

    @_unary
    async def ModelStatistics(self, request, context):
        version = _version(request.version)
        return _from_json(self.manager.stats(request.name or None, version), pb.ModelStatisticsResponse())

    # -- inference ----------------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, metadata: dict | None = None) -> pb.ModelInferResponse:
        config = self.manager.config(request.model_name)
        req = decode_infer_request(request, config, self.max_elements)
        req.headers = metadata
        resp = await self.manager.infer(req)
        return encode_infer_response(resp, config, req)

    @_unary
    async def ModelInfer(self, request, context):
        return await self._infer(request, _metadata(context))

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request runs as soon as it arrives; responses go out as they finish (clients match
        them by `id`). A failed request is a response with `error_message`; the stream goes on."""
        loop = asyncio.get_running_loop()
        metadata = _metadata(context)
        results: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        # Stop reading when this many requests are running: gRPC flow control then slows the
        # client down, instead of the server decoding an unbounded backlog into memory.
        slots = asyncio.Semaphore(self.max_stream_inflight)

        async def one(request: pb.ModelInferRequest) -> None:
            if isinstance(request, _DecodeFailed):  # one undecodable message: its answer, the stream goes on
                slots.release()
                await results.put(pb.ModelStreamInferResponse(error_message=str(request)))
                return
            try:
                out = pb.ModelStreamInferResponse(infer_response=await self._infer(request, metadata))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _, message = _failure(e, "ModelStreamInfer")
                out = pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                         model_version=request.model_version, id=request.id))
            finally:
                slots.release()
            await results.put(out)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = loop.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the client went away mid-stream: nothing left to answer
                log.debug("gRPC ModelStreamInfer: stream ended: %s", e)
            finally:
                results.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # -- repository extension -----------------------------------------------------------------
    @_unary
    async def RepositoryIndex(self, request, context):
        models = await _maybe_await(self.manager.index())
        if request.ready:
            models = [m for m in models if m.get("state") == "READY"]
        return _from_json({"models": models}, pb.RepositoryIndexResponse())

    def _authorize(self, context: aio.ServicerContext) -> None:
        if self.management_token is None:
            raise ManagementDisabled("model management is disabled; start the server with "
                                     "--enable-management --management-token TOKEN")
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
        # Constant-time: the token must not leak through how long a wrong guess takes.
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                   f"Bearer {self.management_token}".encode("utf-8", "surrogatepass")):
            raise ManagementDenied("missing or wrong management token (metadata authorization: Bearer TOKEN)")

    async def _manage(self, context: aio.ServicerContext, action: str, model: str, params) -> None:
        self._authorize(context)
        if not model:
            raise BadRequest(f"{action}: model_name is empty")
        protocol.check_model_name(model, action)
        # Triton's config and file overrides would serve something the repository does not hold
        # (unverified by any manifest); serve-kit serves only what the repository vouches for.
        unsupported = sorted(k for k in params if k != "unload_dependents")
        if unsupported:
            raise BadRequest(f"{action} {model!r}: parameters {unsupported} are not supported")
        await _maybe_await(self.manager.load(model) if action == "load" else self.manager.unload(model))

    @_unary
    async def RepositoryModelLoad(self, request, context):
        await self._manage(context, "load", request.model_name, request.parameters)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request, context):
        await self._manage(context, "unload", request.model_name, request.parameters)
        return pb.RepositoryModelUnloadResponse()


class _DecodeFailed(Exception):
    """A request message that is not the protobuf its method takes."""


def _parsing(cls):
    """A request deserializer that turns undecodable bytes into _DecodeFailed (INVALID_ARGUMENT),
    where gRPC's own handling of a failed deserializer answers UNKNOWN."""
    def parse(raw: bytes):
        try:
            return cls.FromString(raw)
        except Exception as e:  # noqa: BLE001 - DecodeError, and whatever a hostile message raises
            return _DecodeFailed(f"the request is not a valid {cls.DESCRIPTOR.full_name} message: {e}")
    return parse


def _checked_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its request deserializer from _parsing and a behaviour that answers a
    _DecodeFailed request with INVALID_ARGUMENT (unary) or an error response (stream)."""
    deserializer = handler.request_deserializer
    cls = getattr(deserializer, "__self__", None)  # bound FromString of the request class
    if cls is None:
        return handler
    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary(request, context):
            if isinstance(request, _DecodeFailed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
            return await behaviour(request, context)
        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_parsing(cls),
                                                   response_serializer=handler.response_serializer)
    if handler.stream_stream is not None:
        behaviour = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(behaviour, request_deserializer=_parsing(cls),
                                                     response_serializer=handler.response_serializer)
    return handler


class _Handlers:
    """Collects what the generated add_*_to_server registers, to wrap it (see _checked_handler)."""

    def __init__(self):
        self.handlers: list = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        pass  # the generic handler above carries the same methods


def _service_handler(servicer) -> grpc.GenericRpcHandler:
    captured = _Handlers()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    (generic,) = captured.handlers
    methods = {name.rsplit("/", 1)[1]: _checked_handler(h) for name, h in generic._method_handlers.items()}
    return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", methods)


async def serve_grpc(manager, host: str = "127.0.0.1", port: int = 8001, management_token: str | None = None,
                     *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                     max_metadata_bytes: int = MAX_METADATA_BYTES) -> aio.Server:
    """Start the gRPC service on `host:port` (port 0 = any free port) and return the running server.

    The bound port is `server.port`. Stop it with `await server.stop(grace_seconds)`: new calls
    are refused at once, calls in flight get `grace_seconds` to finish.
    """
    server = aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_metadata_size", max_metadata_bytes),
        # gRPC sets SO_REUSEPORT by default on Linux, which lets a second server bind a port that
        # is in use and silently take half its connections; a busy port must be an error.
        ("grpc.so_reuseport", 0),
    ])
    server.add_generic_rpc_handlers((_service_handler(InferenceServicer(manager, management_token)),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio >= 1.57 raises; older versions return 0
        raise OSError(f"gRPC cannot listen on {address}: {e} (is the port in use?)") from None
    if not bound:
        raise OSError(f"gRPC cannot listen on {address} (is the port in use?)")
    await server.start()
    server.port = bound
    return server


__all__ = ["EXTENSIONS", "InferenceServicer", "MAX_MESSAGE_BYTES", "ManagementDenied", "ManagementDisabled",
           "SERVER_NAME", "decode_infer_request", "encode_infer_response", "serve_grpc"]
