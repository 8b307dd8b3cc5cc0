"""`--smoke-test`: run the built image, wait until it is healthy, send each packaged model version its
stored evaluation samples (`samples.npz`: `input.<name>` and the reference's `reference.<name>`) over
HTTP (Open Inference Protocol, JSON), and compare the answers with the reference at the bar the
version was validated at: no output may be further from the reference than the worst error recorded
in its manifest over the whole evaluation set (plus float slack), and no sample's cosine lower than
the lowest recorded. The container is stopped and removed in every case.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..optimize.validate import compare_outputs
from ..repository import Repository, VersionInfo
from ..runtime.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request
from .context import GRPC_PORT, HTTP_PORT
from .engine import host_port, wait_health
from .errors import PackagingError, SmokeTestFailed

# Without a validation record (a version not written by optimize): FP32 export tolerances.
DEFAULT_MAX_ABS, DEFAULT_MIN_COSINE = 1e-3, 0.9999


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float = 30) -> tuple[bytes, str | None]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read(), r.headers.get(HEADER_LENGTH)
    except urllib.error.HTTPError as e:
        raise SmokeTestFailed(f"the image answered HTTP {e.code} to an inference: {e.read()[:300]!r}",
                              origin=url) from None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def compare(config: ModelConfig, manifest: dict, outputs: dict[str, np.ndarray],
            reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per output: max abs error and minimum per-sample cosine against the reference, the limits from
    the manifest's validation, and whether they hold."""
    recorded = ((manifest.get("validation") or {}).get("errors")) or {}
    result = {}
    for spec in config.outputs:
        if spec.name not in reference:
            continue
        ref = reference[spec.name]
        got = outputs.get(spec.name)
        if got is None:
            result[spec.name] = {"passed": False, "reason": "missing from the answer"}
            continue
        # The same measures as optimize's validation, whose recorded values are the limits here.
        errors = compare_outputs({spec.name: ref}, {spec.name: got.reshape(ref.shape)})[spec.name]
        rec = recorded.get(spec.name) or {}
        max_abs_limit = rec.get("max_abs_error", DEFAULT_MAX_ABS) * (1 + 1e-3) + 1e-5
        max_abs, min_cos = errors["max_abs_error"], errors["cosine_min"]
        # A one-element output has no cosine (None): the max abs error is its whole check.
        recorded_cos = rec.get("cosine_min", DEFAULT_MIN_COSINE)
        min_cos_limit = None if min_cos is None or recorded_cos is None else recorded_cos - 1e-5
        cos_ok = min_cos_limit is None or min_cos >= min_cos_limit
        result[spec.name] = {"max_abs_error": max_abs, "cosine_min": min_cos, "max_abs_limit": max_abs_limit,
                             "cosine_min_limit": min_cos_limit,
                             "passed": bool(np.isfinite(max_abs) and max_abs <= max_abs_limit and cos_ok)}
    return result


def _fmt_cos(value: float | None) -> str:
    return "none (one element)" if value is None else f"{value:.6f}"


def infer(base_url: str, config: ModelConfig, version: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One inference with binary tensors (the exact bytes both ways), through the runtime's own codec."""
    body, headers = encode_infer_request({s.name: inputs[s.name] for s in config.inputs}, binary=True,
                                         binary_output=True, datatypes={s.name: s.datatype for s in config.inputs})
    raw, header_length = _post(f"{base_url}/v2/models/{config.name}/versions/{version}/infer", body, headers)
    return decode_infer_response(raw, int(header_length) if header_length else None).outputs


def run_smoke_test(client, image_id: str, configs: dict[str, ModelConfig], versions: list[VersionInfo],
                   timeout: float = 120, log=lambda m: None) -> dict[str, Any]:
    """Run the image, check every packaged version, stop and remove the container. Raises
    SmokeTestFailed (exit 3) on a wrong answer, PackagingError when the image does not start."""
    from docker.errors import APIError

    t0 = time.monotonic()
    try:
        container = client.containers.run(image_id, detach=True, auto_remove=False,
                                          ports={f"{HTTP_PORT}/tcp": ("127.0.0.1", None),
                                                 f"{GRPC_PORT}/tcp": ("127.0.0.1", None)},
                                          labels={"serve-kit.smoke-test": "1"})
    except APIError as e:
        raise PackagingError(f"the image could not be started: {e.explanation or e}", value=image_id) from None
    result: dict[str, Any] = {"container": container.short_id, "models": []}
    try:
        url = f"http://127.0.0.1:{host_port(container, HTTP_PORT)}"
        result["grpc_port"] = host_port(container, GRPC_PORT)
        deadline = time.monotonic() + timeout
        while not _ready(url):
            container.reload()
            if container.status in ("exited", "dead"):
                raise PackagingError("the image exited before it was ready: " + _logs(container), value=image_id)
            if time.monotonic() > deadline:
                raise PackagingError(f"the image was not ready within {timeout:.0f} s: " + _logs(container),
                                     value=image_id)
            time.sleep(0.25)
        result["ready_seconds"] = round(time.monotonic() - t0, 2)
        log(f"ready after {result['ready_seconds']} s; checking the HEALTHCHECK")
        # Docker runs the first probe one interval after the start: within ~interval + timeout.
        health = wait_health(container, timeout=30)
        result["health"] = health
        if health != "healthy":
            raise PackagingError(f"Docker reports the container {health}, not healthy: " + _logs(container),
                                 value=image_id, hint="the image's HEALTHCHECK probes /v2/health/ready")
        failed = []
        for v in versions:
            config = configs[v.model]
            # The same checked, bounded reader the server's warm-up uses (samples_file is a
            # repository path like any other).
            samples = Repository(v.path.parent.parent).read_samples(v)
            if samples is None:
                result["models"].append({"model": v.model, "version": v.version, "skipped": "no samples.npz"})
                continue
            inputs, reference = samples
            outputs = infer(url, config, v.version, inputs)
            checks = compare(config, v.manifest or {}, outputs, reference)
            ok = all(c["passed"] for c in checks.values()) and bool(checks)
            result["models"].append({"model": v.model, "version": v.version, "samples": int(len(next(iter(inputs.values())))),
                                     "outputs": checks, "passed": ok})
            if not ok:
                failed.append(f"{v.model}/{v.version}: " + "; ".join(
                    f"{name}: max abs {c.get('max_abs_error', float('nan')):.3g} (limit {c.get('max_abs_limit', 0):.3g}), "
                    f"min cosine {_fmt_cos(c.get('cosine_min'))} (limit {_fmt_cos(c.get('cosine_min_limit'))})"
                    if "reason" not in c else f"{name}: {c['reason']}" for name, c in checks.items() if not c["passed"]))
        result["seconds"] = round(time.monotonic() - t0, 2)
        result["passed"] = not failed
        if failed:
            raise SmokeTestFailed("the image's answers do not match the repository's reference: " + " | ".join(failed),
                                  value=image_id, hint="nothing was pushed or registered")
        return result
    finally:
        try:
            container.stop(timeout=10)
        except APIError:
            pass
        try:
            container.remove(force=True)
        except APIError:
            pass


def _logs(container) -> str:
    try:
        text = container.logs(tail=20).decode(errors="replace").strip()
    except Exception:  # noqa: BLE001 - diagnostics only
        return "(no logs)"
    return " | ".join(text.splitlines()[-8:]) or "(no logs)"
