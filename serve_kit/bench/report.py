"""Bench reports: the environment they were measured in, CI gates, baseline comparison, the plot.

Gates:
* `--assert 'p99_ms<20'`: METRIC OP NUMBER, checked on every result (each sweep point; offline,
  each version and batch size). Metrics: see METRICS. A malformed expression is a usage error.
* `--baseline old.json --max-regression 10%`: each result that the baseline also has (same
  key) is compared on throughput (higher is better) and p50 (lower is better) using the
  per-window values of both reports; a regression fails only when the whole 95 % Welch
  interval of the change lies beyond the threshold (stats.relative_change).
"""

from __future__ import annotations

import json
import operator
import os
import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, ServeKitError, UsageError
from . import stats

METRICS: dict[str, str] = {
    "p50_ms": "median latency (ms)",
    "p90_ms": "90th percentile latency (ms)",
    "p95_ms": "95th percentile latency (ms)",
    "p99_ms": "99th percentile latency (ms)",
    "p999_ms": "99.9th percentile latency (ms)",
    "max_ms": "largest latency (ms)",
    "mean_ms": "mean latency (ms)",
    "throughput": "inferences (samples) per second",
    "requests_per_s": "successful requests per second (online)",
    "error_rate": "failed / all requests, 0..1 (online)",
    "errors": "failed requests (online)",
    "timeouts": "timed-out requests (online)",
}
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}
_ASSERT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*"
                     r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*")
_ALIASES = {"errors_total": "errors", "samples_per_s": "throughput"}


@dataclass(frozen=True)
class Assertion:
    text: str
    metric: str
    op: str
    value: float

    def check(self, result: dict[str, Any]) -> dict[str, Any]:
        actual = result.get("errors_total" if self.metric == "errors" else self.metric)
        if actual is None:
            return {"gate": self.text, "result": result["key"], "actual": None, "passed": False,
                    "reason": f"{self.metric} was not measured"}
        passed = bool(_OPS[self.op](float(actual), self.value))
        return {"gate": self.text, "result": result["key"], "actual": actual, "passed": passed}


def parse_assertion(text: str) -> Assertion:
    m = _ASSERT.fullmatch(text)
    if not m:
        raise UsageError("malformed --assert expression", value=text, origin="--assert",
                         hint="METRIC OP NUMBER, e.g. 'p99_ms<20' or 'throughput>=500'; OP is one of "
                              "< <= > >= == !=; metrics: " + ", ".join(METRICS))
    metric = _ALIASES.get(m.group(1), m.group(1))
    if metric not in METRICS:
        raise UsageError(f"unknown metric {m.group(1)!r} in --assert", value=text, origin="--assert",
                         hint="metrics: " + ", ".join(METRICS))
    return Assertion(text.strip(), metric, m.group(2), float(m.group(3)))


