"""Runs a zoo case as a user does, and checks what a user relies on.

`optimize()` runs `serve-kit --json optimize ...` in a subprocess and measures its peak RSS
(VmHWM of that process, polled: see _HighWater). `contract_problems()` lists every way the
run breaks the contracts of issue 12 (common brief 4-6): a requested target without a row, a status
outside the six, a row without its cause, a traceback, a report not where it must be, the wrong
exit code. `served_check()` serves the written version with `serve-kit serve` on 127.0.0.1 (real
HTTP, a random port) and compares what it answers on held-out samples with the ORIGINAL model run
directly (ONNX Runtime, TorchScript or the eager factory; closed-loop for stateful models, each on
its own state, as a user streams), against the gate the variant passed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import data as zdata
from . import metrics as zmetrics
from .cases import Case

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
STATUSES = {"passed", "failed", "not-applicable", "unavailable", "error", "bug"}


def env() -> dict[str, str]:
    e = dict(os.environ)
    # The checkout's serve_kit (not an installed one) and tests/ (zoo.metrics, zoo.models).
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["COLUMNS"] = "200"
    return e


CLI = [sys.executable, "-m", "serve_kit"]


@dataclass
class Run:
    case: Case
    cmd: list[str]
    repo: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float
    report: dict[str, Any] | None = None
    report_error: str | None = None
    runs_logs: list[Path] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any] | None:
        return next((v for v in (self.report or {}).get("variants", []) if v.get("name") == name), None)

    def summary(self) -> dict[str, Any]:
        rep = self.report or {}
        return {
            "case": self.case.name, "exit": self.returncode, "seconds": round(self.seconds, 1),
            "peak_rss_mb": round(self.peak_rss_mb), "reference_metric": (rep.get("reference") or {}).get("metric"),
            "written": rep.get("written"),
            "rows": {v.get("name"): {k: v.get(k) for k in ("status", "reason", "error", "speedup")
                                     if v.get(k) is not None}
                     | {"metric": (v.get("validation") or {}).get("metric"), "attempts": v.get("attempts"),
                        "calibration": (v.get("details") or {}).get("calibration")}
                     for v in rep.get("variants", [])},
        }


class _HighWater:
    """The child's peak RSS from /proc/PID/status VmHWM, read every 50 ms while it runs.

    Not wait4's ru_maxrss: a child forked from a large process (pytest, late in the suite, holds
    gigabytes) starts with the parent's RSS, and Linux keeps that maximum across exec; VmHWM
    belongs to the exec'd image alone and only grows, so the last reading misses at most the
    final 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak_mb, self._done = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024.0)
            except (OSError, ValueError):
                pass
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def optimize(case: Case, workdir: Path, size: str = "ci", extra: tuple[str, ...] = (),
             targets: tuple[str, ...] | None = None) -> Run:
    cal, ev = case.data(size)
    repo = workdir / "repo"
    cmd = [*CLI, "--json", "optimize", case.model(), "-r", str(repo), "--name", case.name,
           *case.flags(), "--calibration-data", str(cal), "--eval-data", str(ev), "--label-key", "labels",
           "--metric", case.metric, "--batch-sizes", "1"]
    for t in targets or case.targets:
        extra_settings = case.ci_settings.get(t) if size == "ci" else None
        cmd += ["-t", t + ((":" if ":" not in t else ",") + extra_settings if extra_settings else "")]
    if case.keep_going:
        cmd.append("--keep-going")
    cmd += list(extra)
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env(), cwd=workdir, start_new_session=True)
        killer = threading.Timer(case.timeout_s, lambda: os.killpg(p.pid, signal.SIGKILL))
        killer.start()
        hwm = _HighWater(p.pid)
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            killer.cancel()
            hwm.stop()
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    seconds = time.perf_counter() - t0
    run = Run(case, cmd, repo, p.returncode, out_path.read_text(), err_path.read_text(), seconds,
              hwm.peak_mb or usage.ru_maxrss / 1024.0)
    try:
        run.report = json.loads(run.stdout)
    except ValueError as e:
        run.report_error = f"stdout is not one JSON document ({e}): {run.stdout[-500:]!r}"
    run.runs_logs = sorted((repo / case.name / ".runs").glob("*.json"))
    return run


