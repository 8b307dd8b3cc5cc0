"""Open Inference Protocol (KServe v2) HTTP/REST codec, with Triton's binary tensor data extension.

Pure functions, no I/O: the HTTP frontend hands a request body (and the value of the
`Inference-Header-Content-Length` header, if any) to `decode_infer_request` and gets an
`InferRequest` whose inputs have been checked against the model's config; it hands the scheduler's
`InferResponse` to `encode_infer_response` and gets a body plus the headers to send. Every problem
with a request is a `BadRequest` naming the input, what was wrong and what the model expects.

Wire format (KServe v2 REST, Triton's `binary_tensor_data` extension):

* JSON tensor `data` is row-major, flat or nested like `shape` (both are valid v2). BOOL takes
  JSON booleans, integer datatypes JSON integers, FP16/FP32/FP64 JSON numbers, BYTES JSON strings
  (their UTF-8 bytes become the element).
* Binary tensors follow the JSON header in input order, each `parameters.binary_data_size` bytes:
  little-endian, no padding; BOOL one byte 0/1; BYTES a 4-byte little-endian length before each
  element. Responses use the same layout for outputs requested with `binary_data` (or the
  request's `binary_data_output`), with `Content-Type: application/octet-stream` and the header
  length in `Inference-Header-Content-Length`.

Non-finite floats. JSON has no NaN or Infinity, but NaN is a legal tensor value and Python clients
(`json.dumps`, tritonclient) write the tokens `NaN`, `Infinity`, `-Infinity`; Triton reads and
writes them too. So requests may carry those tokens in float data (an integer input given NaN is
still an error), and a JSON response with a non-finite float output writes them. Strict JSON
parsers (browsers, Go) reject such a response; clients that need strict JSON ask for binary output.

Decoded arrays are not copied out of the request body where avoidable: binary inputs are read-only
views of it. BYTES tensors are numpy object arrays of `bytes`.

gRPC reuse: `check_input_names`, `check_input`, `check_inputs`, `array_from_bytes` and
`array_to_bytes` are the same checks and the same raw layout as gRPC's `raw_input_contents` /
`raw_output_contents`.
"""

from __future__ import annotations

import json
import math
import struct
from itertools import chain
from typing import Any, Iterable, Mapping, NoReturn, Sequence

import numpy as np
import orjson

from ..config import DATATYPES, ModelConfig, TensorSpec, numpy_dtype
from .types import BadRequest, InferRequest, InferResponse, Internal, RequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header giving the length of the JSON part of a body that carries binary tensors."""
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
DEFAULT_MAX_ELEMENTS = 1 << 28
"""Largest element count accepted for one input tensor (1 GiB of FP32)."""
MAX_RANK = 64
MAX_VERSION = (1 << 63) - 1
"""Largest model version (Triton's versions are int64): longer version text is refused before
int() sees it, so a 5,000-digit version is a 400, not Python's int-size guard (a 500)."""
TEXT_BYTES_BACKENDS = frozenset({"onnxruntime"})
"""Backends whose BYTES tensors are text (ONNX Runtime's tensor(string)): their BYTES inputs must
be UTF-8, checked per request in decode so that one bad request never fails a batch."""
PROTOCOL_EXTENSIONS = ("binary_tensor_data", "model_configuration", "schedule_policy")
"""Server-metadata extensions this codec implements."""

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "tensorrt": "tensorrt_plan"}
"""Triton's platform name for each serve-kit backend (model metadata and config)."""
_TRITON_BACKENDS = {"onnxruntime": "onnxruntime", "torchscript": "pytorch", "tensorrt": "tensorrt"}
_MODEL_FILENAMES = {"onnxruntime": "model.onnx", "torchscript": "model.pt", "tensorrt": "model.plan"}

# Wire dtypes are little-endian whatever the host is.
_WIRE_DTYPES: dict[str, np.dtype] = {dt: np.dtype(np_name).newbyteorder("<")
                                     for dt, np_name in DATATYPES.items() if dt != "BYTES"}
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
_INTS = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})
_JSON_LEAF_TYPES: dict[str, frozenset[type]] = {
    **{dt: frozenset({int, float}) for dt in _FLOATS},
    **{dt: frozenset({int}) for dt in _INTS},
    "BOOL": frozenset({bool}),
    "BYTES": frozenset({str}),
}
_JSON_LEAF_WORDS = {**{dt: "numbers" for dt in _FLOATS}, **{dt: "integers" for dt in _INTS},
                    "BOOL": "booleans (true/false)", "BYTES": "strings"}
_U32 = struct.Struct("<I")


def _fail(message: str) -> NoReturn:
    raise BadRequest(message)


