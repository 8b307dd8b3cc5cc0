"""What the online bench sends: the server's model metadata, real input data, encoded requests.

The server is asked for the model's metadata (inputs, datatypes, shapes) and, where it has one,
its configuration (max_batch_size); the data are checked against that exactly (a float64 array
for an FP32 input is an error naming both, never a silent cast). Requests are encoded once, here,
and the workers only replay the bytes. Before any load, one request of each kind is sent and its
answer decoded, so a wrong model name, a mismatched input or a broken server is one clear error
instead of a run full of failures.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TensorSpec
from ..errors import DataError, InputError, UsageError
from ..repository import SAMPLES, model_file_sha256

MAX_PAYLOADS = 64
"""Distinct requests built from the data; workers cycle through them."""
SYNTHETIC_SAMPLES = 16


@dataclass
class Target:
    url: str
    protocol: str
    host: str
    port: int
    model: str
    version: str | None = None

    @property
    def model_path(self) -> str:
        m = urllib.parse.quote(self.model, safe="")
        return f"/v2/models/{m}" + (f"/versions/{urllib.parse.quote(self.version, safe='')}" if self.version else "")


def parse_target(url: str, model: str, version: str | None) -> Target:
    """`http://host:port` (HTTP/REST), `grpc://host:port` (gRPC); `host:port` means HTTP."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "grpc"):
        hint = "TLS is not supported by the load generator; bench a plain-text port" if scheme in ("https", "grpcs") \
            else "use http://HOST:PORT or grpc://HOST:PORT"
        raise UsageError(f"unsupported URL scheme {parts.scheme!r}", value=url, origin="--url", hint=hint)
    try:
        port = parts.port
    except ValueError:
        raise UsageError("the URL's port is not a number in 1..65535", value=url, origin="--url") from None
    if not parts.hostname:
        raise UsageError("the URL names no host", value=url, origin="--url", hint="e.g. http://127.0.0.1:8000")
    if parts.path not in ("", "/"):
        raise UsageError("give the server's base URL only (the model goes in --model)", value=url, origin="--url")
    if version is not None and (not version.isascii() or not version.isdigit()):
        raise UsageError("a model version is a positive integer", value=version, origin="--version")
    return Target(url=url, protocol=scheme, host=parts.hostname, port=port or (8001 if scheme == "grpc" else 8000),
                  model=model, version=version)


# ---------------------------------------------------------------------------------------------
# Metadata


@dataclass
class ModelInfo:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[dict]
    max_batch_size: int
    """From the model configuration when the server has that extension; otherwise 1+ when every
    input's first dimension is -1 (then the model batches), else 0."""
    batch_source: str

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0


def _unreachable(target: Target, reason: str) -> InputError:
    return InputError(f"cannot reach the server: {reason}", value=target.url, origin="--url",
                      hint="is it running and listening there? e.g. `serve-kit serve REPO`")


def _http_get(target: Target, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise _unreachable(target, getattr(e, "strerror", None) or str(e) or type(e).__name__) from None
    finally:
        conn.close()


def _message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("error", body[:300].decode("utf-8", "replace")))
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", "replace")


def fetch_model_info(target: Target, timeout: float = 10.0) -> ModelInfo:
    if target.protocol == "grpc":
        meta, config = _grpc_metadata(target, timeout)
    else:
        status, body = _http_get(target, target.model_path, timeout)
        if status == 404:
            raise _unknown_model(target, _message(body), _http_models(target, timeout))
        if status != 200:
            raise InputError(f"the server answered {status} to the model metadata request: {_message(body)}",
                             value=target.model, origin=target.url + target.model_path)
        try:
            meta = json.loads(body)
        except ValueError:
            raise InputError("the server's model metadata is not JSON", origin=target.url + target.model_path) \
                from None
        status, body = _http_get(target, f"/v2/models/{urllib.parse.quote(target.model, safe='')}/config", timeout)
        config = None
        if status == 200:
            try:
                config = json.loads(body)
            except ValueError:
                config = None
    return _model_info(target, meta, config)


