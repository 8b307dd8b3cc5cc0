"""`serve-kit route` and `serve-kit rollout` against real servers with real ONNX models: versions 1
and 2 of `m` are the same MLP (2 promotes), version 3 another one whose answers disagree with it
(rolled back on live agreement); the CLI's errors for each refusal."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from rt_models import config, mlp_onnx, mlp_weights, write_version
from rt_server import InProcessServer, request
from serve_kit.cli import main

TOKEN = "rollout-token"


def _repo(root: Path) -> Path:
    cfg = config("m", version_policy={"all": True})
    w1, w2 = mlp_weights(4, 16, 4, seed=0)
    write_version(root, cfg, mlp_onnx(w1, w2))
    write_version(root, cfg, mlp_onnx(w1, w2))
    v1, v2 = mlp_weights(4, 16, 4, seed=5)
    write_version(root, cfg, mlp_onnx(v1, v2))
    return root


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two replicas of the same repository (the rollout drives both and sums their metrics)."""
    repo = _repo(tmp_path_factory.mktemp("rollout"))
    a = InProcessServer(repo, management_token=TOKEN).start()
    b = InProcessServer(repo, management_token=TOKEN).start()
    yield a, b
    a.stop()
    b.stop()


def cli(args: list[str], capsys, json_output: bool = True) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    try:
        main(["--json", *args] if json_output else args)
        rc = 0
    except SystemExit as e:
        rc = e.code
    finally:
        from serve_kit.cli._common import state
        state.json, state.emitted = False, False
    o = capsys.readouterr()
    return rc, (json.loads(o.out) if o.out.strip() and json_output else o.out or None), o.err


class Load:
    """A bounded background load loop (2 threads, a pause between requests) on both replicas;
    records who answered each request (the serve-kit-target header)."""

    def __init__(self, ports):
        self.ports, self.stop, self.answers, self.failures = ports, threading.Event(), [], 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(2)]

    def _loop(self, i):
        rng = np.random.default_rng(i)
        n = 0
        while not self.stop.is_set():
            x = rng.normal(size=(1, 4)).astype(np.float32).tolist()
            body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}]}).encode()
            r = request(self.ports[n % 2], "POST", "/v2/models/m/infer", body, {"Content-Type": "application/json"})
            n += 1
            with self.lock:
                if r.status == 200:
                    self.answers.append(r.headers.get("serve-kit-target"))
                else:
                    self.failures += 1
            self.stop.wait(0.005)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _urls(servers):
    return [f"http://{servers[0].url}", "--url", f"http://{servers[1].url}"]


def _reset(servers, capsys):
    rc, doc, _ = cli(["route", "switch", *_urls(servers), "m", "m:1", "--token", TOKEN], capsys)
    assert rc == 0, doc


def test_route_commands_change_every_replica(servers, capsys):
    rc, doc, _ = cli(["route", "split", *_urls(servers), "m", "m:1=90", "m:2=10", "--sticky-header", "x-user",
                      "--token", TOKEN], capsys)
    assert rc == 0
    for srv in servers:
        state = request(srv.port, "GET", "/v2/routes/m").json()
        assert [(t["version"], t["weight"]) for t in state["targets"]] == [(1, 90), (2, 10)]
        assert state["sticky"] == {"header": "x-user"} and state["source"] == "api"
    rc, doc, _ = cli(["route", "shadow", *_urls(servers), "m", "m:3", "--percent", "50", "--token", TOKEN], capsys)
    assert rc == 0 and doc[0]["shadow"]["version"] == 3 and len(doc[0]["targets"]) == 2
    rc, doc, _ = cli(["route", "show", f"http://{servers[1].url}", "m"], capsys)
    assert rc == 0 and {k: doc["shadow"][k] for k in ("model", "version", "percent")} == {"model": "m", "version": 3, "percent": 50.0}
    rc, doc, _ = cli(["route", "clear", *_urls(servers), "--token", TOKEN, "m"], capsys)
    assert rc == 0 and all(d["source"] != "api" for d in doc)