def _q(value: object, limit: int = 80) -> str:
    """repr() cut short: hostile names must not turn into megabyte error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


_PY_TO_JSON = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
               list: "array", dict: "object"}


def _jtype(value: object) -> str:
    """The JSON type name of a parsed value, for error messages."""
    return _PY_TO_JSON.get(type(value), type(value).__name__)


def parse_version(text: str | None) -> int | None:
    """A model version as a client wrote it (URL segment, gRPC `model_version` / `version`).

    Empty or None: the server picks. Otherwise ASCII digits of a value in 1..MAX_VERSION, else
    BadRequest; whether that version is serving is the manager's to say (404). Shared by the HTTP
    and gRPC frontends so that both accept and refuse the same versions."""
    if text is None or text == "":
        return None
    if type(text) is not str or len(text) > 19 or not text.isascii() or not text.isdigit():
        _fail(f"model version must be an integer in 1..{MAX_VERSION}, got {_q(text)}")
    value = int(text)
    if not 1 <= value <= MAX_VERSION:
        _fail(f"model version must be an integer in 1..{MAX_VERSION}, got {_q(text)}")
    return value


def check_model_name(name: str, what: str) -> str:
    """`name` when it is a model name (the repository's one rule, `repository.is_model_name`: no
    `..`, no `/`, no absolute path, at most 255 characters), else BadRequest. The frontends check
    the names of load and unload requests with it before the manager sees them."""
    from ..repository import is_model_name

    if not is_model_name(name):
        _fail(f"{what}: {_q(name)} is not a model name (letters, digits, '_', '.', '-', starting with a "
              "letter or digit)")
    return name


def parse_length(text: str | None, what: str) -> int | None:
    """A non-negative byte count from a header a client wrote (None when absent): ASCII digits
    only, at most 18 of them (int() would accept ' 12', '+5' and '1_0', and raise on 5,000 digits)."""
    if text is None:
        return None
    if len(text) > 18 or not text.isascii() or not text.isdigit():
        _fail(f"{what} must be a non-negative integer, got {_q(text)}")
    return int(text)


def check_text(name: str, arr: np.ndarray, config: ModelConfig) -> None:
    """BadRequest unless every element of a BYTES input is UTF-8, when the model's backend takes
    BYTES as text (TEXT_BYTES_BACKENDS). A per-request check, made before the scheduler sees it."""
    if config.backend not in TEXT_BYTES_BACKENDS or arr.dtype != object:
        return
    for index, item in enumerate(arr.ravel().tolist()):
        try:
            str(item, "utf-8")
        except (UnicodeDecodeError, TypeError) as e:
            reason = e.reason if isinstance(e, UnicodeDecodeError) else "not bytes"
            _fail(f"input {name!r}: BYTES element {index} is not UTF-8 text ({reason}), which model "
                  f"{config.name!r} ({config.backend}) takes as a string; send UTF-8")


def element_count(shape: Sequence[int]) -> int:
    """Elements in a tensor of `shape`. Python integers, so a hostile shape cannot overflow."""
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------
# Checks shared with the gRPC service


def check_input_names(names: Sequence[str], config: ModelConfig) -> None:
    """Each of the model's inputs present exactly once and nothing else; BadRequest otherwise.

    Call it with the request's input names in request order, before decoding any tensor data.
    """
    known = [t.name for t in config.inputs]
    known_set = set(known)
    seen: set[str] = set()
    for name in names:
        if name not in known_set:
            _fail(f"unknown input {_q(name)}: model {config.name!r} has inputs {known}")
        if name in seen:
            _fail(f"input {_q(name)} is given more than once")
        seen.add(name)
    missing = [n for n in known if n not in seen]
    if missing:
        _fail(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: "
              f"model {config.name!r} needs inputs {known}")


def _input_spec(config: ModelConfig, name: str) -> TensorSpec:
    for t in config.inputs:
        if t.name == name:
            return t
    _fail(f"unknown input {_q(name)}: model {config.name!r} has inputs {[t.name for t in config.inputs]}")


def check_input(name: str, datatype: str, shape: Sequence[int], config: ModelConfig, *,
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> int:
    """Check one input's name, datatype and shape against the config; return its element count.

    `shape` is the full request shape (batch dim first when the model batches). Nothing is
    allocated: call it before reading the tensor's data.
    """
    spec = _input_spec(config, name)
    if datatype != spec.datatype:
        if datatype not in DATATYPES:
            _fail(f"input {name!r}: unknown datatype {_q(datatype)}; the model expects {spec.datatype}")
        _fail(f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}")
    shape = list(shape)
    expected = spec.shape
    if len(shape) != len(expected):
        _fail(f"input {name!r}: shape {_q(shape)} has {len(shape)} dimensions, the model expects "
              f"{len(expected)} ({expected}, -1 = any size)")
    for d in shape:
        if type(d) is not int or d < 0:
            _fail(f"input {name!r}: shape {_q(shape)} must hold non-negative integers")
    first = 0
    if config.max_batch_size > 0:
        if not 1 <= shape[0] <= config.max_batch_size:
            _fail(f"input {name!r}: batch size {shape[0]} (the first dimension of shape {_q(shape)}) "
                  f"is not in 1..{config.max_batch_size}, the model's max_batch_size")
        first = 1
    for i in range(first, len(shape)):
        if expected[i] != -1 and shape[i] != expected[i]:
            _fail(f"input {name!r}: shape {_q(shape)} does not match the model's {expected} "
                  f"(dimension {i} is {shape[i]}, expected {expected[i]}; -1 = any size)")
    count = element_count(shape)
    if count > max_elements or max(shape, default=0) > max_elements:
        _fail(f"input {name!r}: shape {_q(shape)} has {count} elements, more than the server's "
              f"limit of {max_elements} per input")
    return count


def _check_batch_sizes(shapes: Mapping[str, Sequence[int]], config: ModelConfig) -> None:
    if config.max_batch_size > 0 and len({s[0] for s in shapes.values()}) > 1:
        sizes = ", ".join(f"{n!r}: {s[0]}" for n, s in shapes.items())
        _fail(f"inputs have different batch sizes (first dimension) ({sizes}); they must be equal")


def check_inputs(inputs: Iterable[tuple[str, str, np.ndarray]], config: ModelConfig, *,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """Check already-decoded `(name, datatype, array)` triples against the config.

    For the gRPC service once it has built arrays (from `raw_input_contents` via `array_from_bytes`
    or from typed contents): each model input exactly once, datatype equal to the config's, shape
    fitting it, array dtype fitting the datatype. Returns the arrays by name in the config's order.
    """
    items = list(inputs)
    check_input_names([n for n, _, _ in items], config)
    by_name: dict[str, np.ndarray] = {}
    for name, datatype, arr in items:
        arr = np.asarray(arr)
        check_input(name, datatype, arr.shape, config, max_elements=max_elements)
        if not _dtype_fits(arr.dtype, datatype):
            _fail(f"input {name!r}: array of dtype {arr.dtype} does not hold {datatype} data")
        if datatype == "BYTES":
            check_text(name, arr, config)
        by_name[name] = arr
    _check_batch_sizes({n: a.shape for n, a in by_name.items()}, config)
    return {t.name: by_name[t.name] for t in config.inputs}


def _dtype_fits(dtype: np.dtype, datatype: str) -> bool:
    if datatype == "BYTES":
        return dtype.kind in "OS"
    return dtype == _WIRE_DTYPES[datatype] or dtype == numpy_dtype(datatype)


# ---------------------------------------------------------------------------------------------
# Raw tensor bytes (binary extension; gRPC raw contents)


def array_from_bytes(raw: bytes | bytearray | memoryview, datatype: str, shape: Sequence[int], *,
                     name: str = "tensor") -> np.ndarray:
    """Decode one tensor's raw bytes: little-endian, row-major; BYTES as 4-byte length + bytes each.

    The size must be exactly what `shape` needs; otherwise BadRequest naming `name`. Fixed-size
    datatypes return a read-only view of `raw` (no copy); BYTES an object array of `bytes`. Call
    `check_input` (or bound the element count some other way) before this on untrusted shapes.
    """
    shape = list(shape)
    count = element_count(shape)
    if datatype == "BYTES":
        return _reshape(_bytes_elements(memoryview(raw), count, name), shape, name)
    dt = _WIRE_DTYPES.get(datatype)
    if dt is None:
        _fail(f"input {_q(name)}: unknown datatype {_q(datatype)}; datatypes are {list(DATATYPES)}")
    need = count * dt.itemsize
    size = memoryview(raw).nbytes
    if size != need:
        _fail(f"input {name!r}: {size} bytes of binary data, but shape {shape} of {datatype} "
              f"needs {need} ({count} elements x {dt.itemsize} bytes)")
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if octets.size and octets.max() > 1:
            _fail(f"input {name!r}: BOOL binary data must be bytes 0 or 1, found {int(octets.max())}")
        return _reshape(octets.view(np.bool_), shape, name)
    return _reshape(np.frombuffer(raw, dtype=dt), shape, name)


def _reshape(arr: np.ndarray, shape: list[int], name: str) -> np.ndarray:
    try:
        return arr.reshape(shape)
    except ValueError:
        # Only reachable with a zero-size shape whose other dimensions numpy cannot represent.
        _fail(f"input {name!r}: shape {_q(shape)} is too large")


def _bytes_elements(mv: memoryview, count: int, name: str) -> np.ndarray:
    size = mv.nbytes
    if count * 4 > size:
        # Checked first so a hostile element count cannot drive a long loop or a big allocation.
        _fail(f"input {name!r}: {count} BYTES elements need at least {count * 4} bytes "
              f"(a 4-byte length each), the binary data has {size}")
    mv = mv.cast("B") if mv.format != "B" else mv
    items: list[bytes] = []
    append = items.append
    unpack = _U32.unpack_from
    off = 0
    for i in range(count):
        if off + 4 > size:
            _fail(f"input {name!r}: BYTES element {i} has no 4-byte length: the binary data ends at byte {size}")
        (length,) = unpack(mv, off)
        off += 4
        if off + length > size:
            _fail(f"input {name!r}: BYTES element {i} claims {length} bytes but only {size - off} are left")
        append(mv[off:off + length].tobytes())
        off += length
    if off != size:
        _fail(f"input {name!r}: {size - off} bytes are left after the {count} BYTES elements its shape holds")
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr


def _bytes_items(arr: np.ndarray, name: str) -> list[bytes]:
    """Elements of a BYTES array as `bytes`: str elements (what ONNX Runtime returns) become UTF-8."""
    flat = arr.ravel().tolist()
    if set(map(type, flat)) <= {bytes}:
        return flat
    out = []
    for x in flat:
        if isinstance(x, bytes):
            out.append(bytes(x))
        elif isinstance(x, str):
            try:
                out.append(x.encode("utf-8"))
            except UnicodeEncodeError:
                raise Internal(f"output {name!r}: a BYTES string is not valid Unicode") from None
        else:
            raise Internal(f"output {name!r}: BYTES element of type {type(x).__name__} is neither bytes nor str")
    return out


def _binary_parts(arr: np.ndarray, datatype: str, name: str) -> tuple[list, int]:
    """Buffers whose concatenation is the tensor's wire bytes, and their total size."""
    if datatype == "BYTES":
        items = _bytes_items(arr, name)
        lengths = list(map(len, items))
        if lengths and max(lengths) > 0xFFFFFFFF:
            raise Internal(f"output {name!r}: a BYTES element is over 4 GiB, which the protocol cannot carry")
        parts = list(chain.from_iterable(zip(map(_U32.pack, lengths), items)))
        return parts, 4 * len(items) + sum(lengths)
    wire = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[datatype])
    # The array itself is a buffer: bytes.join copies it once, into the body.
    return [wire.reshape(-1).view(np.uint8)], wire.nbytes


