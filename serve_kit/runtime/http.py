"""HTTP/REST frontend: Open Inference Protocol v2 plus the Triton extensions tools call.

A small HTTP/1.1 server on asyncio (uvloop when installed) with httptools' C parser: keep-alive,
pipelined requests answered in order, a request-body limit (413) enforced while the body streams
in, never after buffering it. Handlers only decode (protocol.py), route (ModelManager) and encode;
every client mistake is a 4xx with a JSON `{"error": ...}` naming what was wrong.

An inference request refused here (a body that does not decode or fit the model) is counted in the
failure statistics of the model version it was for (`/metrics`, `/v2/models/{m}/stats`), like the
requests the scheduler refuses itself; requests for unknown models or versions are not counted
(nothing to count them against, and a label per made-up name would let clients grow /metrics).

Shutdown (`HttpServer.close`, then `stop`): the listener closes at once, so new connections are
refused; requests already received are still answered, with `Connection: close`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from pydantic import ValidationError

from .. import __version__
from ..config import RouteSpec, model_errors
from . import protocol
from .types import BadRequest, InferError, NotFound, PayloadTooLarge, Unavailable

DEFAULT_MAX_BODY = 64 * 1024 * 1024
"""Largest request body carrying binary tensors (Triton's --http-max-input-size is 64 MB too)."""
DEFAULT_MAX_JSON = 6_553_600
"""Largest body that is all JSON, and largest JSON part of a binary one (413 above it): 6.25 MiB,
TorchServe's max_request_size default (6,553,500 bytes) rounded. JSON is parsed on the event loop
(orjson and the stdlib scanner hold the GIL, so a thread would not free the loop), and at ~100 MB/s
of parse and conversion a 64 MB JSON body held every other client for over half a second."""
DEFAULT_MAX_URL = 8 * 1024
"""Longest request target (URL), 414 above it: nginx's large_client_header_buffers (8k)."""
DEFAULT_MAX_HEADER = 8 * 1024
"""Longest header line (name and value), 431 above it: nginx's large_client_header_buffers (8k)."""
DEFAULT_MAX_HEADERS = 100
"""Most header lines in a request, 431 above it: Apache's LimitRequestFields (100)."""
DEFAULT_MAX_HEAD = 16 * 1024
"""Largest request head (request line and headers), 431 above it: Node's --max-http-header-size
and h11's max_incomplete_event_size (16 KiB)."""
DEFAULT_READ_TIMEOUT = 30.0
"""Seconds a client may take to send one request once it started (slow senders get 408)."""
DEFAULT_READ_IDLE_TIMEOUT = 10.0
"""Seconds a partly received request may go without a byte arriving (408): a per-read timer like
nginx's client_body_timeout (60 s there), kept below the whole-request timeout so that it matters."""
DEFAULT_KEEP_ALIVE_TIMEOUT = 75.0
"""Seconds an idle keep-alive connection is kept (longer than common client pools' 60 s, so the
client, not the server, usually closes it: no request is sent on a connection being closed)."""
MAX_PIPELINED = 128
"""Answers owed on one connection before the server stops reading from it."""
SWEEP_INTERVAL = 1.0
SERVER_NAME = "serve-kit"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository", "metrics"]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
            504: "Gateway Timeout"}

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config|/stats)?$")
_ALL_STATS_PATH = "/v2/models/stats"  # Triton's statistics of every model (tritonclient's default)
_REPO_PATH = re.compile(r"^/v2/repository/(index|models/([^/]+)/(load|unload))$")
_ROUTES_PATH = re.compile(r"^/v2/routes(?:/([^/]+))?$")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    release_gil: bool = False
    """Send it with the GIL released (see _Connection._write)."""


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode(), {"Content-Type": "application/json"})


def error_response(err: InferError) -> Response:
    headers = {"Content-Type": "application/json"}
    if err.retry_after:  # 503 under overload: when to come back (RFC 9110 delay-seconds)
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return Response(err.status, protocol.encode_error(err), headers)


def _internal(e: Exception) -> Response:
    """A bug in serve-kit: answer 500, keep serving, and say so (with the traceback) on stderr."""
    import traceback

    traceback.print_exception(e)
    # The exception's text can name server paths; the client gets its type, the log the rest.
    return json_response({"error": f"internal error ({type(e).__name__}); the details are in the server's log"}, 500)