def parse_regression(text: str) -> float:
    """`10%` or `10` -> 0.10."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*", text)
    if not m or not 0 < float(m.group(1)) < 100:
        raise UsageError("--max-regression is a percentage between 0 and 100", value=text,
                         origin="--max-regression", hint="e.g. --max-regression 10%")
    return float(m.group(1)) / 100.0


def check_assertions(report: dict[str, Any], assertions: list[Assertion]) -> list[dict[str, Any]]:
    return [a.check(r) for a in assertions for r in report["results"]]


# ---------------------------------------------------------------------------------------------
# Baseline


def load_baseline(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError("baseline report not found", value=str(path), origin="--baseline") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"baseline report is not a readable JSON file: {e}", value=str(path),
                         origin="--baseline") from None
    if not isinstance(doc, dict) or doc.get("format") != "serve-kit/bench@1" \
            or not isinstance(doc.get("results"), list):
        raise InputError("not a serve-kit bench report (no format serve-kit/bench@1 with results)", value=str(path),
                         origin="--baseline", hint="write one with `serve-kit --json bench ... > report.json`")
    return doc


def _match_key(report: dict[str, Any], r: dict[str, Any]) -> tuple:
    if report.get("kind") == "offline":
        return ("offline", r.get("model"), r.get("version"), r.get("batch_size"))
    t = report.get("target", {})
    return ("online", t.get("model"), t.get("protocol"), t.get("encoding"), r.get("batch_size"), r["key"])


def compare(report: dict[str, Any], baseline: dict[str, Any], max_regression: float) -> dict[str, Any]:
    """Each result against the baseline's result with the same key (see the module docstring)."""
    if baseline.get("kind") != report.get("kind"):
        raise InputError(f"the baseline is an {baseline.get('kind')} report, this run is {report.get('kind')}",
                         origin="--baseline")
    base = {_match_key(baseline, r): r for r in baseline["results"]}
    rows = []
    for r in report["results"]:
        b = base.get(_match_key(report, r))
        if b is None:
            rows.append({"result": r["key"], "status": "no baseline"})
            continue
        row: dict[str, Any] = {"result": r["key"], "checks": []}
        for metric, higher in (("throughput", True), ("p50_ms", False)):
            bw = b.get("per_window", {}).get(metric) or []
            cw = r.get("per_window", {}).get(metric) or []
            if not bw or not cw or any(v is None for v in bw + cw):
                row["checks"].append({"metric": metric, "status": "not comparable (no windows)"})
                continue
            # A run that was UNSTABLE moved by its window spread while it ran: a shift that large
            # between the two runs is not evidence either (see stats.relative_change).
            allowance = max([stats.window_spread(w) for w, res in ((bw, b), (cw, r)) if res.get("stable") is False],
                            default=0.0)
            change = stats.relative_change(metric, bw, cw, allowance=allowance)
            regressed = stats.is_regression(change, max_regression, higher)
            worse = -change.change if higher else change.change
            row["checks"].append({**change.to_dict(), "higher_is_better": higher, "regressed": regressed,
                                  "unstable_allowance_pct": allowance * 100,
                                  "status": "REGRESSED" if regressed else
                                  ("worse (within noise or threshold)" if worse > 0 else "ok")})
        row["status"] = "REGRESSED" if any(c.get("regressed") for c in row["checks"]) else "ok"
        rows.append(row)
    if not any(r["status"] != "no baseline" for r in rows):
        raise InputError("no result of this run has a counterpart in the baseline (different model, protocol, "
                         "encoding, batch size or sweep points)", origin="--baseline",
                         hint="run the same sweep as the baseline")
    return {"max_regression_pct": max_regression * 100, "confidence": 0.95, "rows": rows,
            "regressed": [r["result"] for r in rows if r["status"] == "REGRESSED"]}


# ---------------------------------------------------------------------------------------------
# Environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    from .. import __version__

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    libs = {d: _version(d) for d in ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "grpcio",
                                     "protobuf", "httptools", "uvloop", "hdrhistogram", "orjson", "tensorrt",
                                     "nvidia-ml-py")}
    return {
        "serve_kit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_bytes": mem,
        "load_average": list(load) if load else None,
        "libraries": {k: v for k, v in libs.items() if v},
    }


