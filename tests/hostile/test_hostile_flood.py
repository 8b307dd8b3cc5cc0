"""Floods from one hostile client while a well-behaved client is measured (the `good_client`
fixture fails the test if its p99 passes P99_BOUND_S or any answer STALL_BOUND_S; the JSON
flood also bounds its p50).

* back-to-back big JSON bodies (frontend fix: large JSON was parsed on the event loop; 60 MB
  bodies moved another client's p50 from 0.7 ms to 561 ms);
* requests whose values the backend rejects at run time, concurrently with valid ones to the
  same model: only they fail, with 400 (before: each failed its whole batch with 500).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _flood(port: int, body: bytes, seconds: float) -> list[int]:
    statuses: list[int] = []
    stop = time.monotonic() + seconds
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.monotonic() < stop:
        try:
            conn.request("POST", "/v2/models/mlp/infer", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        except OSError:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()
    return statuses


def test_back_to_back_big_json_bodies_do_not_stall_other_clients(server, good_client):
    """frontend fix. ~60 MB bodies (NaN in them: the slow fallback parser) whose data does not
    fit the declared shape: each is refused (4xx), and the well-behaved client's p99 stays under
    the bound meanwhile."""
    n = 15_000_000
    body = ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[NaN,'
            + ",".join(["0.5"] * n) + "]}]}").encode()
    box: list = []
    t = threading.Thread(target=lambda: box.append(_flood(server.http_port, body, 4.0)), daemon=True)
    t.start()
    t.join(120)
    lat = sorted(good_client.latencies)
    assert box and box[0], "the flood got no answer"
    assert all(400 <= s < 500 for s in box[0]), sorted(set(box[0]))
    # Quiet, the good client's p50 is about a millisecond; a loop blocked by each parse made it
    # 330 ms here (561 ms in the issue). 100 ms leaves a busy machine plenty of slack.
    assert lat[len(lat) // 2] < 0.1, f"p50 {lat[len(lat) // 2] * 1e3:.0f} ms during the JSON flood"


def test_values_the_backend_rejects_fail_alone_while_valid_requests_flow(server, good_client):
    """The gather model (ONNX Runtime's Gather) fails at run time on an index out of range: 1 in
    4 requests carries one; all requests go concurrently, so bad and good share batches."""
    table = np.arange(15, dtype=np.float32).reshape(5, 3)

    def one(k: int) -> tuple[int, int, bytes]:
        i = 7 if k % 4 == 0 else k % 5
        doc = {"inputs": [{"name": "idx", "datatype": "INT64", "shape": [1, 1], "data": [i]}]}
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            conn.request("POST", "/v2/models/gather/infer", body=json.dumps(doc))
            r = conn.getresponse()
            return i, r.status, r.read()
        finally:
            conn.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(400), timeout=120))
    for i, status, data in results:
        if i == 7:
            assert status == 400, data[:300]
        else:
            assert status == 200, data[:300]
            assert json.loads(data)["outputs"][0]["data"] == table[i].tolist()