def _task_result(task: asyncio.Future) -> Response:
    try:
        return task.result()
    except asyncio.CancelledError:
        return error_response(Unavailable("the request was withdrawn (server shutting down)"))


def not_allowed(allowed: str, message: str) -> Response:
    resp = json_response({"error": message}, 405)
    resp.headers["Allow"] = allowed  # RFC 9110: a 405 lists the methods the resource takes
    return resp


class Frontend:
    """Maps HTTP requests to the ModelManager. Independent of the socket handling below."""

    def __init__(self, manager, metrics_render: Callable[[], bytes] | None = None,
                 management_token: str | None = None):
        self.manager = manager
        self.metrics_render = metrics_render
        self.management_token = management_token
        # model -> (its config, checked request headers by their bytes): see protocol._HeaderPlan
        self._plans: dict[str, tuple[Any, dict]] = {}

    def dispatch(self, req: Request) -> Response | tuple[asyncio.Future, Callable[[asyncio.Future], Response]]:
        """Answer `req`: now (a Response), or later (a future and the function that turns it, once
        done, into the Response).

        Inference takes the fast path: decoded and queued right here, answered from the
        scheduler's future, without a task or coroutine per request (at ~10k requests/s on one
        core, a task's cost is a tenth of the whole). Everything else runs `handle` as a task."""
        if req.method == "POST" and req.path.endswith("/infer"):
            match = _MODEL_PATH.match(req.path)
            if match and match.group(3) == "/infer":
                try:
                    return self._infer_now(req, match.group(1), _version(match.group(2)))
                except InferError as e:
                    return error_response(e)
                except Exception as e:  # noqa: BLE001 - a bug: answered 500 by _internal
                    return _internal(e)
        task = asyncio.get_running_loop().create_task(self.handle(req))
        return task, _task_result

    def _infer_now(self, req: Request, model: str, version: int | None):
        config = self.manager.config(model)
        infer_req = self._decode(req, config, model, version)
        sched, fut = self.manager.infer_nowait(infer_req)

        def answer(fut: asyncio.Future) -> Response:
            try:
                outputs = fut.result()
            except asyncio.CancelledError:
                return error_response(Unavailable("the request was withdrawn (server shutting down)"))
            except InferError as e:
                return error_response(e)
            except Exception as e:  # noqa: BLE001 - a bug: answered 500
                return _internal(e)
            try:
                resp = self.manager.response(infer_req, sched, outputs)
                body, headers = protocol.encode_infer_response(resp, config, infer_req)
                if resp.parameters:
                    _answer_headers(resp.parameters, headers)
            except InferError as e:
                return error_response(e)
            except Exception as e:  # noqa: BLE001
                return _internal(e)
            # Unbatched models: their model thread waits for the GIL after every execution (see
            # _Connection._write), so the send lets it have the GIL.
            return Response(200, body, headers, release_gil=not sched.batching)

        return fut, answer

    def _decode(self, req: Request, config, model: str, version: int | None):
        try:
            hl = protocol.parse_length(req.headers.get("inference-header-content-length"),
                                       "Inference-Header-Content-Length")
            plans = self._plans.get(model)
            if plans is None or plans[0] is not config:  # a reload brings a new config: new plans
                plans = self._plans[model] = (config, {})
            infer_req = protocol.decode_infer_request(req.body, hl, config, model, version, plans=plans[1])
            infer_req.headers = req.headers
            return infer_req
        except InferError as e:
            self._count_refused(model, version, e.status)
            raise

    async def handle(self, req: Request) -> Response:
        try:
            return await self._route(req)
        except InferError as e:
            return error_response(e)
        except Exception as e:  # a bug: answer 500, keep serving, and say so
            return _internal(e)

    async def _route(self, req: Request) -> Response:
        path = req.path.split("?", 1)[0]
        m = req.method
        if path == "/v2/health/live":
            return Response(200 if self.manager.live else 503)
        if path == "/v2/health/ready":
            return Response(200 if self.manager.ready else 503)
        if path == "/v2":
            if m != "GET":
                return not_allowed("GET", "use GET for server metadata")
            return json_response(protocol.server_metadata(SERVER_NAME, __version__, EXTENSIONS))
        if path == "/metrics" and self.metrics_render:
            if m != "GET":
                return not_allowed("GET", "use GET for /metrics")
            return Response(200, self.metrics_render(), {"Content-Type": "text/plain; version=0.0.4"})
        if path == _ALL_STATS_PATH:
            if m not in ("GET", "POST"):
                return not_allowed("GET, POST", "use GET for statistics")
            return json_response(self.manager.stats())
        match = _MODEL_PATH.match(path)
        if match:
            return await self._model(req, match.group(1), _version(match.group(2)), match.group(3) or "")
        match = _REPO_PATH.match(path)
        if match:
            return await self._repository(req, match.group(1), match.group(2), match.group(3))
        match = _ROUTES_PATH.match(path)
        if match:
            return self._routes(req, match.group(1))
        raise NotFound(f"no such endpoint: {m} {path}")

    async def _model(self, req: Request, model: str, version: int | None, action: str) -> Response:
        if action == "/infer":
            if req.method != "POST":
                return not_allowed("POST", "use POST for /infer")
            config = self.manager.config(model)
            infer_req = self._decode(req, config, model, version)
            resp = await self.manager.infer(infer_req)
            body, headers = protocol.encode_infer_response(resp, config, infer_req)
            if resp.parameters:
                _answer_headers(resp.parameters, headers)
            return Response(200, body, headers)
        if req.method != "GET" and not (action == "/stats" and req.method == "POST"):
            return not_allowed("GET, POST" if action == "/stats" else "GET",
                               f"use GET for {action or 'model metadata'}")
        if action == "/ready":
            return Response(200 if self.manager.model_ready(model, version) else 400)
        if action == "/config":
            config = self.manager.config(model)
            if version is not None:
                self.manager.resolve(model, version)  # 404 for a version that is not serving
            return json_response(protocol.model_config_json(config))
        if action == "/stats":
            return json_response(self.manager.stats(model, version))
        config = self.manager.config(model)
        versions = [version] if version is not None else self.manager.versions(model)
        if version is not None:
            self.manager.resolve(model, version)
        return json_response(protocol.model_metadata(config, versions))

    def _count_refused(self, model: str, version: int | None, status: int) -> None:
        try:
            scheduler = self.manager.resolve(model, version)
        except InferError:
            return  # no version serving to count it against
        scheduler.record_refused(status)

    def _unauthorized(self, req: Request) -> Response | None:
        """403 when management is off, 401 without the right bearer token; None when allowed."""
        if self.management_token is None:
            return json_response({"error": "model management is disabled; start the server with "
                                           "--enable-management --management-token TOKEN"}, 403)
        given = req.headers.get("authorization", "").encode("latin-1")
        # Constant-time: how long a wrong guess takes must not tell how much of it was right.
        if not hmac.compare_digest(given, f"Bearer {self.management_token}".encode("utf-8", "surrogatepass")):
            return json_response({"error": "missing or wrong management token (Authorization: Bearer TOKEN)"}, 401)
        return None

    def _routes(self, req: Request, endpoint: str | None) -> Response:
        """The route management API (contract in README "Rolling out a new version"): GET is open,
        PUT and DELETE need the management token."""
        router = self.manager.router
        if endpoint is None:
            if req.method != "GET":
                return not_allowed("GET", "use GET for the routes; PUT or DELETE /v2/routes/{endpoint} changes one")
            return json_response({"routes": [r.state() for r in router.all()]})
        protocol.check_model_name(endpoint, "route")
        if req.method == "GET":
            return json_response(router.get(endpoint).state())
        if req.method not in ("PUT", "DELETE"):
            return not_allowed("GET, PUT, DELETE", "use GET, PUT or DELETE for a route")
        refused = self._unauthorized(req)
        if refused is not None:
            return refused
        if req.method == "DELETE":
            route = router.clear(endpoint)
        else:
            spec, if_generation = _route_body(req.body)
            route = router.set(endpoint, spec, if_generation=if_generation)
        return json_response(route.state() if route is not None else {"endpoint": endpoint, "source": "none"})

    async def _repository(self, req: Request, what: str, model: str | None, action: str | None) -> Response:
        if req.method != "POST":
            return not_allowed("POST", "use POST for the repository extension")
        if what == "index":
            index = self.manager.index()
            if _body_object(req.body, "repository index").get("ready") is True:
                index = [m for m in index if m.get("state") == "READY"]
            return json_response(index)
        refused = self._unauthorized(req)
        if refused is not None:
            return refused
        protocol.check_model_name(model, action)
        params = _body_object(req.body, action).get("parameters") or {}
        if type(params) is not dict:
            raise BadRequest(f"{action}: 'parameters' must be a JSON object")
        # Triton's config and file overrides would serve something the repository does not hold
        # (unverified by any manifest): refused, as the gRPC frontend does, rather than ignored.
        unsupported = sorted(k for k in params if k != "unload_dependents")
        if unsupported:
            raise BadRequest(f"{action} {model!r}: parameters {unsupported} are not supported")
        result = self.manager.load(model) if action == "load" else self.manager.unload(model)
        if asyncio.iscoroutine(result):
            await result
        return Response(200)