def array_to_bytes(arr: np.ndarray, datatype: str) -> bytes:
    """Encode a tensor as raw wire bytes (the inverse of `array_from_bytes`).

    BYTES elements may be `bytes` or `str` (encoded as UTF-8).
    """
    parts, _ = _binary_parts(np.asarray(arr), datatype, "tensor")
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# JSON


def _loads(raw: bytes | memoryview, what: str = "request") -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        error = e
    # orjson is strict JSON. Clients written in Python send NaN/Infinity for non-finite floats and
    # Triton accepts them, so the stdlib parser (which does too) gets a second look, but only when
    # orjson stopped at such a token or at a number it cannot hold (an integer over 64 bits, which
    # the input's datatype then refuses by name): any other malformed body is answered from
    # orjson's error, without a second, slower parse of the whole body on the event loop (small
    # bodies get it anyway: its messages, e.g. for a lone surrogate, name the input).
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"the {what}'s JSON is not valid UTF-8 (bad byte at offset {e.start})")
    if "depth limit" in str(error) or "recursion" in str(error):
        _fail(f"the {what}'s JSON is nested too deeply")
    if len(text) > _ANY_FALLBACK and not text.startswith(_NONFINITE_TOKENS, error.pos):
        _fail(f"the {what} is not valid JSON: {error}")
    try:
        return json.loads(text)
    except RecursionError:
        _fail(f"the {what}'s JSON is nested too deeply")
    except ValueError as e:
        _fail(f"the {what} is not valid JSON: {e}")


