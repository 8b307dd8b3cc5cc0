"""`serve-kit optimize`: export and quantize a model, validate every variant, write the fastest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..config import (DEFAULT_GATES, DataSpec, GateConfig, LatencySpec, RepositorySpec, SourceSpec, TargetSpec,
                      TensorSpec)
from ..errors import UsageError
from . import app
from ._common import err, human_size, out, run_with_progress, show


def _parse_gate(items: list[str]) -> dict[str, dict]:
    from ..config import parse_gate_args

    return parse_gate_args(items)


def _spec_list(items: list[str], flag: str) -> list[TensorSpec] | None:
    return [TensorSpec.parse(i, flag) for i in items] or None


@app.command()
def optimize(
    model: Optional[str] = typer.Argument(None, help="Model: .onnx, TorchScript .pt, torch.export .pt2, or a "
                                                      "factory package.module:function returning an nn.Module."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A packaged recipe name (see `serve-kit recipes list`) "
                                                                "or a recipe YAML file."),
    repository: Path = typer.Option(Path("model-repository"), "--repository", "-r", help="Model repository to write."),
    model_name: Optional[str] = typer.Option(None, "--name", help="Model name in the repository."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights for a factory: .safetensors or a state_dict "
                                                                  "(loaded with weights_only=True)."),
    inputs: list[str] = typer.Option([], "--input", help="Input spec NAME:DATATYPE:SHAPE[@AXIS], e.g. "
                                                         "input:FP32:-1x1x8x8, state:FP32:2x-1x128@1 (batch on axis 1), "
                                                         "x:FP32:3x4@none (no batch axis), sr:INT64:scalar "
                                                         "(repeat per input)."),
    outputs: list[str] = typer.Option([], "--output", help="Output spec NAME:DATATYPE:SHAPE (repeat per output)."),
    targets: list[str] = typer.Option([], "--target", "-t", help="Target to build (repeat), with settings if wanted: "
                                                                 "NAME:KEY=VALUE,..., e.g. onnx-int8-static:"
                                                                 "calibration_method=entropy,diagnose=false or "
                                                                 "onnx-int8-dynamic:op_types=MatMul+Gemm,"
                                                                 "gate.max_flip_rate=0.02; default: the recipe's, "
                                                                 "else all CPU targets."),
    calibration_data: Optional[str] = typer.Option(None, "--calibration-data", help=".npz, .npy or folder of them."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out evaluation data (default: a split of "
                                                                      "the calibration data)."),
    label_key: Optional[str] = typer.Option(None, "--label-key", help="Array name holding labels (default: labels)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="`top1` or module:function(outputs, labels)."),
    allow_synthetic: bool = typer.Option(False, "--allow-synthetic-calibration",
                                         help="Calibrate and validate on random data (loudly labelled)."),
    gate: list[str] = typer.Option([], "--gate", help="Loosen or tighten a gate: PRECISION.FIELD=VALUE, e.g. "
                                                      "int8.max_metric_drop=0.5, all.min_cosine=0.999, "
                                                      "int8.max_flip_rate=none (off) or all.kinds.OUTPUT=probability "
                                                      "(see README \"Gates\")."),
    select: str = typer.Option("fastest", "--select", help="`fastest` passing variant, a target name, or `none` "
                                                           "(validate only, write nothing)."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Write the fastest passing variant even when "
                                                                "others miss their gate or fail (exit 0 unless a "
                                                                "row is a serve-kit bug)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Latency batch sizes, e.g. 1,32."),
    latency_seconds: Optional[float] = typer.Option(None, "--latency-seconds", help="Seconds of latency measurement "
                                                    "per batch size, in 3+ interleaved rounds (default 0.5; 1.5 "
                                                    "gives bench's 0.5 s windows, steadier ratios)."),
    # -- model shapes (optimize/signature.py) --
    constants: list[str] = typer.Option([], "--constant", help="Bake an input or forward() argument into the model: "
                                                               "NAME=VALUE (a number, bool, string or JSON list), e.g. "
                                                               "sr=16000; it leaves the served signature (repeat)."),
    state: list[str] = typer.Option([], "--state", help="OUTPUT=INPUT: the output feeds the input at the next call, "
                                                        "e.g. stateN=state; data are then consecutive chunks of "
                                                        "streams, run closed-loop (repeat)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report here (it is always kept "
                                                                 "in <repository>/<model>/.runs/, and in the version "
                                                                 "it wrote)."),
    strict: bool = typer.Option(False, "--strict", help="Targets that do not apply or cannot run here count as "
                                                        "errors: nothing is written (without --keep-going), exit 1."),
    force: bool = typer.Option(False, "--force", help="Write a version whose inputs/outputs or source differ from "
                                                      "the model's latest version (recorded in the report)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget of calibration and diagnosis, "
                                                                        "e.g. 4G, 512M or bytes (default: a quarter "
                                                                        "of the RAM)."),
    min_speedup: float = typer.Option(1.0, "--min-speedup", help="The fastest passing variant must be stably this "
                                                                 "much faster than the source, else --when-slower "
                                                                 "applies."),
    when_slower: str = typer.Option("source", "--when-slower", help="When no variant is stably faster by "
                                                                    "--min-speedup: `source` writes the source model "
                                                                    "as is, `nothing` writes nothing."),
) -> None:
    """Export and quantize a model, validate every variant against the reference on held-out real
    data, and write the fastest variant that passed its gate as the next version in the repository.

    A variant that misses its gate is never written. A missed gate or an error blocks writing unless --keep-going; targets that do not apply never do, except with --strict.

    Exit codes:
    0 a version was written (with --select none, or --when-slower nothing when no variant was faster: nothing failed);
    1 a serve-kit bug in any row, or nothing written because of errors or no target applied;
    2 usage error (before any work);
    3 nothing written and a variant missed its gate.
    """
    from ..optimize.pipeline import outcome, run

    job = _build_job(model, recipe, repository, model_name, weights, inputs, outputs, targets, calibration_data,
                     eval_data, label_key, metric, allow_synthetic, gate, select, keep_going, batch_sizes, report)
    _shapes_options(job, constants, state)
    _pipeline_options(job, strict, force, max_memory, min_speedup, when_slower, latency_seconds)
    result = run_with_progress(run, job)
    show(result, render)
    for v in result["variants"]:
        if v["status"] == "bug":  # serve-kit's own bug: the traceback, for the bug report
            err.print(f"[red]{v['name']}: a bug in serve-kit[/] (please report it):\n{escape(v['traceback'])}",
                      highlight=False)
    code = outcome(result, job.strict)
    if code:
        err.print(f"[red]{_why_not_ok(result, code)}[/] (exit {code}; report: {escape(result['report_path'])})")
        raise typer.Exit(code)


def _pipeline_options(job, strict: bool, force: bool, max_memory: str | None, min_speedup: float,
                      when_slower: str, latency_seconds: float | None = None) -> None:
    from ..config import LatencySpec
    from ..optimize.pipeline import parse_size

    if latency_seconds is not None:
        if not latency_seconds > 0:
            raise UsageError("--latency-seconds must be positive, e.g. 1.5", value=latency_seconds,
                             origin="--latency-seconds")
        job.latency = LatencySpec(batch_sizes=job.latency.batch_sizes, min_seconds=latency_seconds)

    if when_slower not in ("source", "nothing"):
        raise UsageError("--when-slower is `source` or `nothing`", value=when_slower, origin="--when-slower")
    if not min_speedup > 0:
        raise UsageError("--min-speedup must be a positive ratio, e.g. 1.2", value=min_speedup,
                         origin="--min-speedup")
    job.strict, job.force, job.min_speedup, job.when_slower = strict, force, min_speedup, when_slower
    if max_memory is not None:
        job.memory_budget = parse_size(max_memory, "--max-memory")


def _why_not_ok(result: dict, code: int) -> str:
    by = lambda *s: [v["name"] for v in result["variants"] if v["status"] in s]  # noqa: E731
    if by("bug"):
        return f"serve-kit bug in: {', '.join(by('bug'))}"
    if result.get("selection_error"):
        return result["selection_error"]
    if code == 3:
        return (f"variant(s) missed their accuracy gate: {', '.join(by('failed'))}; nothing written "
                "(loosen a gate on purpose with --gate, drop the target, or --keep-going)")
    if result.get("not_written_because"):
        return f"nothing written: {result['not_written_because']}"
    return "nothing written"


def _build_job(model, recipe, repository, model_name, weights, inputs, outputs, targets, calibration_data,
               eval_data, label_key, metric, allow_synthetic, gate, select, keep_going, batch_sizes, report):
    from ..optimize.pipeline import OptimizeJob
    from ..optimize.target import target_class
    from ..recipes import load_recipe

    r = load_recipe(recipe) if recipe else None
    if model is None and r is None:
        raise UsageError("give a MODEL or --recipe", origin="serve-kit optimize",
                         hint="e.g. serve-kit optimize --recipe digits-cnn; `serve-kit recipes list` shows them")
    if model is not None:
        source = SourceSpec(factory=model, weights=weights) if (":" in model and not Path(model).exists()) \
            else SourceSpec(path=model)
        if weights and source.path:
            raise UsageError("--weights goes with a factory module:function", value=weights, origin="--weights")
    else:
        source = r.model if not weights else SourceSpec(factory=r.model.factory, weights=weights)
    data = r.data.model_copy() if r else DataSpec()
    if calibration_data or eval_data:
        data = data.model_copy(update={"function": None, "calibration": calibration_data, "evaluation": eval_data})
    if label_key:
        data = data.model_copy(update={"label_key": label_key})
    gates = {k: v.model_copy() for k, v in (r.gates.items() if r else [])}
    for prec, fields in _parse_gate(gate).items():
        gates[prec] = gates.get(prec, GateConfig()).merged(GateConfig(**fields))
    if targets:
        from ..optimize.target_args import parse_target_args

        target_specs = parse_target_args(targets, r.targets if r else None)
    else:
        target_specs = list(r.targets) if r else []
    for t in target_specs:
        target_class(t.name)  # unknown names fail here, before any work
    latency = r.latency if r else LatencySpec()
    if batch_sizes:
        try:
            latency = LatencySpec(batch_sizes=[int(b) for b in batch_sizes.split(",")], min_seconds=latency.min_seconds)
        except ValueError:
            raise UsageError("batch sizes must be positive integers separated by commas", value=batch_sizes,
                             origin="--batch-sizes") from None
    return OptimizeJob(
        source=source, repository=repository,
        inputs=_spec_list(inputs, "--input") or (r.inputs if r else None),
        outputs=_spec_list(outputs, "--output") or (r.outputs if r else None),
        data=data, allow_synthetic=allow_synthetic, metric=metric or (r.metric if r else None),
        targets=target_specs, gates=gates, latency=latency,
        repo_spec=r.repository if r else RepositorySpec(),
        model_name=model_name, select=select, keep_going=keep_going, recipe=r.name if r else None,
        report_path=report,
        constants=dict(r.constants) if r else {}, state=dict(r.state) if r else {})


def _shapes_options(job, constants: list[str], state: list[str]) -> None:
    """--constant and --state (checked here, before any work; applied by optimize/signature.py)."""
    from ..optimize.signature import parse_constants, parse_state

    job.constants = {**job.constants, **parse_constants(constants)}
    job.state = {**job.state, **parse_state(state)}


def _fmt_ms(v: dict | None, b: str) -> str:
    if not v or b not in v:
        return "-"
    return f"{v[b]['p50_ms']:.3f}" + ("" if v[b].get("stable", True) else " [yellow]~[/]")


def _fmt_speedup(v: dict, b: str) -> str:
    """A speedup only from a stable interleaved comparison; else UNSTABLE with its range."""
    sp = (v.get("speedup") or {}).get(b)
    if sp is not None:
        return f"{sp:.2f}x"
    rng = (v.get("speedup_range") or {}).get(b)
    return f"[yellow]UNSTABLE[/] {rng[0]:.2f}-{rng[1]:.2f}x" if rng else "-"


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _phase(v: dict) -> str:
    return f" ({v['phase']})" if v.get("phase") else ""


def render(result: dict) -> None:
    sizes = [str(b) for b in (result["reference"].get("latency") or {}).keys()]
    table = Table(title=f"serve-kit optimize: {result['model']} "
                        f"(reference: {result['reference']['name']}, {result['evaluation']['samples']} held-out samples"
                        + (", SYNTHETIC data" if result["evaluation"]["synthetic"] else "") + ")")
    table.add_column("variant", style="bold")
    table.add_column("size", justify="right")
    for b in sizes:
        table.add_column(f"p50 ms @{b}", justify="right")
        table.add_column(f"speedup @{b}", justify="right")
    table.add_column("max abs err", justify="right")
    table.add_column("cosine", justify="right")
    table.add_column(result["metric"] or "metric", justify="right")
    table.add_column("gate")
    ref = result["reference"]
    row = [ref["name"], "-"]
    for b in sizes:
        row += [_fmt_ms(ref.get("latency"), b), "1.00x"]
    row += ["-", "-", f"{ref['metric']:.2f}" if ref.get("metric") is not None else "-", "reference"]
    table.add_row(*row, style="dim")
    for v in result["variants"]:
        val = v.get("validation") or {}
        errors = val.get("errors") or {}
        row = [v["name"] + (" *" if v["name"] == result.get("selected") and result.get("written") else ""),
               human_size(v["size_bytes"]) if v.get("size_bytes") else "-"]
        for b in sizes:
            row += [_fmt_ms(v.get("latency"), b), _fmt_speedup(v, b)]
        row.append(f"{max(e['max_abs_error'] for e in errors.values()):.2e}" if errors else "-")
        # One-element outputs have no cosine (None): it would be 1.0 whatever the error.
        cosines = [e["cosine_mean"] for e in errors.values() if e.get("cosine_mean") is not None]
        row.append(f"{min(cosines):.6f}" if cosines else "-")
        if val.get("metric") is not None:
            d = val.get("metric_delta")
            row.append(f"{val['metric']:.2f} ({d:+.2f})" if d is not None else f"{val['metric']:.2f}")
        else:
            row.append("-")
        status = v["status"]
        style = {"passed": "green", "failed": "red", "error": "red", "bug": "bold red", "unavailable": "dim",
                 "not-applicable": "yellow"}.get(status, "")
        label = "not applicable" if status == "not-applicable" else status
        if status == "passed" and v.get("gate_origin") == "user":
            label += " (user gate)"
        if v.get("attempts", 1) > 1:
            label += f" after {v['attempts']} tries"
        if status in ("unavailable", "not-applicable"):
            # The cause in the table; the whole reason (with how to get it) once, below it.
            label += f": {_first_line(v['reason']).split('; ')[0]}"
        elif status in ("error", "bug"):
            label += f": {_first_line(v['error'])[:80]}"
        row.append(f"[{style}]{escape(label)}[/]")
        table.add_row(*row)
    out.print(table)
    reasons: dict[tuple[str, str], list[str]] = {}
    for v in result["variants"]:
        if v["status"] in ("unavailable", "not-applicable") and v["reason"] != _first_line(v["reason"]).split("; ")[0]:
            reasons.setdefault((v["status"], v["reason"]), []).append(v["name"])
    for (status, reason), names in reasons.items():
        word = "not applicable" if status == "not-applicable" else status
        out.print(f"[dim]{', '.join(names)} {word}: {escape(reason)}[/]")
    for v in result["variants"]:
        kept = (v.get("details") or {}).get("nodes_kept_in_float")
        if kept:
            out.print(f"[yellow]{v['name']}[/]: kept in float after diagnosis: {', '.join(kept)}")
        if v["status"] == "failed":
            out.print(f"[red]{v['name']} missed its gate:[/] " + "; ".join(
                c["text"] for c in v["validation"]["checks"] if not c["passed"]))
        if v["status"] == "error":
            out.print(f"[red]{v['name']} failed{_phase(v)}:[/] {escape(v['error'])}", highlight=False)
        if v.get("retry_error"):
            out.print(f"[red]{v['name']}: after the missed gate, the retry failed:[/] "
                      f"{escape(v['retry_error']['error'])}", highlight=False)
    if result.get("slower"):
        out.print(f"[yellow]{escape(result['slower'])}[/]")
    lat = result.get("latency_settings")
    if lat:
        out.print(f"[dim]latency: reference and variants interleaved, {lat['intra_op_threads']} intra-op thread(s) "
                  f"(the server's); UNSTABLE = windows differ by more than {lat['stability_pct']:g}%, no speedup "
                  "claimed[/]")
    w = result.get("written")
    if w:
        out.print(f"[green]wrote[/] {w['model']} version {w['version']} ({w['variant']}) -> {w['path']}")
    elif result.get("not_written_because"):
        out.print(f"[red]nothing written[/]: {result['not_written_because']}")
    out.print(f"report: {result['report_path']}  ({result['seconds']:.1f} s)")
    if result["evaluation"]["synthetic"]:
        err.print("[bold yellow]WARNING: validated on SYNTHETIC data[/]")