def _route_body(body: bytes) -> tuple[RouteSpec, int | None]:
    doc = _body_object(body, "route")
    if_generation = doc.pop("if_generation", None)
    if if_generation is not None and (type(if_generation) is not int or if_generation < 0):
        raise BadRequest(f"route: 'if_generation' must be a non-negative integer, got {if_generation!r}")
    try:
        return RouteSpec.model_validate(doc), if_generation
    except ValidationError as e:
        why = model_errors(e).replace("(value): ", "").replace("Value error, ", "")
        raise BadRequest("invalid route: " + why[:2000]) from None


def _answer_headers(parameters: dict, headers: dict) -> None:
    """Who answered, as headers too (contract: `serve-kit-target`, `-fallback`, `-cache`)."""
    target = parameters.get("serve_kit_target")
    if target:
        headers["serve-kit-target"] = target
    if parameters.get("serve_kit_fallback"):
        headers["serve-kit-fallback"] = "1"
    if parameters.get("serve_kit_cache_hit"):
        headers["serve-kit-cache"] = "hit"


def _body_object(body: bytes, what: str) -> dict:
    """A request body that is empty or a JSON object (the repository extension's requests)."""
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest(f"the {what} request body is not valid JSON") from None
    if type(doc) is not dict:
        raise BadRequest(f"the {what} request body must be a JSON object")
    return doc