_NONFINITE_TOKENS = ("NaN", "Infinity", *"-0123456789")  # orjson stops at the token, after any sign
_ANY_FALLBACK = 64 * 1024  # chars: bodies up to this size get the stdlib's second look whatever failed


def _flatten(data: list, shape: list[int], name: str) -> list:
    """Row-major leaves of `data`, which must be flat or nested exactly like `shape`.

    Each level is checked and flattened with C-level iteration (set/map/chain), not a Python loop
    per element.
    """
    items = data
    depth = 0
    while items and type(items[0]) is list:
        if set(map(type, items)) != {list}:
            _fail(f"input {name!r}: 'data' mixes arrays and values at nesting depth {depth}; "
                  f"give it flat or nested exactly like shape {shape}")
        depth += 1
        if depth >= len(shape):
            _fail(f"input {name!r}: 'data' is nested deeper than shape {shape}")
        lengths = set(map(len, items))
        if lengths != {shape[depth]}:
            _fail(f"input {name!r}: 'data' is nested unlike shape {shape}: arrays at depth {depth} "
                  f"have {sorted(lengths)[:4]} elements, expected {shape[depth]}")
        items = list(chain.from_iterable(items))
    if depth:
        if len(data) != shape[0]:
            _fail(f"input {name!r}: 'data' is nested unlike shape {shape}: the outer array has "
                  f"{len(data)} elements, expected {shape[0]}")
        if items and depth != len(shape) - 1:
            _fail(f"input {name!r}: 'data' is nested {depth + 1} deep for a shape of {len(shape)} "
                  f"dimensions {shape}; give it flat or nested exactly like the shape")
    return items


def _array_from_json(data: Any, datatype: str, shape: list[int], count: int, name: str) -> np.ndarray:
    if type(data) is not list:
        _fail(f"input {name!r}: 'data' must be a JSON array, got {_jtype(data)}")
    flat = _flatten(data, shape, name)
    if len(flat) != count:
        _fail(f"input {name!r}: 'data' has {len(flat)} elements, shape {shape} needs {count}")
    types = set(map(type, flat))
    bad = types - _JSON_LEAF_TYPES[datatype]
    if bad:
        got = sorted(_PY_TO_JSON.get(t, t.__name__) for t in bad)
        _fail(f"input {name!r}: {datatype} data must be JSON {_JSON_LEAF_WORDS[datatype]}, "
              f"got {' and '.join(got)}")
    if datatype == "BYTES":
        try:
            encoded = list(map(str.encode, flat))
        except UnicodeEncodeError:
            _fail(f"input {name!r}: a BYTES string is not valid Unicode (lone surrogate escape)")
        arr = np.empty(count, dtype=object)
        arr[:] = encoded
        return arr.reshape(shape)
    target = numpy_dtype(datatype)
    if datatype in _INTS:
        return _int_array(flat, datatype, target, name).reshape(shape)
    if datatype in _FLOATS:
        try:
            with np.errstate(over="ignore"):
                arr = np.array(flat, dtype=target)
        except OverflowError:
            _fail(f"input {name!r}: an integer in 'data' is too large for {datatype}")
        if not np.isfinite(arr).all():
            # Infinity may have been sent (a token), or be a finite value too large for the
            # datatype, which would change it silently: only the second is an error.
            wide = np.array(flat, dtype=np.float64)
            overflow = np.isinf(arr) & np.isfinite(wide)
            if overflow.any():
                _fail(f"input {name!r}: {float(wide[overflow][0])!r} is out of range for {datatype} "
                      f"(largest finite value {float(np.finfo(target).max)!r})")
        return arr.reshape(shape)
    return np.array(flat, dtype=np.bool_).reshape(shape)


def _int_array(flat: list[int], datatype: str, target: np.dtype, name: str) -> np.ndarray:
    """Python ints to `target`, refusing values out of its range.

    The range is checked here because numpy 1.x wraps out-of-range Python ints (with a
    DeprecationWarning) where numpy 2 raises: the conversion itself cannot be trusted to refuse.
    """
    info = np.iinfo(target)
    if not flat:
        return np.zeros(0, dtype=target)
    try:
        wide = np.array(flat, dtype=np.int64)  # raises OverflowError outside int64 on every numpy
    except OverflowError:
        wide = None
    if wide is not None:
        lo, hi = int(wide.min()), int(wide.max())
    else:
        lo, hi = min(flat), max(flat)  # only UINT64 can still fit; C-level scans of Python ints
    if lo < info.min or hi > info.max:
        value = lo if lo < info.min else hi
        _fail(f"input {name!r}: {_q(value)} is out of range for {datatype} ({info.min}..{info.max})")
    if wide is None:
        return np.array(flat, dtype=target)
    return wide.astype(target, copy=False)