def test_cli_errors_change_nothing(servers, tmp_path, capsys):
    _reset(servers, capsys)
    url = f"http://{servers[0].url}"
    before = request(servers[0].port, "GET", "/v2/routes/m").json()["generation"]
    rc, doc, err = cli(["route", "switch", url, "m", "m:2", "--token", "wrong"], capsys)
    assert rc == 1 and "401" in doc["message"] and "SERVE_KIT_MANAGEMENT_TOKEN" in doc["hint"]
    rc, doc, err = cli(["route", "switch", url, "m", "m:9", "--token", TOKEN], capsys)
    assert rc == 1 and "400" in doc["message"]
    rc, doc, err = cli(["route", "split", url, "m", "m:1=x", "--token", TOKEN], capsys)
    assert rc == 2
    rc, doc, err = cli(["rollout", url, "--endpoint", "m", "--candidate", "m:2", "--steps", "50,10",
                        "--token", TOKEN], capsys)
    assert rc == 2
    assert request(servers[0].port, "GET", "/v2/routes/m").json()["generation"] == before
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    rc, doc, err = cli(["route", "show", f"http://127.0.0.1:{free}"], capsys)
    assert rc == 1 and "unreachable" in doc["message"]


def test_management_disabled_is_refused(tmp_path, capsys):
    srv = InProcessServer(_repo(tmp_path)).start()
    try:
        rc, doc, _ = cli(["route", "switch", f"http://{srv.url}", "m", "m:2", "--token", TOKEN], capsys)
        assert rc == 1 and "403" in doc["message"] and "--enable-management" in doc["hint"]
    finally:
        srv.stop()


def test_identical_candidate_is_promoted(servers, tmp_path, capsys):
    _reset(servers, capsys)
    log = tmp_path / "decisions.json"
    with Load([s.port for s in servers]) as load:
        rc, doc, _ = cli(["rollout", *_urls(servers), "--endpoint", "m", "--candidate", "m:2", "--shadow", "1s",
                          "--steps", "50,100", "--interval", "1s", "--check-every", "0.5s", "--min-requests", "10",
                          "--min-agreement", "0.99", "--max-p99-ratio", "20", "--log", str(log), "--token", TOKEN],
                         capsys)
    assert rc == 0, doc
    assert doc["outcome"] == "promoted" and doc["champion"] == "m:1"
    for srv in servers:
        targets = request(srv.port, "GET", "/v2/routes/m").json()["targets"]
        assert [(t["model"], t["version"]) for t in targets] == [("m", 2)]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [d["phase"] for d in lines if d["action"] == "advance"] == ["shadow", "step 50%", "step 100%"]
    shadow = next(d for d in lines if d["phase"] == "shadow" and d["action"] == "advance")
    assert shadow["candidate_figures"]["agreement"] == 1.0 and shadow["candidate_figures"]["requests"] >= 10
    assert load.failures == 0 and "m/2" in load.answers


def test_worse_candidate_is_rolled_back(servers, tmp_path, capsys):
    _reset(servers, capsys)
    log = tmp_path / "decisions.json"
    with Load([s.port for s in servers]) as load:
        rc, doc, _ = cli(["rollout", *_urls(servers), "--endpoint", "m", "--candidate", "m:3",
                          "--steps", "10,50,100", "--interval", "2s", "--check-every", "0.5s", "--min-requests", "10",
                          "--min-agreement", "0.9", "--max-p99-ratio", "20", "--log", str(log), "--token", TOKEN],
                         capsys)
        after = len(load.answers)
    assert rc == 3, doc
    assert doc["outcome"] == "rolled_back"
    last = doc["decisions"][-1]
    assert last["action"] == "rollback" and last["phase"] == "step 10%"
    assert last["candidate_figures"]["agreement"] < 0.9 and any("agreement" in r for r in last["reasons"])
    for srv in servers:
        targets = request(srv.port, "GET", "/v2/routes/m").json()["targets"]
        assert [(t["model"], t["version"]) for t in targets] == [("m", 1)]
    # v3 answered only its first step's share (10%), plus what one check period let through
    share = load.answers[:after].count("m/3") / max(1, after)
    assert share < 0.10 + 0.15, share
    assert json.loads(log.read_text().splitlines()[-1])["action"] == "rollback"


def test_emit_writes_manifests_for_the_current_champion(servers, tmp_path, capsys):
    import yaml

    _reset(servers, capsys)
    rc, doc, _ = cli(["rollout", f"http://{servers[0].url}", "--endpoint", "m", "--candidate", "m:2",
                      "--emit", "istio", "--out", str(tmp_path)], capsys)
    assert rc == 0, doc
    rule, vs = yaml.safe_load_all(Path(doc["emitted"][0]).read_text())
    assert [s["name"] for s in rule["spec"]["subsets"]] == ["v1", "v2"]
    assert request(servers[0].port, "GET", "/v2/routes/m").json()["targets"][0]["version"] == 1  # nothing changed