# ---------------------------------------------------------------------------------------------
# GPU results (offline)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_gpu(report: dict[str, Any], out) -> None:
    """The GPU side of an offline report, when a version ran (or asked to run) on a GPU: each
    device's measured GEMM peak, then per result NVML utilization / memory / power / energy, the
    CUDA-event H2D / compute / D2H split and the fraction of the peak; why, where unavailable."""
    from rich.markup import escape
    from rich.table import Table

    devices = report.get("gpu_devices") or {}
    rows = [r for r in report.get("results", []) if r.get("gpu")]
    if not devices and not rows:
        return
    for d, p in devices.items():
        if "unavailable" in p:
            out.print(f"[yellow]GPU {escape(d)} unavailable[/]: {escape(p['unavailable'])}")
            continue
        info = p.get("info") or {}
        peak = (p.get("gemm_peak") or {}).get("tflops") or {}
        peaks = ", ".join(f"{k.upper()} {v:,.1f}" for k, v in peak.items() if v) or "not calibrated (--no-flops)"
        out.print(f"GPU {escape(d)}: {escape(str(info.get('name', '?')))} (sm {info.get('compute_capability', '?')}, "
                  f"{_gib(info.get('total_memory_bytes'))}); measured GEMM peak TFLOP/s: {peaks}", highlight=False)
    measured = [r for r in rows if "unavailable" not in r["gpu"]]
    said = set()
    for r in rows:  # once per version: its batch sizes share the reason
        g = r["gpu"]
        what = (r["model"], r["version"], r.get("variant"), g.get("unavailable"))
        if "unavailable" in g and what not in said:
            said.add(what)
            out.print(f"[yellow]{escape(r['model'])} v{r['version']} ({escape(str(r.get('variant')))}): not on the "
                      f"GPU[/] ({escape(g.get('requested_by', ''))}): {escape(g['unavailable'])}")
    if not measured:
        return
    table = Table(title="GPU: NVML over the measurement windows; CUDA-event split (p50 ms) after them")
    for c in ("result", "device", "util mean/max", "mem max", "power mean/max", "J/sample", "H2D ms",
              "compute ms", "D2H ms", "split", "TFLOP/s", "of peak"):
        table.add_column(c, justify="left" if c in ("result", "device", "split") else "right")
    nvml_missing = set()
    for r in measured:
        g = r["gpu"]
        n = g.get("nvml") or {}
        if "unavailable" in n:
            nvml_missing.add(n["unavailable"])
            util = mem = power = joules = "-"
        else:
            util = f"{_num(n.get('util_mean_pct'), '.0f')}/{_num(n.get('util_max_pct'), '.0f')} %"
            mem = _gib(n.get("memory_used_max_bytes"))
            power = f"{_num(n.get('power_mean_w'), '.0f')}/{_num(n.get('power_max_w'), '.0f')} W"
            joules = _num(n.get("joules_per_item"), ".3g")
        ev = g.get("cuda_events") or {}
        phases = ev.get("phases_ms") or {}
        cells = [_num((phases.get(k) or {}).get("p50"), ".3f") for k in ("h2d", "compute", "d2h")]
        split = ("-" if not ev else "[yellow]unavailable[/]" if "unavailable" in ev
                 else escape(ev["method"]) + (" (estimate)" if ev.get("estimated") else ""))
        frac = g.get("fraction_of_peak")
        table.add_row(escape(r["key"]), escape(g["device"]), util, mem, power, joules, *cells, split,
                      _num(g.get("achieved_tflops"), ".3g"),
                      f"{frac * 100:.3g}% of {g['peak_dtype'].upper()}" if frac is not None else "-")
    out.print(table)
    for reason in sorted(nvml_missing):
        out.print(f"[yellow]NVML unavailable[/]: {escape(reason.removeprefix('NVML: '))}")
    for reason in sorted({r["gpu"]["cuda_events"]["unavailable"] for r in measured
                          if "unavailable" in (r["gpu"].get("cuda_events") or {})}):
        out.print(f"[yellow]CUDA-event split unavailable[/]: {escape(reason)}")


# ---------------------------------------------------------------------------------------------
# Plot


def require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ServeKitError("--plot needs matplotlib, which is not installed", origin="--plot",
                            hint="pip install 'serve-kit[bench]' (or pip install matplotlib)")


def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency against throughput: one curve per series (online: p50 and p99 over the sweep;
    offline: p50 per version over the batch sizes)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if report["kind"] == "online":
        rs = report["results"]
        xs = [r["throughput"] for r in rs]
        for metric, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(xs, [r[metric] for r in rs], style, label=metric.replace("_ms", ""))
        for r in rs:
            label = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['offered_rate']:g}/s"
            ax.annotate(label, (r["throughput"], r["p99_ms"] or 0), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        t = report["target"]
        title = f"{t['model']} over {t['protocol']} ({report['mode']} loop, batch {t['batch_size']})"
    else:
        series: dict[str, list] = {}
        for r in report["results"]:
            series.setdefault(f"{r['model']} v{r['version']} ({r['variant']})", []).append(r)
        for label, rs in series.items():
            ax.plot([r["throughput"] for r in rs], [r["p50_ms"] for r in rs], "o-", label=label)
            for r in rs:
                ax.annotate(f"b{r['batch_size']}", (r["throughput"], r["p50_ms"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        title = "offline: p50 latency vs throughput over batch sizes"
    if report.get("synthetic"):
        title += " [SYNTHETIC inputs]"
    from matplotlib.ticker import FuncFormatter

    ax.set_xlabel("throughput (inferences/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