def _json_data(arr: np.ndarray, datatype: str, name: str) -> Any:
    """Row-major flat `data` for a JSON response: a 1-D array orjson writes natively, or strs."""
    if datatype == "BYTES":
        try:
            return [x.decode("utf-8") for x in _bytes_items(arr, name)]
        except UnicodeDecodeError:
            raise BadRequest(f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot "
                             f"carry; request it as binary (parameters.binary_data: true)") from None
    return np.ascontiguousarray(arr).reshape(-1)


def _dumps(doc: dict, nonfinite: bool) -> bytes:
    if not nonfinite:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    # orjson writes NaN/Infinity as null, which would silently change values; the stdlib writes
    # the NaN/Infinity tokens Triton and Python clients read.
    def plain(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value
    return json.dumps(plain(doc), separators=(",", ":")).encode("ascii")


# ---------------------------------------------------------------------------------------------
# Requests


def _parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if type(value) is not dict:
        _fail(f"{where} 'parameters' must be a JSON object, got {_jtype(value)}")
    return value


def _int_param(params: dict, key: str, where: str) -> int:
    value = params.get(key, 0)
    if type(value) is not int or value < 0:
        _fail(f"{where} parameter {key!r} must be a non-negative integer, got {_q(value)}")
    return value


def _bool_param(params: dict, key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and type(value) is not bool:
        _fail(f"{where} parameter {key!r} must be true or false, got {_q(value)}")
    return value


def _requested_outputs(value: Any, config: ModelConfig) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if type(value) is not list:
        _fail(f"'outputs' must be an array of output objects, got {_jtype(value)}")
    if not value:
        return None  # an empty list asks for nothing in particular: every output, like no list
    known = [t.name for t in config.outputs]
    seen: set[str] = set()
    result = []
    for i, item in enumerate(value):
        if type(item) is not dict:
            _fail(f"outputs[{i}] must be an object with a 'name', got {_jtype(item)}")
        name = item.get("name")
        if type(name) is not str:
            _fail(f"outputs[{i}]: 'name' must be a string, got {_jtype(name)}")
        if name not in known:
            _fail(f"unknown output {_q(name)} requested: model {config.name!r} has outputs {known}")
        if name in seen:
            _fail(f"output {name!r} is requested more than once")
        seen.add(name)
        params = dict(_parameters(item.get("parameters"), f"output {name!r}:"))
        if "classification" in params:
            _fail(f"output {name!r}: the classification extension is not supported; request the raw output")
        binary = _bool_param(params, "binary_data", f"output {name!r}:")
        params.pop("binary_data", None)
        result.append(RequestedOutput(name=name, binary=binary, parameters=params))
    return result


class _HeaderPlan:
    """What a request's JSON header says, checked against the config: everything but the data.

    Clients send the same header again and again (perf_analyzer, tritonclient and most services
    put no id, or an empty one, in it and binary tensors of one shape), so a plan for a header
    without `data` and without a non-empty `id` is kept per model config (`plans` of
    decode_infer_request) and the next identical header skips parsing and checking; only the
    sizes of the binary data are checked again."""

    __slots__ = ("headers", "entries", "request_id", "params", "priority", "timeout", "binary_output",
                 "outputs", "reusable")

    def __init__(self, doc: dict, header_length: int | None, config: ModelConfig, max_elements: int):
        if type(doc) is not dict:
            _fail(f"the request must be a JSON object, got {_jtype(doc)}")
        entries = doc.get("inputs")
        if type(entries) is not list or not entries:
            _fail(f"'inputs' must be a non-empty array of input objects, got {_jtype(entries)}")
        for i, item in enumerate(entries):
            if type(item) is not dict:
                _fail(f"inputs[{i}] must be an object, got {_jtype(item)}")
            if type(item.get("name")) is not str:
                _fail(f"inputs[{i}]: 'name' must be a string, got {_jtype(item.get('name'))}")
        check_input_names([item["name"] for item in entries], config)

        # Every header is checked before any data is read, so a bad shape is reported as such and
        # the cost of a rejected request stays small.
        headers = []
        all_binary = True
        for item in entries:
            name = item["name"]
            datatype = item.get("datatype")
            if type(datatype) is not str:
                _fail(f"input {name!r}: 'datatype' must be a string such as "
                      f"{_input_spec(config, name).datatype!r}, got {_jtype(datatype)}")
            shape = item.get("shape")
            if type(shape) is not list or len(shape) > MAX_RANK or not set(map(type, shape)) <= {int}:
                _fail(f"input {name!r}: 'shape' must be an array of integers such as "
                      f"{_input_spec(config, name).shape}, got {_q(shape)}")
            count = check_input(name, datatype, shape, config, max_elements=max_elements)
            params = _parameters(item.get("parameters"), f"input {name!r}:")
            size = params.get("binary_data_size")
            if size is not None:
                if header_length is None:
                    _fail(f"input {name!r} has parameters.binary_data_size but the request has no "
                          f"{HEADER_LENGTH} header to say where the binary data starts")
                if "data" in item:
                    _fail(f"input {name!r} has both 'data' and parameters.binary_data_size; give one")
                if type(size) is not int or size < 0:
                    _fail(f"input {name!r}: binary_data_size must be a non-negative integer, got {_q(size)}")
            elif "data" not in item:
                _fail(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            else:
                all_binary = False
            headers.append((name, datatype, shape, count, size))
        _check_batch_sizes({h[0]: h[2] for h in headers}, config)

        # The rest of the header too, before the (costlier) tensor data.
        request_id = doc.get("id")
        if request_id is not None:
            if type(request_id) is not str:
                _fail(f"'id' must be a string, got {_jtype(request_id)}")
            try:
                request_id.encode("utf-8")
            except UnicodeEncodeError:
                _fail("'id' is not valid Unicode (lone surrogate escape)")
        params = dict(_parameters(doc.get("parameters"), "request"))
        priority = _int_param(params, "priority", "request")
        timeout = _int_param(params, "timeout", "request")
        binary_output = bool(_bool_param(params, "binary_data_output", "request"))
        for key in ("priority", "timeout", "binary_data_output"):
            params.pop(key, None)
        levels = config.dynamic_batching.priority_levels if config.dynamic_batching else 0
        if levels and priority > levels:
            _fail(f"request priority {priority} is not one of the model's levels 1..{levels} (0 = default)")
        self.outputs = _requested_outputs(doc.get("outputs"), config)
        self.headers, self.entries, self.request_id, self.params = headers, entries, request_id, params
        self.priority, self.timeout, self.binary_output = priority, timeout, binary_output
        # Requests share a reused plan: only plain values and immutable parts go in it (outputs'
        # and the request's parameters are copied per request). An id is part of the header's
        # bytes, so a plan with one is as right as one without; but a non-empty id is usually new
        # on every request, and keeping its plan would only churn the set. An empty one repeats:
        # perf_analyzer sends `"id":""` with every request.
        self.reusable = all_binary and not request_id

    def request(self, view: memoryview, json_end: int, config: ModelConfig, model: str,
                version: int | None) -> InferRequest:
        total = view.nbytes
        offset = json_end
        arrays: dict[str, np.ndarray] = {}
        for (name, datatype, shape, count, size), item in zip(self.headers, self.entries):
            if size is None:
                arrays[name] = _array_from_json(item["data"], datatype, shape, count, name)
                continue
            if offset + size > total:
                _fail(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                      f"({total - offset} bytes of binary data are left)")
            arrays[name] = array_from_bytes(view[offset:offset + size], datatype, shape, name=name)
            if datatype == "BYTES":
                check_text(name, arrays[name], config)
            offset += size
        if offset != total:
            _fail(f"{total - offset} bytes after the JSON header are not claimed by any input's "
                  f"binary_data_size ({HEADER_LENGTH} is {json_end}, the body has {total} bytes)")
        outputs = self.outputs
        if outputs is not None and self.reusable:
            outputs = [RequestedOutput(o.name, o.binary, dict(o.parameters)) for o in outputs]
        return InferRequest(
            model=model,
            version=version,
            inputs=arrays if len(arrays) == 1 else {t.name: arrays[t.name] for t in config.inputs},
            id=self.request_id,
            outputs=outputs,
            priority=self.priority,
            timeout_us=self.timeout,
            binary_output=self.binary_output,
            parameters=dict(self.params) if self.reusable else self.params,
        )


_MAX_PLANS = 64
"""Header plans kept per model config (a plain bound: the set is cleared when it is full)."""
_MAX_PLAN_HEADER = 4096
"""Longest JSON header whose plan is kept (binary-only headers are short)."""


def decode_infer_request(body: bytes | bytearray | memoryview, header_length: int | None,
                         config: ModelConfig, model: str, version: int | None,
                         max_elements: int = DEFAULT_MAX_ELEMENTS, plans: dict | None = None) -> InferRequest:
    """Parse and check an inference request body (`POST /v2/models/{model}[/versions/{v}]/infer`).

    `header_length` is the `Inference-Header-Content-Length` header as an int (None when absent):
    the JSON is then the body's first `header_length` bytes and binary tensors follow, in input
    order, `parameters.binary_data_size` bytes each, exactly filling the rest of the body.
    Inputs are checked against `config` (names, datatypes, shapes, element counts, data), sizes are
    checked before anything is allocated, and the arrays come back in the config's input order.
    Request parameters `priority`, `timeout` (microseconds) and `binary_data_output` fill the
    request's fields; other parameters are kept in `parameters`. Raises BadRequest, only.

    `plans`: a dict owned by the caller for this `config` (and `max_elements`) alone, in which the
    checked headers of binary requests are kept for reuse (see _HeaderPlan); None keeps nothing.
    """
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    total = view.nbytes
    if header_length is None:
        json_end = total
    else:
        if type(header_length) is not int or not 0 <= header_length <= total:
            _fail(f"{HEADER_LENGTH} is {_q(header_length)} but the body has {total} bytes; it must "
                  f"give the length of the JSON part of the body")
        json_end = header_length
    header = view[:json_end]
    key = None
    if plans is not None and header_length is not None and json_end <= _MAX_PLAN_HEADER:
        key = header.tobytes()
        plan = plans.get(key)
        if plan is not None:
            return plan.request(view, json_end, config, model, version)
    plan = _HeaderPlan(_loads(header), header_length, config, max_elements)
    if key is not None and plan.reusable:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plans[key] = plan
    return plan.request(view, json_end, config, model, version)


# ---------------------------------------------------------------------------------------------
# Responses


def _as_datatype(arr: Any, datatype: str, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if datatype == "BYTES":
        if arr.dtype.kind not in "OSU":
            raise Internal(f"output {name!r}: the model returned {arr.dtype} data for a BYTES output")
        return arr
    target = numpy_dtype(datatype)
    if arr.dtype == target:
        return arr
    if arr.dtype.kind not in "biuf" or not np.can_cast(arr.dtype, target, "same_kind"):
        raise Internal(f"output {name!r}: the model returned {arr.dtype} data, the config declares {datatype}")
    return arr.astype(target)


def _datatype_of_array(arr: np.ndarray, name: str) -> str:
    if arr.dtype.kind in "OSU":
        return "BYTES"
    for dt, np_name in DATATYPES.items():
        if np_name == arr.dtype.name:
            return dt
    raise Internal(f"output {name!r}: numpy dtype {arr.dtype} has no Open Inference Protocol datatype")


def _output_datatype(config: ModelConfig, name: str, arr: Any) -> str:
    for t in config.outputs:
        if t.name == name:
            return t.datatype
    return _datatype_of_array(np.asarray(arr), name)


def output_array(config: ModelConfig, name: str, arr: Any) -> tuple[str, np.ndarray]:
    """An output's datatype (the config's) and the model's array converted to it.

    A numeric array of another dtype of the same kind (float64 for FP32, int32 for INT64) is
    converted; anything else raises Internal. Shared by the HTTP and gRPC frontends so both answer
    the same bytes for the same model output.
    """
    datatype = _output_datatype(config, name, arr)
    return datatype, _as_datatype(arr, datatype, name)


def encode_infer_response(resp: InferResponse, config: ModelConfig,
                          request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers for a successful inference.

    Outputs come in the request's order (`request.outputs`), or the config's when it named none.
    Each is JSON `data` (flat, row-major) or, when requested as binary (`binary_data`, defaulting
    to the request's `binary_data_output`), raw bytes after the JSON with
    `parameters.binary_data_size`. Headers: `Content-Type`, plus `Inference-Header-Content-Length`
    when binary data follows the JSON. The datatype is the config's; an array of another numeric
    dtype of the same kind is converted. Raises Internal when the model's outputs do not fit, and
    BadRequest when a BYTES output that is not UTF-8 was asked for as JSON.
    """
    if request.outputs:
        wanted = [(o.name, o.binary) for o in request.outputs]
    else:
        wanted = [(t.name, None) for t in config.outputs]
    outputs = []
    parts: list = []
    any_binary = nonfinite = False
    for name, binary in wanted:
        if name not in resp.outputs:
            raise Internal(f"the model returned no output {name!r} (it returned {sorted(resp.outputs)})")
        datatype, arr = output_array(config, name, resp.outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if request.binary_output if binary is None else binary:
            buffers, size = _binary_parts(arr, datatype, name)
            parts.extend(buffers)
            any_binary = True
            entry["parameters"] = {"binary_data_size": size}
        else:
            entry["data"] = _json_data(arr, datatype, name)
            if datatype in _FLOATS and not np.isfinite(arr).all():
                nonfinite = True
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model, "model_version": str(resp.version)}
    request_id = resp.id if resp.id is not None else request.id
    if request_id is not None:
        doc["id"] = request_id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    doc["outputs"] = outputs
    header = _dumps(doc, nonfinite)
    if not any_binary:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    return b"".join([header, *parts]), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def encode_error(err: Exception) -> bytes:
    """`{"error": "<message>"}`, the v2 error body for every endpoint."""
    message = getattr(err, "message", None) or str(err)
    # ASCII escapes: a message quoting hostile input may hold lone surrogates, which UTF-8 cannot.
    return json.dumps({"error": message}).encode("ascii")


# ---------------------------------------------------------------------------------------------
# Client side (load generator, tests): the inverse codecs


def encode_infer_request(inputs: Mapping[str, np.ndarray], *, binary: bool | Iterable[str] = True,
                         outputs: Sequence[str | RequestedOutput] | None = None,
                         binary_output: bool = False, id: str | None = None,
                         parameters: Mapping[str, Any] | None = None,
                         datatypes: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an inference request, as tritonclient builds them.

    `binary`: True/False for every input, or the names of the inputs to send as binary. Datatypes
    come from the arrays' dtypes (object/bytes arrays are BYTES) unless given in `datatypes`.
    """
    binary_names = set(inputs) if binary is True else set() if binary is False else set(binary)
    entries = []
    parts: list = []
    any_binary = False
    for name, value in inputs.items():
        arr = np.asarray(value)
        datatype = (datatypes or {}).get(name) or _datatype_of_array(arr, name)
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if name in binary_names:
            buffers, size = _binary_parts(arr, datatype, name)
            parts.extend(buffers)
            any_binary = True
            entry["parameters"] = {"binary_data_size": size}
        elif datatype == "BYTES":
            entry["data"] = [x.decode("utf-8") for x in _bytes_items(arr, name)]
        else:
            entry["data"] = np.asarray(arr, dtype=numpy_dtype(datatype)).ravel().tolist()
        entries.append(entry)
    doc: dict[str, Any] = {}
    if id is not None:
        doc["id"] = id
    params = dict(parameters or {})
    if binary_output:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    doc["inputs"] = entries
    if outputs is not None:
        doc["outputs"] = []
        for o in outputs:
            ro = o if isinstance(o, RequestedOutput) else RequestedOutput(name=o)
            item: dict[str, Any] = {"name": ro.name}
            ro_params = dict(ro.parameters)
            if ro.binary is not None:
                ro_params["binary_data"] = ro.binary
            if ro_params:
                item["parameters"] = ro_params
            doc["outputs"].append(item)
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not any_binary:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    return b"".join([header, *parts]), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def decode_infer_response(body: bytes | memoryview, header_length: int | None) -> InferResponse:
    """Parse a successful inference response body into arrays (the inverse of `encode_infer_response`).

    Raises BadRequest when the body is malformed (the same checks as for requests).
    """
    view = memoryview(body).cast("B")
    total = view.nbytes
    json_end = total if header_length is None else header_length
    if not 0 <= json_end <= total:
        _fail(f"{HEADER_LENGTH} is {json_end} but the body has {total} bytes")
    doc = _loads(view[:json_end], "response")
    if type(doc) is not dict or type(doc.get("outputs")) is not list:
        _fail("the response is not a JSON object with an 'outputs' array")
    offset = json_end
    arrays: dict[str, np.ndarray] = {}
    for item in doc["outputs"]:
        if type(item) is not dict:
            _fail("an output of the response is not a JSON object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if (type(name) is not str or datatype not in DATATYPES or type(shape) is not list
                or not set(map(type, shape)) <= {int} or any(d < 0 for d in shape)):
            _fail(f"output {_q(name)}: malformed name, datatype or shape")
        size = _parameters(item.get("parameters"), f"output {name!r}:").get("binary_data_size")
        if size is None:
            arrays[name] = _array_from_json(item.get("data"), datatype, shape, element_count(shape), name)
            continue
        if type(size) is not int or size < 0 or offset + size > total:
            _fail(f"output {name!r}: binary_data_size {_q(size)} does not fit the body")
        arrays[name] = array_from_bytes(view[offset:offset + size], datatype, shape, name=name)
        offset += size
    if offset != total:
        _fail(f"{total - offset} bytes after the response's JSON are not claimed by any output")
    version = doc.get("model_version")
    return InferResponse(
        model=str(doc.get("model_name", "")),
        version=int(version) if type(version) is str and version.isascii() and version.isdigit()
        and len(version) <= 19 else 0,
        outputs=arrays,
        id=doc.get("id"),
        parameters=doc.get("parameters") or {},
    )


# ---------------------------------------------------------------------------------------------
# Metadata documents


def server_metadata(name: str, version: str, extensions: Iterable[str] = PROTOCOL_EXTENSIONS) -> dict:
    """`GET /v2`: the server's name, version and supported extensions."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_metadata(config: ModelConfig, versions: Sequence[int]) -> dict:
    """`GET /v2/models/{m}[/versions/{v}]`, as Triton answers it.

    Shapes are the full request shapes: a batching model's tensors start with -1 for the batch
    dimension (Triton adds it; perf_analyzer skips the first dimension when max_batch_size > 0).
    """
    def tensors(specs: list[TensorSpec]) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    return {
        "name": config.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORMS[config.backend],
        "inputs": tensors(config.inputs),
        "outputs": tensors(config.outputs),
    }


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config_json(config: ModelConfig) -> dict:
    """`GET /v2/models/{m}/config`: the config as Triton's ModelConfig protobuf in JSON.

    Field names and enum spellings are the protobuf's (`data_type: TYPE_FP32`, `kind: KIND_CPU`);
    64-bit integers are numbers, as Triton writes them; `dims` leave out the batch dimension when
    max_batch_size > 0 (a per-sample scalar is `dims: [1]` with an empty `reshape`, Triton's
    spelling). Enough for tritonclient's `get_model_config` and for perf_analyzer, which reads
    `max_batch_size`, the inputs and whether `dynamic_batching` is present. serve-kit's warm-up
    (stored samples) has no Triton equivalent, so `model_warmup` is empty.
    """
    batched = config.max_batch_size > 0

    def dims_of(t: TensorSpec) -> dict:
        dims = list(t.shape[1:] if batched else t.shape)
        if not dims:
            return {"dims": [1], "reshape": {"shape": []}}
        return {"dims": dims}

    inputs = [{"name": t.name, "data_type": _triton_type(t.datatype), "format": "FORMAT_NONE", **dims_of(t),
               "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False}
              for t in config.inputs]
    outputs = [{"name": t.name, "data_type": _triton_type(t.datatype), **dims_of(t),
                "label_filename": "", "is_shape_tensor": False}
               for t in config.outputs]
    vp = config.version_policy
    if vp.specific is not None:
        policy: dict = {"specific": {"versions": list(vp.specific)}}
    elif vp.all:
        policy = {"all": {}}
    else:
        policy = {"latest": {"num_versions": vp.latest or 1}}
    doc: dict[str, Any] = {
        "name": config.name,
        "platform": PLATFORMS[config.backend],
        "backend": _TRITON_BACKENDS[config.backend],
        "version_policy": policy,
        "max_batch_size": config.max_batch_size,
        "input": inputs,
        "output": outputs,
        "batch_input": [],
        "batch_output": [],
    }
    db = config.dynamic_batching
    if db is not None:
        doc["dynamic_batching"] = {
            "preferred_batch_size": list(db.preferred_batch_size),
            "max_queue_delay_microseconds": db.max_queue_delay_microseconds,
            "preserve_ordering": False,
            "priority_levels": db.priority_levels,
            "default_priority_level": db.default_priority_level,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": db.default_timeout_microseconds,
                "allow_timeout_override": True,
                "max_queue_size": db.max_queue_size,
            },
            "priority_queue_policy": {},
        }
    ig = config.instance_group
    doc["instance_group"] = [{"name": f"{config.name}_0", "kind": f"KIND_{ig.kind}", "count": ig.count,
                              "gpus": [], "secondary_devices": [], "profile": [], "passive": False,
                              "host_policy": ""}]
    doc["default_model_filename"] = _MODEL_FILENAMES[config.backend]
    doc["cc_model_filenames"] = {}
    doc["metric_tags"] = {}
    doc["parameters"] = {k: {"string_value": v} for k, v in config.parameters.items()}
    doc["model_warmup"] = []
    doc["model_transaction_policy"] = {"decoupled": False}
    return doc