def test_failing_and_slow_candidates_are_rolled_back(tmp_path, capsys):
    """Probe versions (y = 2x): 2 raises on every call (500s), 3 answers 150 ms late; both roll back
    on their first step, by error rate and by p99 ratio, with a human-readable decision table."""
    from rt_models import probe_config, write_probe

    flag = tmp_path / "failing"
    cfg = probe_config("p", version_policy={"all": True})
    write_probe(tmp_path / "repo", cfg)
    write_probe(tmp_path / "repo", cfg, fail_file=str(flag))
    write_probe(tmp_path / "repo", cfg, delay_s=0.15)
    srv = InProcessServer(tmp_path / "repo", management_token=TOKEN).start()
    flag.touch()  # after warm-up: version 2 fails from now on
    stop = threading.Event()

    def loop():
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode()
        while not stop.is_set():
            request(srv.port, "POST", "/v2/models/p/infer", body, {"Content-Type": "application/json"})
            stop.wait(0.005)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
    url = f"http://{srv.url}"
    gate = ["--endpoint", "p", "--champion", "p:1", "--steps", "30,100", "--interval", "2s", "--check-every", "0.5s",
            "--min-requests", "10", "--max-error-rate", "0.05", "--max-p99-ratio", "3", "--token", TOKEN]
    try:
        assert cli(["route", "switch", url, "p", "p:1", "--token", TOKEN], capsys)[0] == 0
        for t in threads:
            t.start()
        rc, doc, _ = cli(["rollout", url, "--candidate", "p:2", *gate], capsys)
        assert rc == 3 and any("error rate" in r for r in doc["reasons"]), doc
        assert doc["decisions"][-1]["candidate_figures"]["errors"] > 0
        rc, text, _ = cli(["rollout", url, "--candidate", "p:3", *gate], capsys, json_output=False)
        assert rc == 3 and "p99 ratio" in text and "rollout decisions" in text and "rolled_back" in text, text
        assert request(srv.port, "GET", "/v2/routes/p").json()["targets"][0]["version"] == 1
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        srv.stop()


def test_an_interrupted_rollout_leaves_the_champion_serving(servers, capsys):
    from serve_kit.rollout import engine
    from serve_kit.rollout.driver import Fleet

    _reset(servers, capsys)
    seen = []

    def sleep(s):  # Ctrl-C while the first step is held: by then the candidate has its 50 %
        seen.append([t["version"] for t in request(servers[1].port, "GET", "/v2/routes/m").json()["targets"]])
        raise KeyboardInterrupt

    fleet = Fleet([servers[0].url, servers[1].url], TOKEN)
    with pytest.raises(KeyboardInterrupt):
        engine.run(engine.Plan(endpoint="m", candidate=("m", 2), steps=(50, 100)), fleet, sleep=sleep)
    assert seen == [[1, 2]]
    for srv in servers:
        assert [t["version"] for t in request(srv.port, "GET", "/v2/routes/m").json()["targets"]] == [1]


def test_promotion_moves_the_mlflow_champion_alias(servers, tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's embedded store: a real registry, no server
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m-model")
    for _ in range(2):
        client.create_model_version("m-model", source=str(tmp_path))
    client.set_registered_model_alias("m-model", "champion", "1")
    _reset(servers, capsys)
    with Load([s.port for s in servers]):
        rc, doc, _ = cli(["rollout", *_urls(servers), "--endpoint", "m", "--candidate", "m:2", "--steps", "100",
                          "--interval", "0.5s", "--check-every", "0.5s", "--min-requests", "5", "--max-p99-ratio", "20",
                          "--mlflow-uri", uri, "--mlflow-model", "m-model", "--mlflow-version", "2",
                          "--token", TOKEN], capsys)
    assert rc == 0, doc
    assert doc["mlflow"]["previous"] == 1 and doc["mlflow"]["alias"] == "champion"
    assert str(client.get_model_version_by_alias("m-model", "champion").version) == "2"


def test_route_set_from_a_file(servers, tmp_path, capsys):
    f = tmp_path / "route.yaml"
    f.write_text("targets:\n  - {model: m, version: 1, weight: 3}\n  - {model: m, version: 2, weight: 1}\ncompare: 0.5\n")
    rc, doc, _ = cli(["route", "set", f"http://{servers[0].url}", "m", "--file", str(f), "--token", TOKEN], capsys)
    assert rc == 0 and [t["share"] for t in doc["targets"]] == [0.75, 0.25] and doc["compare"] == 0.5
    f.write_text("endpoint: other\ntargets: [{model: m, version: 1}]\n")
    rc, doc, _ = cli(["route", "set", f"http://{servers[0].url}", "m", "--file", str(f), "--token", TOKEN], capsys)
    assert rc == 2 and "other" in doc["message"]
