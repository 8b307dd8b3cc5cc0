"""HTTP driver: the route management API and /metrics of one or more replicas (stdlib urllib:
a handful of small JSON calls do not justify a new dependency)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from ..errors import InputError, ServeKitError
from . import analysis


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url if "://" in url else "http://" + url


class ServerError(ServeKitError):
    """A server refused a management call, or could not be reached."""


class Fleet:
    """Replica URLs that must hold the same route: a change goes to each, metrics are summed."""

    def __init__(self, urls: list[str], token: str | None = None, timeout: float = 10.0):
        if not urls:
            raise InputError("no server URL given", hint="serve-kit route show http://127.0.0.1:8000")
        self.urls = [_base(u) for u in urls]
        self.token = token if token is not None else os.environ.get("SERVE_KIT_MANAGEMENT_TOKEN")
        self.timeout = timeout

    def _call(self, url: str, method: str, path: str, body: Any = None, auth: bool = False) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"server unreachable: {getattr(e, 'reason', e)}", value=url,
                              origin=f"{method} {path}", hint="is `serve-kit serve` running at that address?") from None
        try:
            message = json.loads(text).get("error", text.decode(errors="replace"))
        except (ValueError, AttributeError):
            message = text.decode(errors="replace")
        hint = {403: "start the server with --enable-management --management-token TOKEN",
                401: "pass --token or set SERVE_KIT_MANAGEMENT_TOKEN to the server's management token",
                409: "the route changed meanwhile (another rollout?); look at it with `serve-kit route show`"}.get(status)
        raise ServerError(f"{url} answered {status}: {message}", origin=f"{method} {path}", hint=hint)

    def _json(self, url: str, method: str, path: str, body: Any = None, auth: bool = False) -> Any:
        return json.loads(self._call(url, method, path, body, auth)[1])

    def routes(self) -> list[dict]:
        return self._json(self.urls[0], "GET", "/v2/routes")["routes"]

    def route(self, endpoint: str) -> dict:
        return self._json(self.urls[0], "GET", f"/v2/routes/{endpoint}")

    def set_route(self, endpoint: str, spec: dict, *, cas: bool = True) -> list[dict]:
        """PUT the route on every replica; with `cas`, compare-and-set against each replica's current
        generation so a concurrent change is refused (409) rather than overwritten."""
        states = []
        for url in self.urls:
            body = {k: v for k, v in spec.items() if k not in ("generation", "source", "updated")}
            body["endpoint"] = endpoint
            for t in body.get("targets", []):
                t.pop("share", None)
            if cas:
                body["if_generation"] = self._json(url, "GET", f"/v2/routes/{endpoint}")["generation"]
            states.append(self._json(url, "PUT", f"/v2/routes/{endpoint}", body, auth=True))
        return states

    def clear_route(self, endpoint: str) -> list[dict]:
        return [self._json(u, "DELETE", f"/v2/routes/{endpoint}", auth=True) for u in self.urls]

    def scrape(self) -> dict:
        return analysis.combine(analysis.parse(self._call(u, "GET", "/metrics")[1].decode()) for u in self.urls)


def parse_target(text: str, origin: str = "target") -> tuple[str, int | None]:
    """`digits:2` -> ("digits", 2); `digits` -> ("digits", None) (its latest version)."""
    from ..errors import UsageError

    model, _, version = text.partition(":")
    if not model or (version and not version.isdigit()):
        raise UsageError("a target is MODEL or MODEL:VERSION", value=text, origin=origin, hint="e.g. digits:2")
    return model, int(version) if version else None


def target_dict(model: str, version: int | None, **extra) -> dict:
    d: dict = {"model": model}
    if version is not None:
        d["version"] = version
    d.update(extra)
    return d