_version = protocol.parse_version


class _Stop(Exception):
    """Raised in a parser callback once the connection has failed: ends the feed of its data."""


class _Connection(asyncio.Protocol):
    """One client connection: parse with httptools, answer requests strictly in order.

    Every answer, including the 400 for a malformed request and the 413 for a body over the
    limit, goes through one FIFO of answers, so pipelined requests before a bad one still get
    theirs first. The FIFO is flushed from done-callbacks: the head's future, when it completes,
    writes its answer and every ready one behind it; no task per connection or per answer.

    The head of a request is bounded as it arrives: data is fed to the parser in slices no longer
    than what is left of the head limit, so the parser (which accumulates a header by bytes
    concatenation) never holds more than one limit's worth of a head, and a client streaming a
    header or a URL as fast as it can is answered 431 / 414 after that many bytes, not after the
    read timeout. The count is exact when a head starts a chunk of data (a new connection, or a
    client that waits for its answers); when a head starts in the chunk that ended the previous
    request's head, that chunk's part of it is not counted, so a head is at most twice the limit.
    """

    def __init__(self, frontend: Frontend, max_body: int, server: "HttpServer"):
        import httptools

        self.frontend, self.max_body, self.server = frontend, max_body, server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: dict[str, str] = {}
        self._nheaders = 0
        self._body: list[bytes] = []
        self._size = 0
        self._limit = max_body     # this request's body limit (JSON bodies have a lower one)
        self._json_part: int | None = None  # Inference-Header-Content-Length, when it is a number
        self._too_large = False
        self._answered = False  # this message got its (413) answer before its body
        self._failed = False    # unparseable input: nothing after it is read
        self._in_body = False   # the head of the current request is complete, its body is not
        self._body_left: int | None = None  # Content-Length bytes still to come (None: chunked)
        self._head_used = 0     # bytes of the current head received so far
        self._boundary = False  # a head ended during the last feed
        self._body_seen = False  # body data came during the last feed
        self._framing = 0       # chunked-body bytes since the last body data (sizes, extensions, trailers)
        self._close_when_done = False  # close once the answers owed are written (EOF, upgrade)
        self._upgrade_body: bytearray | None = None  # the body of an Upgrade request, arriving
        self._upgrade_request: tuple = ()
        # (Response | (future, finish), keep_alive), in request order, not written yet
        self._answers: deque = deque()
        self._paused = False    # reading paused: too many pipelined answers owed
        self._reading_since = 0.0  # loop time a partly received request began (0: none)
        self._heard = 0.0          # loop time the last data arrived
        self._idle_since = 0.0     # loop time the connection last had nothing to do
        self._fd = -1              # the socket's descriptor, for _write (-1: use the transport)

    # asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self._idle_since = self._heard = self.server.now()
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        self._answers.clear()  # nobody to write them to; the requests still finish (and are counted)

    def eof_received(self):
        """The client half-closed (sent FIN): it sends nothing more, but may still read. Keep the
        write side open until the answers it is owed are written, then close (True keeps the
        transport open). A partly received request can never complete: it is dropped."""
        self._failed = True
        self._reading_since = 0.0
        self._upgrade_body = None
        if not self._answers:
            return False  # nothing owed: the transport closes itself
        self._close_when_done = True
        return True

    def data_received(self, data: bytes):
        import httptools

        if self._failed:
            if self._upgrade_body is not None:
                self._heard = self.server.now()
                self._take_upgrade_body(data)
            return
        self._heard = self.server.now()
        max_head = self.server.max_head
        chunk = b""
        try:
            while data:
                in_head = not self._in_body
                if in_head:
                    room = max_head - self._head_used
                elif self._body_left is None:
                    # Chunked: chunk-size lines, extensions and trailers are head-like text the
                    # parser accumulates too; bytes with no body data among them count alike.
                    room = max_head - self._framing
                else:
                    room = self._body_left  # exactly the body, so the next head is counted from its start
                if room >= len(data):
                    chunk, data = data, b""
                else:
                    view = memoryview(data)
                    chunk, data = view[:room], view[room:]
                self._boundary = self._body_seen = False
                self.parser.feed_data(chunk)
                if self._failed:
                    return
                if in_head and not self._boundary:
                    self._head_used += len(chunk)
                    if self._head_used >= max_head and not self._in_body:
                        self._head_too_large()
                        return
                elif not in_head and self._in_body and self._body_left is None and not self._body_seen:
                    self._framing += len(chunk)
                    if self._framing >= max_head:
                        self._fail(431, f"the chunked body's framing or trailers are over the server's limit "
                                        f"of {max_head} bytes without body data (--max-head-kb)")
                        return
        except httptools.HttpParserUpgrade as e:
            # `Upgrade:` (websocket, h2c) or CONNECT: the upgrade is declined, the request itself
            # is answered (with Connection: close) and what follows it, another protocol, is not
            # read. The parser skips the body of an upgrade request, so a body it declared (curl
            # --http2 sends `Upgrade: h2c` with its POSTs) is taken here, by its Content-Length.
            if not self._failed:
                self._failed = True
                if self._upgrade_body is not None:
                    rest = bytes(chunk[e.args[0]:]) + bytes(data) if e.args else bytes(data)
                    self._take_upgrade_body(rest)
                    return
                self._reading_since = 0.0
                self._end_after_answers()
        except httptools.HttpParserError as e:
            if not self._failed:  # else a callback failed it (and raised _Stop to end the feed)
                if "PRI" in str(e):  # HTTP/2's connection preface (prior knowledge, h2c)
                    self._fail(400, "malformed HTTP request: HTTP/2 is not served on this port; use HTTP/1.1 "
                                    "(gRPC has its own port)")
                else:
                    self._fail(400, f"malformed HTTP request: {e}")

    def _end_after_answers(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        if self._answers:
            self._close_when_done = True
        elif self.transport is not None:
            self.transport.close()

    def _take_upgrade_body(self, data: bytes) -> None:
        """The body of a request with `Upgrade:` (see data_received), then its dispatch."""
        body, (method, url, headers, length) = self._upgrade_body, self._upgrade_request
        body += data[:length - len(body)]
        if len(body) < length:
            return
        self._upgrade_body = None
        self._reading_since = 0.0
        self._dispatch(method, url, headers, bytes(body), False)
        self._end_after_answers()

    def _head_too_large(self) -> None:
        limit = self.server.max_head
        if not self._nheaders and self._head_used - self._url_size <= 24:  # all but the method: URL
            self._fail(414, f"the request line is over the server's limit of {limit} bytes for a request "
                            "head (--max-head-kb)")
        else:
            self._fail(431, f"the request head is over the server's limit of {limit} bytes (--max-head-kb)")

    def _refuse(self, status: int, message: str) -> NoReturn:
        self._fail(status, message)
        raise _Stop(message)

    # httptools callbacks --------------------------------------------------------------------
    def on_message_begin(self):
        self._url, self._url_size, self._headers, self._nheaders = [], 0, {}, 0
        self._body, self._size, self._limit = [], 0, self.max_body
        self._too_large = self._answered = False
        self._head_used = 0  # the bytes of this feed are counted after it (data_received)
        self._reading_since = self.server.now()

    def on_url(self, url: bytes):
        self._url_size += len(url)
        if self._url_size > self.server.max_url:
            self._refuse(414, f"the request URL is over the server's limit of {self.server.max_url} bytes "
                              "(--max-url-kb)")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes):
        self._nheaders += 1
        server = self.server
        if self._nheaders > server.max_headers:
            self._refuse(431, f"the request has more than the server's limit of {server.max_headers} "
                              "header lines (--max-headers)")
        if len(name) + len(value) > server.max_header:
            self._refuse(431, f"header {name[:64].decode('latin-1')!r} is over the server's limit of "
                              f"{server.max_header} bytes for one header line (--max-header-kb)")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self):
        self._in_body = self._boundary = True
        self._framing = 0
        headers = self._headers
        server = self.server
        # A body that is all JSON is parsed whole on the loop: it has a lower limit than a body
        # of binary tensors, whose JSON part is bounded alike.
        json_part = headers.get("inference-header-content-length")
        self._json_part = None
        if json_part is None:
            self._limit = min(self.max_body, server.max_json)
        elif json_part.isascii() and json_part.isdigit() and len(json_part) <= 18:
            self._json_part = int(json_part)  # checked against the limit once the body size is known
        length = headers.get("content-length")
        self._body_left = None
        if length is not None and "transfer-encoding" not in headers and length.isascii() and length.isdigit():
            # llhttp has checked it (digits, no overflow); 0 never gets here as a body to read
            self._body_left = int(length) or None
            if self._body_left and self._body_left > self._limit:
                self._too_large = True
            if self._json_part is not None and server.max_json < self._json_part <= int(length):
                self._too_large = True
        if headers.get("expect", "").lower() == "100-continue":
            # curl and others wait (curl: 1 s) for this before sending a large body. When the body
            # is over the limit, the final answer comes now instead and the body is never sent.
            if self._too_large:
                self._answered = True
                self._enqueue(self._too_large_response(), False)
            elif not self._answers and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        self._body_seen, self._framing = True, 0
        if self._body_left is not None:
            self._body_left -= len(body)
        if self._too_large:
            return
        self._size += len(body)
        if self._size > self._limit:
            self._too_large = True
            self._body = []
            return
        self._body.append(body)

    def on_message_complete(self):
        self._reading_since = 0.0
        self._in_body = False
        self._head_used = 0
        if self._answered:
            return
        upgrade = self.parser.should_upgrade()
        keep_alive = self.parser.should_keep_alive() and not upgrade
        if self._json_part is not None and self.server.max_json < self._json_part <= self._size:
            self._too_large = True  # a chunked body's JSON part (a length past the body is a 400)
        if self._too_large:
            self._enqueue(self._too_large_response(), False)
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        method = self.parser.get_method()
        if method == b"CONNECT":  # a proxy's method, never one of ours
            self._enqueue(not_allowed("GET, POST", "CONNECT is not supported: this is not a proxy"), False)
            return
        if upgrade and self._body_left and not body:
            self._upgrade_body, self._upgrade_request = bytearray(), (method, url, self._headers, self._body_left)
            self._reading_since = self.server.now()  # the body still has to arrive, in time
            return
        self._dispatch(method, url, self._headers, body, keep_alive)

    def _dispatch(self, method: bytes, url: bytes, headers: dict, body: bytes, keep_alive: bool) -> None:
        answer = self.frontend.dispatch(Request(method.decode(), url.decode("latin-1"), headers, body))
        if type(answer) is tuple:
            fut = answer[0]
            self.server.in_flight.add(fut)
            fut.add_done_callback(self.server.in_flight.discard)
        self._enqueue(answer, keep_alive)

    # responses ------------------------------------------------------------------------------
    def _too_large_response(self) -> Response:
        if self._limit < self.max_body or "inference-header-content-length" in self._headers:
            return error_response(PayloadTooLarge(
                f"the request's JSON is over the server's limit of {self.server.max_json} bytes for JSON "
                "(--max-json-mb); send tensors as binary data (Inference-Header-Content-Length), "
                f"up to {self.max_body} bytes (--max-body-mb)"))
        return error_response(PayloadTooLarge(f"request body exceeds the limit of {self.max_body} bytes "
                                              "(--max-body-mb)"))

    def _enqueue(self, answer, keep_alive: bool) -> None:
        self._answers.append((answer, keep_alive))
        n = len(self._answers)
        if n == 1:
            self._flush()
        elif n >= MAX_PIPELINED and not self._paused and self.transport is not None:
            # A client that pipelines without reading its answers: stop reading (TCP flow control
            # slows it down) until the answers owed are written, rather than queue without bound.
            self._paused = True
            self.transport.pause_reading()

    def _flush(self, _fut=None) -> None:
        """Write the answers at the head of the FIFO that are ready; wait on the first that is not."""
        answers = self._answers
        while answers:
            answer, keep_alive = answers[0]
            if type(answer) is tuple:
                fut, finish = answer
                if not fut.done():
                    fut.add_done_callback(self._flush)
                    return
                try:
                    resp = finish(fut)
                except Exception as e:  # noqa: BLE001 - a bug in an answer must not stall the connection
                    resp = _internal(e)
            else:
                resp = answer
            answers.popleft()
            transport = self.transport
            if transport is None or transport.is_closing():
                answers.clear()
                return
            # Once the server is shutting down, every answer says so and ends its connection, so
            # that clients do not send more on a connection about to close; so does the last
            # answer owed to a client that half-closed or asked for an upgrade.
            keep_alive = keep_alive and not self.server.closing and not (self._close_when_done and not answers)
            data = _serialize(resp, keep_alive)
            if resp.release_gil:
                self._write(transport, data)
            else:
                transport.write(data)
            if not keep_alive:
                transport.close()
                answers.clear()
                return
        if self._close_when_done:
            if self.transport is not None:
                self.transport.close()
            return
        self._idle_since = self.server.now()
        if self._paused and not self._failed:
            self._paused = False
            self.transport.resume_reading()

    def _write(self, transport: asyncio.Transport, data: bytes) -> None:
        """`transport.write(data)`, with the GIL released during the send.

        uvloop calls write(2) holding the GIL, and a send on loopback also runs the receiving
        side's TCP processing: ~20-30 us, a third of the event loop's time at 12k answers/s, in
        which a model thread that finished an execution cannot take the GIL back to answer it
        and start the next. Answers of unbatched models go out this way: at concurrency 16 with
        batching off, the 512-wide MLP went from 6.0k to 8.6k inferences/s and the digits CNN
        from 5.9k to 9.3k (2 cores, perf_analyzer on them too). Batched models keep transport.write:
        there the model thread's wait lets more requests join its next batch, and releasing the
        GIL cut batches from 10 to 7 rows and throughput by 10 % (benchmarks/README.md).

        When nothing is queued ahead of it on the transport, the answer goes out with os.write,
        which releases the GIL; the part that does not fit, and any error, goes through the
        transport as before, so that ordering, flow control and closing stay the transport's.
        Called only on the loop thread while the transport is open, so the descriptor is still
        this connection's."""
        if self._fd >= 0 and not transport.get_write_buffer_size():
            try:
                sent = os.write(self._fd, data)
            except OSError:  # would block, or a broken connection: the transport handles both
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = memoryview(data)[sent:]
        transport.write(data)

    def check_timeouts(self, now: float) -> None:
        """Called about once a second: end a connection that sends a request too slowly (408: the
        whole request within the read timeout, and no gap between two chunks of it longer than the
        idle timeout) or sits idle past the keep-alive timeout, so that slow or forgotten clients
        cannot hold the server's connections (and memory) forever."""
        if self.transport is None or self.transport.is_closing() or (self._failed and self._upgrade_body is None):
            return
        server = self.server
        if self._reading_since and now - self._reading_since > server.read_timeout:
            self._fail(408, f"the request was not received within {server.read_timeout:g} s")
        elif self._reading_since and not self._paused and now - self._heard > server.read_idle_timeout:
            self._fail(408, f"no part of the request arrived for {server.read_idle_timeout:g} s")
        elif not self._answers and not self._reading_since and now - self._idle_since > self.server.keep_alive_timeout:
            self.transport.close()

    def _fail(self, status: int, message: str):
        """Answer unparseable input after the answers already owed, then close."""
        self._failed = True
        self._upgrade_body = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._enqueue(json_response({"error": message}, status), False)


