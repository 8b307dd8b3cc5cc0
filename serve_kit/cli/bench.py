"""`serve-kit bench`: offline (in-process) and online (against a server) benchmarks, CI gates, tune."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import GateFailed, UsageError
from . import app
from ._common import emit_json, err, human_size, out, run_with_progress, state

_ONLINE = "Online (--url)"
_OFFLINE = "Offline (REPO)"
_MEASURE = "Measurement"
_GATES = "Output and gates"
_TUNE = "Tune (bench tune REPO)"


def _ints(text: Optional[str], flag: str) -> list[int]:
    if text is None:
        return []
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag} takes positive integers separated by commas", value=text, origin=flag,
                         hint=f"e.g. {flag} 1,4,16")
    return values


def _floats(text: Optional[str], flag: str) -> list[float]:
    if text is None:
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UsageError(f"{flag} takes positive numbers separated by commas", value=text, origin=flag,
                         hint=f"e.g. {flag} 100 or {flag} 100,500,1000")
    return values


@app.command()
def bench(
    target: Optional[str] = typer.Argument(None, help="Offline: a model repository to measure in-process. "
                                                      "`tune` runs the auto-tuner on the repository that follows."),
    tune_repository: Optional[Path] = typer.Argument(None, help="The repository, after `tune`.", show_default=False),
    url: Optional[str] = typer.Option(None, "--url", help="Server to load: http://HOST:PORT or grpc://HOST:PORT.",
                                      rich_help_panel=_ONLINE),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name (online: required; offline: "
                                                                    "default all models).", rich_help_panel=_ONLINE),
    version: Optional[str] = typer.Option(None, "--version", help="Model version (default: the latest / offline: "
                                                                  "every version).", rich_help_panel=_ONLINE),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", "-c", help="Closed loop: outstanding "
                                              "requests, a sweep such as 1,4,16 (default 1).", rich_help_panel=_ONLINE),
    rate: Optional[str] = typer.Option(None, "--rate", help="Open loop: offered requests/s, e.g. 100 or a "
                                       "sweep 100,500,1000; latency counts from each intended send time.",
                                       rich_help_panel=_ONLINE),
    arrival: str = typer.Option("poisson", "--arrival", help="Open-loop arrivals: poisson or constant.",
                                rich_help_panel=_ONLINE),
    encoding: str = typer.Option("binary", "--encoding", help="HTTP tensors: binary (Triton's extension) or json.",
                                 rich_help_panel=_ONLINE),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Rows per request.", rich_help_panel=_ONLINE),
    data: Optional[Path] = typer.Option(None, "--data", help="Real inputs: .npz/.npy, a folder of them, or a "
                                        "model repository (its samples.npz).", rich_help_panel=_ONLINE),
    synthetic: bool = typer.Option(False, "--synthetic", help="Random inputs instead of real data (labelled "
                                   "SYNTHETIC in every output).", rich_help_panel=_ONLINE),
    workers: int = typer.Option(1, "--workers", help="Load generator processes.", rich_help_panel=_ONLINE),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds before a request counts as timed out.",
                                  rich_help_panel=_ONLINE),
    max_connections: int = typer.Option(1024, "--max-connections", help="Open loop over HTTP: most connections "
                                        "per worker.", rich_help_panel=_ONLINE),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Offline batch-size sweep (default "
                                              "1,8,32 capped at max_batch_size).", rich_help_panel=_OFFLINE),
    no_flops: bool = typer.Option(False, "--no-flops", help="Skip FLOP counting and the GEMM peak calibration.",
                                  rich_help_panel=_OFFLINE),
    no_eager: bool = typer.Option(False, "--no-eager",
                                  help="Offline: do not measure the PyTorch source eagerly (by default it is, when "
                                       "the manifest's source loads here and hashes to what was optimized).",
                                  rich_help_panel=_OFFLINE),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Warm-up seconds, not measured (default: online "
                                           "1, offline 0.5).", rich_help_panel=_MEASURE),
    window: Optional[float] = typer.Option(None, "--window", help="Measurement window seconds (default: online 1, "
                                           "offline 0.5).", rich_help_panel=_MEASURE),
    min_windows: int = typer.Option(3, "--min-windows", help="Windows before stability is judged.",
                                    rich_help_panel=_MEASURE),
    max_windows: int = typer.Option(10, "--max-windows", help="Windows at most; still unstable then = UNSTABLE.",
                                    rich_help_panel=_MEASURE),
    stability: float = typer.Option(10.0, "--stability", help="Stable when the last 3 windows' p50 and throughput "
                                    "are within this percent.", rich_help_panel=_MEASURE),
    duration: Optional[float] = typer.Option(None, "--duration", help="Measure exactly this long (whole windows), "
                                             "no early stop.", rich_help_panel=_MEASURE),
    asserts: list[str] = typer.Option([], "--assert", help="Gate on every result, e.g. 'p99_ms<20' or "
                                      "'throughput>=500' (repeat). Failure exits 3.", rich_help_panel=_GATES),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="A previous `--json` report to compare with.",
                                            rich_help_panel=_GATES),
    max_regression: str = typer.Option("10%", "--max-regression", help="Fail (exit 3) when throughput or p50 is "
                                       "worse than the baseline by more than this, with 95% confidence.",
                                       rich_help_panel=_GATES),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the JSON report to this file.",
                                          rich_help_panel=_GATES),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a latency-throughput PNG (needs matplotlib: "
                                        "the `bench` extra).", rich_help_panel=_GATES),
    p99_budget_ms: Optional[float] = typer.Option(None, "--p99-budget-ms", help="tune: the p99 latency to stay "
                                                  "within.", rich_help_panel=_TUNE),
    write_config: bool = typer.Option(True, "--write/--no-write", help="tune: write the chosen settings into "
                                      "config.yaml.", rich_help_panel=_TUNE),
) -> None:
    """Benchmark a model repository in-process (`bench REPO`), a running Open Inference Protocol
    server (`bench --url URL --model NAME`), or tune serve-kit's batching (`bench tune REPO`).

    Online, closed loop (--concurrency) hides server stalls: a stalled client sends nothing, so
    the stall counts once. Open loop (--rate) times each request from its intended send time, so
    a stall shows in the percentiles. Numbers are measured in windows until stable and marked
    UNSTABLE otherwise. Gates: --assert, --baseline with --max-regression; a failed gate exits 3.
    """
    from ..bench import report as rep

    assertions = [rep.parse_assertion(a) for a in asserts]
    regression = rep.parse_regression(max_regression)
    baseline_doc = rep.load_baseline(baseline) if baseline else None
    if plot is not None:
        rep.require_matplotlib()
    if arrival not in ("poisson", "constant"):
        raise UsageError("--arrival is poisson or constant", value=arrival, origin="--arrival")
    if encoding not in ("binary", "json"):
        raise UsageError("--encoding is binary or json", value=encoding, origin="--encoding")
    windows = _window_settings(duration, window, min_windows, max_windows)

    if target == "tune":
        result = _tune(tune_repository, model, url, rate, p99_budget_ms, data, synthetic, write_config, warmup,
                       windows, stability, timeout, batch_sizes, concurrency)
    elif tune_repository is not None:
        raise UsageError("unexpected second argument", value=str(tune_repository), origin="serve-kit bench",
                         hint="`serve-kit bench REPO` (offline) or `serve-kit bench tune REPO`")
    elif url is not None:
        if target is not None:
            raise UsageError("give a repository (offline) or --url (online), not both", value=target,
                             origin="serve-kit bench", hint="online inputs from a repository: --data REPO")
        if not model:
            raise UsageError("--url needs --model NAME", origin="--model")
        result = _online(url, model, version, concurrency, rate, arrival, encoding, batch_size, data, synthetic,
                         workers, timeout, max_connections, warmup, windows, stability)
    elif target is not None:
        result = _offline(Path(target), model, version, batch_sizes, synthetic, warmup, windows, stability, no_flops,
                          no_eager)
    else:
        raise UsageError("nothing to benchmark", origin="serve-kit bench",
                         hint="serve-kit bench REPO (offline), serve-kit bench --url http://127.0.0.1:8000 "
                              "--model NAME --data REPO (online), or serve-kit bench tune REPO --model NAME "
                              "--p99-budget-ms X")

    if target != "tune":
        gates = rep.check_assertions(result, assertions)
        result["gates"] = gates
        if baseline_doc is not None:
            result["baseline"] = {"path": str(baseline), **rep.compare(result, baseline_doc, regression)}
    if report is not None:
        import json

        from ..repository import atomic_write_text

        atomic_write_text(report, json.dumps(result, indent=2, default=str) + "\n")
    if plot is not None and target != "tune":
        rep.plot(result, plot)
    if state.json:
        emit_json(result)
    else:
        _render(result)
        if plot is not None and target != "tune":
            out.print(f"plot: {escape(str(plot))}")
        if report is not None:
            out.print(f"report: {escape(str(report))}")
    if target == "tune":
        if result.get("chosen") is None or not result.get("verified"):
            raise GateFailed(result.get("reason") or "no setting met the p99 budget", origin="--p99-budget-ms",
                             hint="a larger budget, a lower --rate, or a faster variant of the model")
        return
    failed = [g for g in result.get("gates", []) if not g["passed"]]
    regressed = (result.get("baseline") or {}).get("regressed") or []
    if failed or regressed:
        parts = []
        if failed:
            parts.append("gate(s) failed: " + ", ".join(sorted({f"{g['gate']} on {g['result']}" for g in failed})))
        if regressed:
            parts.append(f"regressed beyond {regression * 100:g}% against {baseline}: " + ", ".join(regressed))
        raise GateFailed("; ".join(parts), origin="--assert" if failed else "--baseline",
                         hint="the report lists every gate and comparison")


def _window_settings(duration, window, min_windows, max_windows) -> dict[str, Any]:
    if min_windows < 1 or max_windows < 1:
        raise UsageError("--min-windows and --max-windows are at least 1", origin="--min-windows")
    if max_windows < min_windows:
        raise UsageError(f"--max-windows {max_windows} is below --min-windows {min_windows}", origin="--max-windows")
    if window is not None and not (window > 0 and math.isfinite(window)):
        raise UsageError("--window is a positive number of seconds", value=window, origin="--window")
    settings: dict[str, Any] = {"window": window, "min_windows": min_windows, "max_windows": max_windows}
    if duration is not None:
        if not (duration > 0 and math.isfinite(duration)):
            raise UsageError("--duration is a positive number of seconds", value=duration, origin="--duration")
        w = window or min(1.0, duration)
        n = max(1, round(duration / w))
        settings.update(window=duration / n, min_windows=n, max_windows=n)
    return settings


def _online(url, model, version, concurrency, rate, arrival, encoding, batch_size, data, synthetic, workers, timeout,
            max_connections, warmup, windows, stability) -> dict:
    from pydantic import ValidationError

    from ..bench.online import OnlineJob, run_online
    from ..config import _first_error

    if concurrency is not None and rate is not None:
        raise UsageError("give --concurrency (closed loop) or --rate (open loop), not both", origin="--rate")
    try:
        job = OnlineJob(url=url, model=model, version=version, encoding=encoding,
                        concurrency=_ints(concurrency, "--concurrency"), rates=_floats(rate, "--rate"),
                        arrival=arrival, batch_size=batch_size, data=data, synthetic=synthetic, workers=workers,
                        warmup_s=1.0 if warmup is None else warmup, window_s=windows["window"] or 1.0,
                        min_windows=windows["min_windows"], max_windows=windows["max_windows"],
                        stability_pct=stability, timeout_s=timeout, max_connections=max_connections)
    except ValidationError as e:
        raise UsageError(f"invalid bench settings: {_first_error(e)}", origin="serve-kit bench") from None
    return run_with_progress(run_online, job)


def _offline(repository, model, version, batch_sizes, synthetic, warmup, windows, stability, no_flops,
             no_eager=False) -> dict:
    from ..bench.offline import OfflineJob, run_offline

    if version is not None and (not version.isascii() or not version.isdigit() or int(version) < 1):
        raise UsageError("a model version is a positive integer", value=version, origin="--version")
    job = OfflineJob(repository=repository, models=[model] if model else None,
                     versions=[int(version)] if version else None,
                     batch_sizes=_ints(batch_sizes, "--batch-sizes") or None,
                     warmup_s=0.5 if warmup is None else warmup, window_s=windows["window"] or 0.5,
                     min_windows=windows["min_windows"], max_windows=windows["max_windows"],
                     stability_pct=stability, synthetic=synthetic, flops=not no_flops, eager=not no_eager)
    return run_with_progress(run_offline, job)


def _tune(repository, model, url, rate, p99_budget_ms, data, synthetic, write_config, warmup, windows, stability,
          timeout, batch_sizes, concurrency) -> dict:
    from ..bench.tune import TuneJob, run_tune

    if repository is None:
        raise UsageError("`bench tune` needs a repository", origin="serve-kit bench tune",
                         hint="serve-kit bench tune REPO --model NAME --p99-budget-ms 20")
    if url is not None:
        raise UsageError("`bench tune` starts its own server; --url does not apply", origin="--url")
    if p99_budget_ms is None or not (p99_budget_ms > 0 and math.isfinite(p99_budget_ms)):
        raise UsageError("`bench tune` needs --p99-budget-ms, a positive number", value=p99_budget_ms,
                         origin="--p99-budget-ms")
    rates = _floats(rate, "--rate")
    if len(rates) > 1:
        raise UsageError("`bench tune` takes one --rate (the load to tune for)", value=rate, origin="--rate")
    job = TuneJob(repository=repository, model=model, p99_budget_ms=p99_budget_ms, rate=rates[0] if rates else None,
                  data=data, synthetic=synthetic, write=write_config,
                  warmup_s=1.0 if warmup is None else warmup, window_s=windows["window"] or 1.0,
                  windows=windows["min_windows"], stability_pct=stability, timeout_s=timeout,
                  batch_sizes=_ints(batch_sizes, "--batch-sizes") or None,
                  concurrency=_ints(concurrency, "--concurrency") or None)
    return run_with_progress(run_tune, job)


# ---------------------------------------------------------------------------------------------
# Rendering


def _f(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _n(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _render(result: dict) -> None:
    kind = result.get("kind")
    if kind == "online":
        _render_online(result)
    elif kind == "offline":
        _render_offline(result)
    elif kind == "tune":
        from ..bench.tune import render

        render(result, out)
        return
    for w in result.get("warnings", []):
        err.print(f"[bold yellow]warning:[/] {escape(w)}")
    if result.get("synthetic"):
        err.print("[bold yellow]WARNING: measured on SYNTHETIC random inputs[/]")
    for g in result.get("gates", []):
        mark = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
        actual = "not measured" if g["actual"] is None else f"{g['actual']:.6g}"
        out.print(f"gate {mark}: {escape(g['gate'])} on {escape(g['result'])} (actual {actual})")
    b = result.get("baseline")
    if b:
        _render_baseline(b)


def _render_online(r: dict) -> None:
    t = r["target"]
    inputs = r["inputs"]
    data = "SYNTHETIC random inputs" if r["synthetic"] else f"{inputs['samples']} real samples from {inputs['origin']}"
    table = Table(title=f"serve-kit bench: {escape(t['model'])} at {escape(t['url'])} ({t['protocol']}, "
                        f"{t['encoding']}, batch {t['batch_size']}, {r['mode']} loop; {escape(data)})")
    open_loop = r["mode"] == "open"
    table.add_column("rate/s" if open_loop else "concurrency", justify="right", style="bold")
    if open_loop:
        table.add_column("sent/s", justify="right")
    table.add_column("infer/s", justify="right")
    for c in ("p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"):
        table.add_column(c, justify="right")
    table.add_column("errors", justify="right")
    table.add_column("windows", justify="right")
    table.add_column("gen CPU", justify="right")
    for p in r["results"]:
        row = [f"{p['offered_rate']:g}" if open_loop else str(p["concurrency"])]
        if open_loop:
            row.append(_n(p["sent_per_s"]))
        row.append(_n(p["throughput"]))
        row += [_f(p["p50_ms"]), _f(p["p90_ms"]), _f(p["p99_ms"]), _f(p["p999_ms"]), _f(p["max_ms"])]
        errs = ", ".join(f"{k}: {v}" for k, v in p["errors"].items())
        row.append(f"[red]{escape(errs)}[/]" if errs else "0")
        row.append(f"{p['windows_measured']}" + ("" if p["stable"] else " [red]UNSTABLE[/]"))
        cpu = max(p["generator"]["cpu_per_worker"], default=0)
        row.append(f"[red]{cpu:.0%}[/]" if p["generator"]["saturated"] else f"{cpu:.0%}")
        table.add_row(*row)
    out.print(table)
    if open_loop:
        lags = ", ".join(f"{p['key']}: p99 {_f(p['send_lag']['p99_ms'])} ms" for p in r["results"])
        out.print(f"send lag (actual - intended send time, included in the latencies): {lags}", highlight=False)


def _render_offline(r: dict) -> None:
    peak = r.get("peak")
    table = Table(title=f"serve-kit bench (offline, in-process): {escape(r['repository'])}"
                        + (f"; FP32 GEMM peak {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s" if peak else ""))
    for c, j in (("model", "left"), ("version", "right"), ("variant", "left"), ("batch", "right"),
                 ("p50 ms", "right"), ("p90 ms", "right"), ("p95 ms", "right"), ("p99 ms", "right"),
                 ("samples/s", "right"), ("MFLOP/sample", "right"), ("of peak", "right"), ("load RSS", "right"),
                 ("peak RSS", "right"), ("windows", "right")):
        table.add_column(c, justify=j)
    for p in r["results"]:
        f = p.get("flops") or {}
        mem = p.get("memory") or {}
        frac = f.get("fraction_of_peak")
        table.add_row(escape(p["model"]), str(p["version"]), escape(p["variant"]), str(p["batch_size"]),
                      _f(p["p50_ms"]), _f(p["p90_ms"]), _f(p["p95_ms"]), _f(p["p99_ms"]), _n(p["throughput"]),
                      _f(f["per_sample"] / 1e6, 2) if f.get("per_sample") else "-",
                      (f"{frac:.1%}" + ("" if f.get("complete", True) else " (partial)")) if frac is not None else "-",
                      human_size(mem["load_rss_delta_bytes"]) if mem.get("load_rss_delta_bytes") is not None else "-",
                      human_size(mem["peak_rss_delta_bytes"]) if mem.get("peak_rss_delta_bytes") is not None else "-",
                      f"{p['windows_measured']}" + ("" if p["stable"] else " [red]UNSTABLE[/]"))
    out.print(table)
    from ..bench.report import render_gpu

    render_gpu(r, out)
    for s in r.get("skipped", []):
        out.print(f"[yellow]not measured[/]: {escape(s['model'])} v{s['version']} ({s['backend']}): "
                  f"{escape(s['reason'])}")


def _render_baseline(b: dict) -> None:
    table = Table(title=f"against baseline {escape(b['path'])} (fails beyond {b['max_regression_pct']:g}% with "
                        f"{b['confidence']:.0%} confidence)")
    for c in ("result", "metric", "baseline", "now", "change", "95% interval", "verdict"):
        table.add_column(c, justify="left" if c in ("result", "metric", "verdict") else "right")
    for row in b["rows"]:
        if row["status"] == "no baseline":
            table.add_row(escape(row["result"]), "-", "-", "-", "-", "-", "[dim]no baseline[/]")
            continue
        for c in row["checks"]:
            if "change_pct" not in c:
                table.add_row(escape(row["result"]), c["metric"], "-", "-", "-", "-", c["status"])
                continue
            style = "red" if c["regressed"] else ("yellow" if c["status"].startswith("worse") else "green")
            table.add_row(escape(row["result"]), c["metric"], f"{c['baseline']:,.4g}", f"{c['current']:,.4g}",
                          f"{c['change_pct']:+.1f}%", f"{c['ci_low_pct']:+.1f}% .. {c['ci_high_pct']:+.1f}%",
                          f"[{style}]{c['status']}[/]")
    out.print(table)