def expected_exit(report: dict[str, Any], strict: bool = False) -> int:
    """Contract 5: 1 if any row is a bug; else 0 if a version was written; else 3 if a gate was
    missed; else 1. (With --strict not-applicable/unavailable count as errors, which only matters
    for whether a version is written: the report says that.)"""
    rows = report.get("variants", [])
    if any(r.get("status") == "bug" for r in rows):
        return 1
    if report.get("written"):
        return 0
    if any(r.get("status") == "failed" for r in rows):
        return 3
    return 1


def contract_problems(run: Run) -> list[str]:
    """Everything this run does that a user could not rely on; empty when it keeps the contracts."""
    p: list[str] = []
    if "Traceback (most recent call last)" in run.stderr:
        p.append("traceback in stderr:\n" + run.stderr[-3000:])
    if run.report is None:
        return p + [f"no report on stdout (exit {run.returncode}): {run.report_error}; "
                    f"stderr: {run.stderr[-1500:]}"]
    rep = run.report
    rows = {v.get("name"): v for v in rep.get("variants", [])}
    for t in (t.split(":")[0] for t in run.case.targets):
        if t not in rows:
            p.append(f"target {t} has no row (rows: {sorted(rows)})")
    for name, v in rows.items():
        st = v.get("status")
        if st not in STATUSES:
            p.append(f"{name}: status {st!r} is none of {sorted(STATUSES)}")
        elif st == "bug":
            p.append(f"{name}: serve-kit bug: {v.get('error')}\n{v.get('traceback', '')}")
        elif st in ("not-applicable", "unavailable") and not (v.get("reason") or "").strip():
            p.append(f"{name}: {st} without a reason")
        elif st == "error" and not (v.get("error") or "").strip():
            p.append(f"{name}: error without a message")
        elif st == "failed":
            checks = (v.get("validation") or {}).get("checks") or []
            if not any(c.get("passed") is False for c in checks):
                p.append(f"{name}: failed, but no check in validation.checks failed: {checks}")
    ref_metric = (rep.get("reference") or {}).get("metric")
    floor = run.case.min_reference_metric
    if floor is not None and (ref_metric is None or ref_metric < floor):
        p.append(f"reference metric {ref_metric} under {floor}: the original was not fed its data right")
    want = expected_exit(rep)
    if run.returncode != want:
        p.append(f"exit {run.returncode}, but contract 5 says {want} for rows "
                 f"{ {n: v.get('status') for n, v in rows.items()} } (written: {rep.get('written')})")
    # Contract 6: the report per version when one was written, and always a .runs log.
    path = rep.get("report_path")
    written = rep.get("written")
    if not run.runs_logs:
        p.append(f"no run log in {run.repo / run.case.name / '.runs'}")
    if written:
        per_version = run.repo / run.case.name / str(written.get("version")) / "optimize-report.json"
        if not per_version.is_file():
            p.append(f"a version was written but {per_version} does not exist")
        elif path and Path(path).resolve() != per_version.resolve():
            p.append(f"report_path {path} is not the per-version report {per_version}")
        for model_file in per_version.parent.glob("*.onnx"):
            import onnx

            try:  # every written model passes onnx.checker (the opset-11 INT8 did not)
                onnx.checker.check_model(str(model_file))
            except Exception as e:
                p.append(f"written {model_file} fails onnx.checker: {str(e).splitlines()[0][:300]}")
    elif path and Path(path).parent.name != ".runs":
        p.append(f"nothing written, but report_path {path} is not under .runs")
    if path and not Path(path).is_file():
        p.append(f"report_path {path} does not exist")
    if run.case.expect_written and not written:
        p.append(f"nothing written: {rep.get('not_written_because')}; rows: "
                 f"{ {n: (v.get('status'), v.get('reason') or v.get('error')) for n, v in rows.items()} }")
    return p


# ---------------------------------------------------------------------------------------------
# serving