def _serialize(resp: Response, keep_alive: bool) -> bytes:
    head = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}", f"Content-Length: {len(resp.body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    if resp.body and "Content-Type" not in resp.headers:
        head.append("Content-Type: application/json")
    head.extend(f"{k}: {v}" for k, v in resp.headers.items())
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body


class HttpServer:
    """`read_timeout`: seconds a client may take to send one whole request (head and body) once
    it started; `read_idle_timeout`: seconds a partly received request may go without data;
    `keep_alive_timeout`: seconds an idle keep-alive connection stays open. `max_*`: the limits
    of a request (DEFAULT_MAX_* say where each default comes from); a URL limit over the head
    limit is the head limit."""

    def __init__(self, frontend: Frontend, host: str = "127.0.0.1", port: int = 8000,
                 max_body: int = DEFAULT_MAX_BODY, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT, *,
                 read_idle_timeout: float = DEFAULT_READ_IDLE_TIMEOUT, max_json: int = DEFAULT_MAX_JSON,
                 max_url: int = DEFAULT_MAX_URL, max_header: int = DEFAULT_MAX_HEADER,
                 max_headers: int = DEFAULT_MAX_HEADERS, max_head: int = DEFAULT_MAX_HEAD):
        self.frontend, self.host, self.port, self.max_body = frontend, host, port, max_body
        self.read_timeout, self.keep_alive_timeout = read_timeout, keep_alive_timeout
        self.read_idle_timeout = read_idle_timeout
        self.max_json = min(max_json, max_body)
        self.max_head = max(max_head, 64)
        self.max_url, self.max_header = min(max_url, self.max_head), max_header
        self.max_headers = max_headers
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[_Connection] = set()
        self.in_flight: set[asyncio.Future] = set()
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def now(self) -> float:
        return self._loop.time()

    async def start(self) -> "HttpServer":
        loop = self._loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self.frontend, self.max_body, self),
                                               self.host, self.port, reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        self._sweep()
        return self

    def _sweep(self) -> None:
        # One timer for all connections, not one per connection or request: timeouts are coarse
        # (seconds) and the request path stays free of timer churn.
        now = self._loop.time()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close(self) -> None:
        """Stop accepting connections, at once. Requests on open connections are still answered,
        each with `Connection: close`."""
        self.closing = True
        if self.server:
            self.server.close()

    async def stop(self, timeout: float) -> None:
        """close(), let in-flight requests finish (up to `timeout`), then close every connection."""
        self.close()
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=timeout)
        await asyncio.sleep(0)  # let the last answers go out
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.transport:
                conn.transport.close()
