"""The real digits CNN: an identical version 2 is promoted, a version 3 trained on shuffled labels
is rolled back at its first step on live agreement, under a background load of real images."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np

from digits_variants import copy_version, shuffled_labels_version
from rt_server import InProcessServer, request
from test_rollout_server import TOKEN, cli


def _load(port, stop, answers, lock):
    from serve_kit.recipes import digits

    x = digits.dataset()["evaluation"]["input"]
    i = 0
    while not stop.is_set():
        row = x[i % len(x)][None]
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(row.shape),
                                       "data": row.ravel().tolist()}]}).encode()
        r = request(port, "POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})
        with lock:
            answers.append(r.headers.get("serve-kit-target") if r.status == 200 else f"error {r.status}")
        i += 1
        stop.wait(0.005)


def test_digits_rollouts(digits_repo, tmp_path, capsys):
    root = tmp_path / "repo"
    shutil.copytree(digits_repo, root)
    cfg_path = root / "digits" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text() + "\nversion_policy: {all: true}\n")
    assert copy_version(root) == 2
    assert shuffled_labels_version(root) == 3
    srv = InProcessServer(root, management_token=TOKEN).start()
    url = f"http://{srv.url}"
    try:
        assert cli(["route", "switch", url, "digits", "digits:1", "--token", TOKEN], capsys)[0] == 0
        gate = ["--steps", "10,50,100", "--interval", "2s", "--check-every", "0.5s", "--min-requests", "10",
                "--min-agreement", "0.9", "--max-p99-ratio", "20", "--token", TOKEN]
        stop, answers, lock = threading.Event(), [], threading.Lock()
        threads = [threading.Thread(target=_load, args=(srv.port, stop, answers, lock), daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            rc, bad, _ = cli(["rollout", url, "--endpoint", "digits", "--candidate", "digits:3",
                              "--log", str(tmp_path / "bad.json"), *gate], capsys)
            with lock:
                during_bad = list(answers)
            rc_good, good, _ = cli(["rollout", url, "--endpoint", "digits", "--candidate", "digits:2",
                                    "--log", str(tmp_path / "good.json"), *gate], capsys)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert rc == 3 and bad["outcome"] == "rolled_back", bad
        last = json.loads((tmp_path / "bad.json").read_text().splitlines()[-1])
        assert last["action"] == "rollback" and last["phase"] == "step 10%"
        assert last["candidate_figures"]["agreement"] < 0.9 and last["candidate_figures"]["requests"] >= 10
        share = during_bad.count("digits/3") / len(during_bad)
        assert share < 0.10 + 0.15, share  # its first step's weight plus what one check period let through
        assert rc_good == 0 and good["outcome"] == "promoted", good
        figures = [json.loads(line)["candidate_figures"] for line in (tmp_path / "good.json").read_text().splitlines()]
        assert all(f["agreement"] in (None, 1.0) for f in figures) and figures[-1]["requests"] >= 10
        assert request(srv.port, "GET", "/v2/routes/digits").json()["targets"][0]["version"] == 2
        assert not [a for a in answers if a.startswith("error")]
    finally:
        srv.stop()
