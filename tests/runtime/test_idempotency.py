"""Idempotency-Key on a real server: a retry while the first attempt runs shares it, a retry after
it finished replays it, neither runs the model again nor is counted twice; misuse is refused."""

from __future__ import annotations

import json
import threading

import pytest

from rt_models import ProbeBackend, probe_config, write_probe
from rt_server import InProcessServer, request, wait_until

HANG = 7.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("idem")
    write_probe(root, probe_config("p"), hang_value=HANG)
    srv = InProcessServer(root).start()
    yield srv
    ProbeBackend.release.set()
    srv.stop()


def _port(srv) -> int:
    return int(srv.info["http"].rsplit(":", 1)[1])


def _body(x: list[float]) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}]}).encode()


def _requests_total(port: int) -> float:
    total = 0.0
    for line in request(port, "GET", "/metrics").body.decode().splitlines():
        if line.startswith('serve_kit_requests_total{model="p"'):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _calls_with(value: float) -> int:
    with ProbeBackend.lock:
        return sum(1 for c in ProbeBackend.calls if value in c["first"])


def test_a_retry_while_the_first_attempt_runs_shares_it(server):
    port = _port(server)
    ProbeBackend.reset()
    before = _requests_total(port)
    answers = []

    def call():
        answers.append(request(port, "POST", "/v2/models/p/infer", _body([HANG, 1, 2, 3]),
                               {"Idempotency-Key": "order-1"}, timeout=60))

    first = threading.Thread(target=call)
    first.start()
    assert wait_until(lambda: _calls_with(HANG) == 1, timeout=30)
    retry = threading.Thread(target=call)
    retry.start()
    retry.join(1.0)  # the retry waits on the running attempt, it does not run
    assert retry.is_alive() and _calls_with(HANG) == 1
    ProbeBackend.release.set()
    first.join(60)
    retry.join(60)
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].json()["outputs"] == answers[1].json()["outputs"]
    assert _calls_with(HANG) == 1
    assert _requests_total(port) - before == 1


def test_a_retry_after_success_is_replayed_not_counted(server):
    port = _port(server)
    ProbeBackend.reset()
    ProbeBackend.release.set()
    first = request(port, "POST", "/v2/models/p/infer", _body([5, 1, 2, 3]), {"Idempotency-Key": "order-2"})
    assert first.status == 200
    before, calls = _requests_total(port), len(ProbeBackend.calls)
    again = request(port, "POST", "/v2/models/p/infer", _body([5, 1, 2, 3]), {"Idempotency-Key": "order-2"})
    assert again.status == 200 and again.json()["outputs"] == first.json()["outputs"]
    assert len(ProbeBackend.calls) == calls and _requests_total(port) == before
    metrics = request(port, "GET", "/metrics").body.decode()
    assert 'serve_kit_idempotent_replays_total{endpoint="p"} 1' in metrics
    # Without the key, the same request runs again.
    assert request(port, "POST", "/v2/models/p/infer", _body([5, 1, 2, 3])).status == 200
    assert len(ProbeBackend.calls) == calls + 1


@pytest.mark.parametrize("key, body, status, words", [
    ("order-2", [6, 1, 2, 3], 422, "reused for a different request"),
    ("x" * 129, [1, 1, 2, 3], 400, "1 to 128 printable ASCII"),
    ("tab\there", [1, 1, 2, 3], 400, "printable ASCII"),
])
def test_misused_keys_are_refused(server, key, body, status, words):
    port = _port(server)
    ProbeBackend.release.set()
    request(port, "POST", "/v2/models/p/infer", _body([5, 1, 2, 3]), {"Idempotency-Key": "order-2"})
    r = request(port, "POST", "/v2/models/p/infer", _body(body), {"Idempotency-Key": key})
    assert r.status == status, r.body
    assert words in r.json()["error"]