@contextmanager
def served(repo: Path, model: str, timeout: float = 120):
    """`serve-kit serve` on 127.0.0.1, any free port; yields the base URL."""
    cmd = [*CLI, "--json", "serve", str(repo), "-m", model, "--http-port", "0", "--no-grpc"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(p.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    try:
        if not lines or not lines[0].strip():
            p.kill()
            raise AssertionError(f"serve-kit serve did not get ready: {p.stderr.read()[-2000:]}")
        info = json.loads(lines[0])
        assert info.get("ready"), info
        states = {m.get("name"): (m.get("state"), m.get("reason")) for m in info.get("models", [])}
        assert states.get(model, ("READY",))[0] == "READY", f"{model} not serving: {states}"
        yield info["http"]
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


_DT = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8,
       "UINT8": np.uint8, "BOOL": np.bool_, "FP16": np.float16}


def _http(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _datatype(arr: np.ndarray) -> str:
    return next(k for k, v in _DT.items() if np.dtype(v) == arr.dtype)


def http_infer(base: str, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": _datatype(v),
                        "data": v.reshape(-1).tolist()} for k, v in inputs.items()]}
    resp = _http(f"{base}/v2/models/{model}/infer", body)
    return {o["name"]: np.asarray(o["data"], dtype=_DT[o["datatype"]]).reshape(o["shape"]) for o in resp["outputs"]}


# ---------------------------------------------------------------------------------------------
# the original model, run directly


