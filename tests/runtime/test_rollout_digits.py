"""`serve-kit rollout` on the real digits CNN under load, as a user runs it: version 2 retrained by
the same recipe (an equally good candidate) is promoted, version 3 trained on shuffled labels (the
`digits-cnn-shuffled` recipe) is rolled back at its first step, and both decision logs carry the
figures behind each decision."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading

import numpy as np
import pytest
import yaml

from rt_server import InProcessServer, cli_env, request, serve_kit_exe
from serve_kit.cli import main

TOKEN = "digits-rollout"


@pytest.fixture(scope="module")
def server(digits_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-rollout") / "repo"
    shutil.copytree(digits_repo, root)
    for recipe, extra in (("digits-cnn", []), ("digits-cnn-shuffled", ["--force"])):
        r = subprocess.run([serve_kit_exe(), "optimize", "--recipe", recipe, "-r", str(root), "-t", "onnx", *extra],
                           capture_output=True, text=True, env=cli_env())
        assert r.returncode == 0, r.stderr[-3000:]
    cfg_path = root / "digits" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["version_policy"] = {"all": True}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    srv = InProcessServer(root, management_token=TOKEN).start()
    with np.load(root / "digits" / "1" / "samples.npz") as f:
        images = f["input.input"]
    yield srv, images
    srv.stop()


class Load:
    """Two threads sending held-out digit images one at a time; records who answered each."""

    def __init__(self, port: int, images: np.ndarray):
        self.port, self.images = port, images
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.answers: list[str] = []
        self.failures = 0
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(2)]

    def _loop(self, i: int) -> None:
        n = i
        while not self.stop.is_set():
            x = self.images[n % len(self.images)][None]
            n += 2
            body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                           "data": x.ravel().tolist()}]}).encode()
            r = request(self.port, "POST", "/v2/models/digits/infer", body)
            with self.lock:
                if r.status == 200:
                    self.answers.append(r.headers.get("serve-kit-target"))
                else:
                    self.failures += 1
            self.stop.wait(0.002)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _rollout(capsys, port: int, candidate: str, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    try:
        main(["--json", "rollout", f"http://127.0.0.1:{port}", "--endpoint", "digits", "--candidate", candidate,
              "--champion", "digits:1", "--token", TOKEN, "--check-every", "0.5s", "--min-requests", "20",
              "--max-p99-ratio", "20", "--min-agreement", "0.95", *args])
        rc = 0
    except SystemExit as e:
        rc = e.code
    finally:
        from serve_kit.cli._common import state
        state.json, state.emitted = False, False
    return rc, json.loads(capsys.readouterr().out)


def _switch(port: int, version: int) -> None:
    r = request(port, "PUT", "/v2/routes/digits", json.dumps({"targets": [{"model": "digits", "version": version}]}).encode(),
                {"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200, r.body


def test_shuffled_label_canary_is_rolled_back_at_its_first_step(server, capsys, tmp_path):
    srv, images = server
    _switch(srv.port, 1)
    log = tmp_path / "bad.jsonl"
    with Load(srv.port, images) as load:
        rc, doc = _rollout(capsys, srv.port, "digits:3", "--steps", "5,25,50,100", "--interval", "3s",
                           "--log", str(log))
        answered = list(load.answers)
    assert rc == 3, doc
    assert doc["outcome"] == "rolled_back"
    last = doc["decisions"][-1]
    assert last["action"] == "rollback" and last["phase"] == "step 5%"
    figures = last["candidate_figures"]
    # About one digit in ten on the held-out set; the load replays the version's 8 stored samples,
    # on which it agrees on 3, and a check sees a few dozen draws of them.
    assert figures["agreement"] < 0.9, figures
    assert any("agreement" in r for r in last["reasons"])
    assert request(srv.port, "GET", "/v2/routes/digits").json()["targets"][0]["version"] == 1
    # It answered its first step's share, plus at most what one check period let through.
    share = answered.count("digits/3") / max(1, len(answered))
    assert share < 0.05 + 0.10, share
    assert load.failures == 0
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged[-1]["action"] == "rollback" and logged[-1]["candidate_figures"]["agreement"] < 0.9


def test_equally_good_retrained_candidate_is_promoted(server, capsys, tmp_path):
    srv, images = server
    _switch(srv.port, 1)
    log = tmp_path / "good.jsonl"
    with Load(srv.port, images) as load:
        rc, doc = _rollout(capsys, srv.port, "digits:2", "--shadow", "2s", "--steps", "25,100", "--interval", "2s",
                           "--log", str(log))
    assert rc == 0, doc
    assert doc["outcome"] == "promoted"
    assert [t["version"] for t in request(srv.port, "GET", "/v2/routes/digits").json()["targets"]] == [2]
    advanced = [d for d in doc["decisions"] if d["action"] == "advance"]
    assert [d["phase"] for d in advanced] == ["shadow", "step 25%", "step 100%"]
    assert advanced[0]["candidate_figures"]["agreement"] >= 0.99
    assert load.failures == 0 and "digits/2" in load.answers
    assert len(log.read_text().splitlines()) == len(doc["decisions"])