def _model_info(target: Target, meta: dict, config: dict | None) -> ModelInfo:
    try:
        inputs = [TensorSpec(name=t["name"], datatype=t["datatype"], shape=[int(d) for d in t["shape"]])
                  for t in meta["inputs"]]
        outputs = [dict(t) for t in meta.get("outputs", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"the server's model metadata is malformed ({type(e).__name__}: {e})",
                         value=target.model, origin=target.url) from None
    if not inputs:
        raise InputError("the server's model metadata lists no inputs", value=target.model, origin=target.url)
    if config is not None and isinstance(config.get("max_batch_size"), (int, str)):
        mbs = int(config["max_batch_size"])
        source = "model config"
    else:
        mbs = 1 if all(t.shape and t.shape[0] == -1 for t in inputs) else 0
        source = "metadata shapes (no model config extension)"
    return ModelInfo(name=str(meta.get("name", target.model)), versions=[str(v) for v in meta.get("versions", [])],
                     platform=str(meta.get("platform", "")), inputs=inputs, outputs=outputs, max_batch_size=mbs,
                     batch_source=source)


def _http_models(target: Target, timeout: float) -> list[str] | None:
    try:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
        conn.request("POST", "/v2/repository/index", body=b"{}", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            return None
        return sorted({m["name"] for m in json.loads(body) if m.get("state", "READY") == "READY"})
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        return None


def _unknown_model(target: Target, message: str, models: list[str] | None) -> InputError:
    hint = f"models served there: {', '.join(models) or 'none'}" if models is not None else \
        "check the name (and --version) against the server's repository"
    what = f"model {target.model!r}" + (f" version {target.version}" if target.version else "")
    return InputError(f"{what} is not served at {target.url}: {message}", value=target.model, origin="--model",
                      hint=hint)


def _grpc_channel(target: Target):
    import grpc

    return grpc.insecure_channel(f"{target.host}:{target.port}",
                                 options=[("grpc.max_send_message_length", -1),
                                          ("grpc.max_receive_message_length", -1)])


def _grpc_metadata(target: Target, timeout: float) -> tuple[dict, dict | None]:
    import grpc
    from google.protobuf import json_format

    from ..runtime.proto import grpc_service_pb2 as pb
    from ..runtime.proto import grpc_service_pb2_grpc as pb_grpc

    with _grpc_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise _unreachable(target, f"no gRPC connection within {timeout:.0f} s") from None
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=target.model, version=target.version or ""),
                                      timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                models = None
                try:
                    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=timeout)
                    models = sorted({m.name for m in index.models})
                except grpc.RpcError:
                    pass
                raise _unknown_model(target, e.details() or "NOT_FOUND", models) from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise _unreachable(target, e.details() or "UNAVAILABLE") from None
            raise InputError(f"the server answered {e.code().name} to ModelMetadata: {e.details()}",
                             value=target.model, origin=target.url) from None
        doc = {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
               "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
               "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs]}
        config = None
        try:
            cfg = stub.ModelConfig(pb.ModelConfigRequest(name=target.model, version=target.version or ""),
                                   timeout=timeout)
            config = json_format.MessageToDict(cfg.config, preserving_proto_field_name=True)
            config.setdefault("max_batch_size", 0)
        except grpc.RpcError:
            pass
    return doc, config


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class InputData:
    """Samples to send: one entry per request for a non-batching model, rows otherwise."""

    arrays: dict[str, np.ndarray]
    origin: str
    synthetic: bool
    sha256: str
    model_hashes: dict[str, str] = field(default_factory=dict)
    """sha256 of the model files, when the data came from a repository's version."""

    @property
    def samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def describe(self) -> dict[str, Any]:
        return {"origin": self.origin, "synthetic": self.synthetic, "samples": self.samples, "sha256": self.sha256,
                "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in self.arrays.items()}}


def _sample_specs(info: ModelInfo) -> list[TensorSpec]:
    """Specs whose first dimension indexes samples: a non-batching model's tensors get one."""
    if info.batching:
        return list(info.inputs)
    return [TensorSpec(name=t.name, datatype=t.datatype, shape=[-1, *t.shape]) for t in info.inputs]


def repository_samples(path: Path, model: str, version: str | None
                       ) -> tuple[dict[str, Any], str, dict[str, str]] | None:
    """The stored sample inputs of a repository (root, model folder or version folder), where
    they came from, and the model's file hash from that version's manifest; None when `path` is
    no repository. Read through the repository's checks (paths, sizes, no unpickling)."""
    from ..errors import RepositoryError
    from ..repository import Repository

    path = Path(path)
    if (path / SAMPLES).is_file() and (path / "manifest.json").is_file():
        repo, name, v = Repository(path.parent.parent), path.parent.name, path.name
    else:
        if (path / model / "config.yaml").is_file():
            repo, name = Repository(path), model
        elif (path / "config.yaml").is_file():
            repo, name = Repository(path.parent), path.name
        else:
            return None
        v = version
    try:
        numbers = repo.version_numbers(name)
        if not numbers:
            raise DataError("the repository's model has no versions", value=name, origin="--data")
        try:
            number = int(v) if v else numbers[-1]
        except ValueError:
            raise DataError("the version is not a number", value=v, origin="--data") from None
        if number not in numbers:
            raise DataError(f"the repository has no version {number} of {name!r}", value=name, origin="--data",
                            hint=f"versions: {', '.join(map(str, numbers))}")
        info = repo.version(name, number)
        if info.problems:
            raise DataError(f"{name}/{number}: " + "; ".join(info.problems), origin="--data",
                            hint="`serve-kit inspect` shows every problem")
        read = repo.read_samples(info, inputs_only=True)
    except RepositoryError as e:
        raise DataError(e.message, value=e.value, origin=f"--data ({name}/{v or 'latest'})", hint=e.hint) from None
    if read is None:
        raise DataError("the repository version has no samples.npz (written by `serve-kit optimize`)",
                        value=f"{name}/{number}", origin="--data", hint="give a .npz/.npy file with --data instead")
    hashes: dict[str, str] = {}
    manifest = info.manifest or {}
    sha = model_file_sha256(manifest)
    if sha and isinstance(manifest.get("model_file"), str):
        hashes[f"{name}/{number}/{manifest['model_file']}"] = sha
    return read[0], f"{name}/{number}/{SAMPLES}", hashes


def load_data(data: Path | None, synthetic: bool, info: ModelInfo, model: str, version: str | None,
              seed: int = 0) -> InputData:
    from ..optimize import calibration as cal

    specs = _sample_specs(info)
    if data is None:
        if not synthetic:
            raise UsageError("no input data: give --data (a .npz/.npy file, or a model repository whose "
                             "samples.npz holds real inputs) or ask for random inputs with --synthetic",
                             origin="serve-kit bench",
                             hint="e.g. --data model-repository (optimize stores held-out samples there)")
        ds = cal.synthetic(specs, SYNTHETIC_SAMPLES, seed)
        return InputData(ds.inputs, ds.origin, True, ds.sha256())
    if synthetic:
        raise UsageError("--data and --synthetic exclude each other", origin="--synthetic")
    data = Path(data)
    if not data.exists():
        raise DataError("data path not found", value=str(data), origin="--data")
    hashes: dict[str, str] = {}
    repo = repository_samples(data, model, version) if data.is_dir() else None
    if repo is not None:
        arrays, origin, hashes = repo
    elif data.is_dir() or data.suffix in (".npz", ".npy"):
        arrays, origin = cal.load_arrays(data, specs, "labels")
        arrays.pop("labels", None)
        # samples.npz written by optimize, given as a file
        if any(k.startswith("input.") for k in arrays):
            arrays = {k[len("input."):]: v for k, v in arrays.items() if k.startswith("input.")}
    else:
        raise DataError("data must be a .npz or .npy file, a folder of them, or a model repository",
                        value=str(data), origin="--data")
    ds = cal.to_dataset(arrays, specs, "labels", origin)
    return InputData(ds.inputs, origin, False, ds.sha256(), hashes)


# ---------------------------------------------------------------------------------------------
# Requests


def request_inputs(data: InputData, info: ModelInfo, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The inputs of each distinct request: consecutive rows (cycling through the data)."""
    n = data.samples
    if not info.batching:
        count = min(MAX_PAYLOADS, n)
        return [{k: np.ascontiguousarray(v[i]) for k, v in data.arrays.items()} for i in range(count)]
    count = min(MAX_PAYLOADS, max(1, -(-n // batch_size)))
    out = []
    for j in range(count):
        idx = (np.arange(batch_size) + j * batch_size) % n
        out.append({k: np.ascontiguousarray(v[idx]) for k, v in data.arrays.items()})
    return out


def http_requests(target: Target, info: ModelInfo, inputs: list[dict[str, np.ndarray]], binary: bool) -> list[bytes]:
    from ..runtime import protocol

    datatypes = {t.name: t.datatype for t in info.inputs}
    out = []
    path = target.model_path + "/infer"
    for arrays in inputs:
        body, headers = protocol.encode_infer_request(arrays, binary=binary, binary_output=binary,
                                                      datatypes=datatypes)
        head = [f"POST {path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        out.append(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    return out


def grpc_requests(target: Target, info: ModelInfo, inputs: list[dict[str, np.ndarray]]) -> list[bytes]:
    from ..runtime import protocol
    from ..runtime.proto import grpc_service_pb2 as pb

    datatypes = {t.name: t.datatype for t in info.inputs}
    out = []
    for arrays in inputs:
        req = pb.ModelInferRequest(model_name=target.model, model_version=target.version or "")
        for name, arr in arrays.items():
            req.inputs.append(pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatypes[name],
                                                                     shape=list(arr.shape)))
            req.raw_input_contents.append(protocol.array_to_bytes(arr, datatypes[name]))
        out.append(req.SerializeToString())
    return out


def payload_sha256(payloads: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in payloads:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def preflight(target: Target, payload: bytes, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request and decode its answer; a failure is an error naming the server's reason."""
    if target.protocol == "grpc":
        return _grpc_preflight(target, payload, timeout)
    head, _, body = payload.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers.pop("Host", None)
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        status = resp.status
        header_length = resp.getheader("Inference-Header-Content-Length")
    except socket.timeout:
        raise InputError(f"the server did not answer a first inference request within {timeout:.0f} s",
                         value=target.model, origin=target.url) from None
    except (OSError, http.client.HTTPException) as e:
        raise _unreachable(target, getattr(e, "strerror", None) or str(e) or type(e).__name__) from None
    finally:
        conn.close()
    if status != 200:
        raise DataError(f"the server refused a request built from the data ({status}): {_message(raw)}",
                        value=target.model, origin=target.url + path,
                        hint="the data must match the model's inputs (names, datatypes, shapes)")
    return _decoded(raw, int(header_length) if header_length else None, target)


def _decoded(raw: bytes, header_length: int | None, target: Target) -> dict[str, Any]:
    from ..runtime import protocol
    from ..runtime.types import BadRequest

    try:
        resp = protocol.decode_infer_response(raw, header_length)
    except BadRequest as e:
        raise InputError(f"the server's inference response is malformed: {e.message}", value=target.model,
                         origin=target.url) from None
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in resp.outputs.items()}


def _grpc_preflight(target: Target, payload: bytes, timeout: float) -> dict[str, Any]:
    import grpc

    from ..runtime.proto import grpc_service_pb2 as pb

    with _grpc_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   response_deserializer=pb.ModelInferResponse.FromString)
        try:
            resp = call(payload, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise _unreachable(target, e.details() or "UNAVAILABLE") from None
            raise DataError(f"the server refused a request built from the data ({e.code().name}): {e.details()}",
                            value=target.model, origin=target.url,
                            hint="the data must match the model's inputs (names, datatypes, shapes)") from None
    return {o.name: {"shape": list(o.shape), "datatype": o.datatype} for o in resp.outputs}