def original_runner(case: Case, model_path: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    if case.reference == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        consts = {k: np.array(v, dtype=np.int64) for k, v in case.constants.items()}

        def run(inputs):
            return dict(zip(names, sess.run(None, {**inputs, **consts})))
        return run
    import torch

    if case.reference == "torchscript":
        module = torch.jit.load(model_path)
        sr = case.constants["sr"]

        def run(inputs):
            with torch.no_grad():
                return {"output": module(torch.from_numpy(inputs["x"]), sr).numpy()}
        return run
    from . import models

    net = models.load(case.factory_net)
    out_names = [f.split(":")[0] for i, f in enumerate(case.flags()) if i and case.flags()[i - 1] == "--output"]

    def run(inputs):
        with torch.no_grad():
            return {n: t.numpy() for n, t in zip(out_names, net(torch.from_numpy(inputs["input"])))}
    return run


def _steps(case: Case, ev: dict[str, np.ndarray], k: int) -> tuple[list[dict[str, np.ndarray]], dict, np.ndarray, Callable]:
    """Held-out requests in order, the initial fed-back inputs, their labels, and how to put the
    per-step outputs back in the data's sample order."""
    if case.state:
        seq = ev["sequence"]
        n = int(seq.max()) + 1
        length = len(seq) // n
        k = min(k, length)
        x = ev["input"].reshape(n, length, -1)
        init = {inp: ev[inp][:, ::length] for inp in case.state.values()}  # each stream's first sample
        labels = ev["labels"].reshape(n, length)[:, :k].reshape(-1)

        def order(outs: list[np.ndarray]) -> np.ndarray:  # k x [n, ...] -> [n*k, ...] stream-major
            return np.stack(outs, 1).reshape(n * k, *outs[0].shape[1:])
        return [{"input": x[:, t]} for t in range(k)], init, labels, order
    names = [n for n in ev if n not in ("labels", "sequence")]
    k = min(k, len(ev["labels"]))
    return [{n: ev[n][i:i + 1] for n in names} for i in range(k)], {}, ev["labels"][:k], np.concatenate


def closed_loop(case: Case, fn: Callable, steps: list[dict], init: dict) -> dict[str, list[np.ndarray]]:
    fed = dict(init)
    outs: dict[str, list[np.ndarray]] = {}
    for s in steps:
        res = fn({**s, **fed})
        for out_name, in_name in case.state.items():
            fed[in_name] = res[out_name]
        for name, v in res.items():
            if name not in case.state:
                outs.setdefault(name, []).append(v)
    return outs


def compare(served: dict[str, np.ndarray], orig: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: the measures the gates use, served against the original on the same requests."""
    res = {}
    for name, o in orig.items():
        s = served[name].astype(np.float64)
        o = o.astype(np.float64)
        d = {"max_abs_error": float(np.abs(s - o).max()),
             "rel_l2": float(np.linalg.norm(s - o) / (np.linalg.norm(o) + 1e-12))}
        per = o.reshape(len(o), -1)
        if per.shape[1] > 1:
            sp = s.reshape(len(s), -1)
            cos = (sp * per).sum(1) / (np.linalg.norm(sp, axis=1) * np.linalg.norm(per, axis=1) + 1e-12)
            d["cosine_mean"] = float(cos.mean())
        if o.min() >= 0 and o.max() <= 1:
            d["prob_error"] = d["max_abs_error"]
            if o.shape[-1] > 1 and np.allclose(o.sum(-1), 1, atol=1e-3):  # softmax over classes
                flips = s.argmax(-1) != o.argmax(-1)
            else:  # independent probabilities (speech, text pixels): the 0.5 threshold
                flips = (s > 0.5) != (o > 0.5)
            d["flip_rate"] = float(np.mean(flips))
            d["decisions"] = int(flips.size)
        res[name] = d
    return res


@dataclass
class ServedCheck:
    variant: str
    measures: dict[str, dict[str, float]]
    metric_served: float
    metric_original: float
    samples: int
    problems: list[str]


def served_check(run: Run, k: int = 16) -> ServedCheck:
    rep = run.report
    w = rep["written"]
    row = run.row(w["variant"]) or {}
    gate = {key: v for key, v in ((row.get("validation") or {}).get("gate") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    _, ev_path = run.case.data("ci")
    ev = zdata.load(ev_path)
    steps, init, labels, order = _steps(run.case, ev, k)
    original = original_runner(run.case, run.case.model())
    orig = {n: order(v) for n, v in closed_loop(run.case, original, steps, init).items()}
    with served(run.repo, run.case.name) as base:
        meta = _http(f"{base}/v2/models/{run.case.name}")
        names = {i["name"] for i in meta["inputs"]}
        consts = {k: np.array(v, dtype=np.int64) for k, v in run.case.constants.items()}

        def remote(inputs):
            feed = {n: v for n, v in {**inputs, **consts}.items() if n in names}
            missing = names - set(feed)
            assert not missing, f"served model wants inputs {sorted(missing)} the case cannot give"
            return http_infer(base, run.case.name, feed)
        srv = {n: order(v) for n, v in closed_loop(run.case, remote, steps, init).items()}
    problems = []
    missing = set(orig) - set(srv)
    if missing:
        problems.append(f"served outputs {sorted(srv)} lack {sorted(missing)}")
        return ServedCheck(w["variant"], {}, float("nan"), float("nan"), len(labels), problems)
    measures = compare(srv, orig)
    metric = getattr(zmetrics, run.case.metric.split(":")[1])
    m_srv, m_orig = metric(srv, labels), metric(orig, labels)
    n = len(labels)
    exact = w["variant"] == "source" or row.get("precision") == "fp32" and not gate
    for out, d in measures.items():
        where = f"served {w['variant']} vs original, output {out!r} on {n} held-out samples"
        if exact and d["max_abs_error"] > 1e-3:
            problems.append(f"{where}: max abs error {d['max_abs_error']:.3g} > 1e-3")
        if "max_abs_error" in gate and d["max_abs_error"] > gate["max_abs_error"] * (1 + 1e-6):
            problems.append(f"{where}: max abs error {d['max_abs_error']:.3g} > gate {gate['max_abs_error']}")
        if "max_prob_error" in gate and "prob_error" in d and d["prob_error"] > gate["max_prob_error"] * (1 + 1e-6):
            problems.append(f"{where}: probability error {d['prob_error']:.3g} > gate {gate['max_prob_error']}")
        if "max_rel_l2" in gate and d["rel_l2"] > gate["max_rel_l2"] * (1 + 1e-6) + 1e-9:
            problems.append(f"{where}: relative L2 {d['rel_l2']:.3g} > gate {gate['max_rel_l2']}")
        if "min_cosine" in gate and "cosine_mean" in d and d["cosine_mean"] < gate["min_cosine"] - 1e-6:
            problems.append(f"{where}: cosine {d['cosine_mean']:.6f} < gate {gate['min_cosine']}")
        if "max_flip_rate" in gate and "flip_rate" in d and \
                d["flip_rate"] * d["decisions"] > gate["max_flip_rate"] * d["decisions"] + 1:
            problems.append(f"{where}: {d['flip_rate']:.2%} decisions flipped > gate {gate['max_flip_rate']:.2%}")
    # The gate's metric drop was measured on the whole evaluation set; here one sample's worth of slack.
    drop = gate.get("max_metric_drop", 2.0)
    if m_orig - m_srv > drop + 100.0 / n:
        problems.append(f"served metric {m_srv:.2f} vs original {m_orig:.2f}: drop beyond gate {drop}")
    return ServedCheck(w["variant"], measures, m_srv, m_orig, n, problems)
