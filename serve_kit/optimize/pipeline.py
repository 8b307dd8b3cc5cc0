"""The optimize pipeline: source -> variants -> validation gates -> latency -> one new version.

Every target ends in one row (`passed | failed | not-applicable | unavailable | error | bug`):
a failure inside one never stops the others, and the run's report is written whatever happens
(`<model>/.runs/`, and inside the version it wrote). Fail-closed: a variant that misses its
gate is never written, and a missed gate or an error blocks writing altogether unless
`keep_going`. The reference and the passing variants are measured interleaved; the fastest is
written only when it is stably faster than the reference (else the source, or nothing).
`outcome` turns a report into the command's exit code (README "Exit codes").
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import (DEFAULT_GATES, DataSpec, GateConfig, LatencySpec, ModelConfig, RepositorySpec, SourceSpec,
                      TargetSpec, TensorSpec, parse_model)
from ..errors import DataError, ServeKitError, TargetNotApplicable, TargetUnavailable, UsageError
from ..progress import ProgressSink
from ..repository import (REPORT, SAMPLES, Repository, atomic_write_text, check_model_name, disk_error,
                          write_samples)
from ..runtime.backends import load_backend
from . import calibration as cal
from . import signature
from .source import Source, load_source
from .target import Artifact, BuildContext, Target, target_class
from .validate import Metric, validate

DEFAULT_TARGETS = ["torchscript", "onnx", "onnx-int8-static", "onnx-int8-dynamic", "onnx-int4"]
SAMPLES_STORED = 8
REPORT_NAME = REPORT
BUILD_CACHE = ".build-cache"
"""Beside config.yaml: caches that make rebuilds repeatable and fast (TensorRT's timing cache)."""


@dataclass
class OptimizeJob:
    source: SourceSpec
    repository: Path
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    data: DataSpec = field(default_factory=DataSpec)
    allow_synthetic: bool = False
    metric: str | None = None
    targets: list[TargetSpec] = field(default_factory=list)
    gates: dict[str, GateConfig] = field(default_factory=dict)
    latency: LatencySpec = field(default_factory=LatencySpec)
    repo_spec: RepositorySpec = field(default_factory=RepositorySpec)
    model_name: str | None = None
    select: str = "fastest"
    keep_going: bool = False
    recipe: str | None = None
    report_path: Path | None = None
    constants: dict[str, Any] = field(default_factory=dict)
    """Input name -> value baked into the model (`--constant sr=16000`); see optimize/signature.py."""
    state: dict[str, str] = field(default_factory=dict)
    """Output name -> the input it feeds at the next step (`--state stateN=state`)."""
    strict: bool = False
    """Targets that do not apply or cannot run here count as errors (block writing, exit 1)."""
    force: bool = False
    """Write even when the signature or source differ from the model's latest version."""
    memory_budget: int | None = None
    """Bytes calibration and diagnosis may hold (BuildContext.memory_budget); None = the targets'
    default (a quarter of the RAM)."""
    min_speedup: float = 1.0
    """The fastest passing variant must be stably this much faster than the reference..."""
    when_slower: str = "source"
    """...else `source` writes the source model as is, `nothing` writes nothing."""


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
               "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
               "TIB": 1 << 40}


def parse_size(text: str, origin: str = "--max-memory") -> int:
    """Bytes from `4G`, `512M`, `1.5GiB` or a plain number of bytes (binary units: 1K = 1024)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise UsageError("not a memory size", value=text, origin=origin,
                         hint="a number with an optional unit K, M, G or T (binary: 1K = 1024), e.g. 4G or 512M")
    value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value < 1 << 20:
        raise UsageError("memory budget below 1 MiB", value=text, origin=origin, hint="e.g. 4G or 512M")
    return value


def tool_versions() -> dict[str, str]:
    out = {"serve-kit": __version__, "python": platform.python_version()}
    for dist in ("numpy", "onnx", "onnxruntime", "torch", "onnxscript", "transformers", "sentence-transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------


def _load_data(job: OptimizeJob, specs: list[TensorSpec] | None, progress: ProgressSink,
               optional: frozenset[str] = frozenset(), streams: bool = False, ignore: frozenset[str] = frozenset()
               ) -> tuple[cal.DataSplit | None, dict | None]:
    """The data split, or raw arrays when the signature must first be inferred from them.
    `optional`: inputs the data may lack (state, starting from zeros); `streams`: samples are
    consecutive chunks of streams (kept in order by the split); `ignore`: arrays to drop (inputs
    made constants)."""
    d = job.data
    if d.function:
        if specs is None:
            raise UsageError("a recipe with a data function must declare its inputs", origin="recipe inputs")
        return cal.from_function(d.function, specs, d.label_key, optional, ignore), None
    if d.calibration:
        if specs is None:
            arrays, _ = cal.load_arrays(Path(d.calibration), [], d.label_key)
            return None, {k: v for k, v in arrays.items() if k not in ignore}
        return _split_from_paths(d, specs, optional, streams, ignore), None
    if d.evaluation:
        raise UsageError("--eval-data needs --calibration-data too", origin="--eval-data")
    if not job.allow_synthetic:
        raise DataError("no calibration/evaluation data given: every variant is validated on real data",
                        origin="--calibration-data",
                        hint="give --calibration-data PATH (.npz, .npy or a folder of them) or a recipe; "
                             "--allow-synthetic-calibration uses random data (accuracy then means little)")
    if specs is None:
        raise UsageError("synthetic data need the input signature", origin="--input",
                         hint="give --input NAME:DATATYPE:SHAPE")
    progress.warn("WARNING: calibrating and validating on SYNTHETIC random data "
                  "(--allow-synthetic-calibration); accuracy figures say nothing about real inputs")
    return cal.DataSplit(cal.synthetic(specs, min(d.max_calibration_samples, 128), seed=0),
                         cal.synthetic(specs, min(d.max_evaluation_samples, 128), seed=1)), None


def _split_from_paths(d: DataSpec, specs: list[TensorSpec], optional: frozenset[str] = frozenset(),
                      streams: bool = False, ignore: frozenset[str] = frozenset()) -> cal.DataSplit:
    arrays, origin = cal.load_arrays(Path(d.calibration), specs, d.label_key)
    calib = cal.to_dataset(arrays, specs, d.label_key, origin, optional, ignore)
    if d.evaluation:
        arrays, origin = cal.load_arrays(Path(d.evaluation), specs, d.label_key)
        return cal.DataSplit(calib, cal.to_dataset(arrays, specs, d.label_key, origin, optional, ignore))
    return cal.split(calib, d.max_calibration_samples, d.max_evaluation_samples, streams=streams)


def _cap(split: cal.DataSplit, d: DataSpec) -> cal.DataSplit:
    c, e = split.calibration, split.evaluation
    if len(c) > d.max_calibration_samples:
        c = c.subset(np.arange(d.max_calibration_samples))
    if len(e) > d.max_evaluation_samples:
        e = e.subset(np.arange(d.max_evaluation_samples))
    return cal.DataSplit(c, e)


def _gate_for(job: OptimizeJob, precision: str, spec: TargetSpec) -> tuple[GateConfig, str]:
    gate = DEFAULT_GATES[precision].merged(job.gates.get(precision)).merged(spec.gate)
    origin = "default" if gate == DEFAULT_GATES[precision] else "user"
    return gate, origin


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-9)) for x in xs) / len(xs))


def run(job: OptimizeJob, progress: ProgressSink | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the report (also written as JSON). See the module docstring."""
    progress = progress or ProgressSink()
    # Every target's config is checked before any work: a typo in the last target must not cost
    # the minutes the others take.
    target_specs = job.targets or [TargetSpec(name=n) for n in DEFAULT_TARGETS]
    targets = [target_class(spec.name)(spec.config) for spec in target_specs]
    model_name = job.model_name or job.repo_spec.model_name or job.recipe or "model"
    # A folder name in the repository, never a path: checked before any work (it would otherwise
    # fail only when the version is written, minutes later, or write outside the repository).
    check_model_name(model_name, "--name")
    started = time.time()
    report: dict[str, Any] = {
        "serve_kit": __version__, "recipe": job.recipe, "model": model_name,
        "repository": str(job.repository), "tools": tool_versions(), "select": job.select,
        "keep_going": job.keep_going, "strict": job.strict, "when_slower": job.when_slower, "started_unix": started, "variants": [], "written": None,
        "run_report_path": str(Repository(job.repository).run_report_path(model_name)),
    }
    # The report is written whatever happens (a bug, Ctrl-C, a bad input found halfway): a run
    # that cost minutes must leave its record (contract 6).
    try:
        try:
            _run(job, progress, target_specs, targets, model_name, report)
        except OSError as e:
            # A full disk (or quota, or read-only folder) anywhere in the run: one line naming the
            # path, not a traceback; a version being staged was already removed (new_version).
            err = disk_error(e)
            if err is None:
                raise
            raise err from None
    except BaseException as e:
        report["aborted"] = _aborted(e)
        raise
    finally:
        report["seconds"] = round(time.time() - started, 2)
        report["exit_code"] = report.get("aborted", {}).get("exit_code", outcome(report, job.strict))
        try:
            _write_report(job, model_name, report)
        except OSError as e:
            # Never hide why the run stopped behind a failure to log it.
            progress.warn(f"could not write the run's report: {e}")
            if "aborted" not in report:
                from ..errors import RepositoryError

                raise RepositoryError(f"could not write the run's report: {e.strerror or e}",
                                      value=str(e.filename or report["run_report_path"]),
                                      origin="--repository / --report") from None
    return report


def _aborted(e: BaseException) -> dict[str, Any]:
    """Why a run stopped before its end (the report's `aborted`)."""
    import traceback

    from ..errors import EXIT_ERROR, EXIT_INTERRUPTED

    if isinstance(e, KeyboardInterrupt):
        return {"status": "interrupted", "error": "interrupted (Ctrl-C)", "exit_code": EXIT_INTERRUPTED}
    if isinstance(e, ServeKitError):
        return {"status": "error", "error": e.render(), "exit_code": e.exit_code}
    return {"status": "bug", "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:500]}",
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)), "exit_code": EXIT_ERROR}


def _run(job: OptimizeJob, progress: ProgressSink, target_specs: list[TargetSpec], targets: list[Target],
         model_name: str, report: dict[str, Any]) -> None:
    """The pipeline's steps; fills `report` as it goes (so that an abort leaves what was done)."""
    with progress.task("load source model"):
        source = load_source(job.source)

    # -- signature (optimize/signature.py: batch axes, constants, state) ---------------------------
    sig, split = signature.resolve(job, source, lambda specs, **kw: _load_data(job, specs, progress, **kw))
    split = _cap(split, job.data)
    inputs, outputs = sig.inputs, sig.outputs
    if sig.hidden_state:
        progress.warn(f"WARNING: {sig.hidden_state}")
    for ds in (split.calibration, split.evaluation):
        if ds.synthetic:
            progress.warn(f"{ds.origin}: synthetic data")

    # -- reference ------------------------------------------------------------------------------
    report.update({"source": source.describe(),
                   "inputs": [s.model_dump() for s in inputs], "outputs": [s.model_dump() for s in outputs],
                   "calibration": split.calibration.describe(), "evaluation": split.evaluation.describe(),
                   "metric": job.metric})
    # Repository safety: known before any target runs, so refused before any work.
    changes = signature_changes(job.repository, model_name, inputs, outputs, report["source"])
    if changes and not job.force:
        raise UsageError(f"model {model_name!r} in the repository is another model: " + "; ".join(changes),
                         origin=f"{job.repository / model_name}",
                         hint="write it under another name (--name), or as the next version anyway with --force "
                              "(recorded in the report and the manifest)")
    prev = previous_source(job.repository, model_name)
    if prev and prev.get("sha256") and prev.get("sha256") != report["source"].get("sha256"):
        report["source_previous"] = {k: prev.get(k) for k in ("version", "ref", "sha256")}
    if changes:
        report["forced"] = changes
        progress.warn(f"--force: writing over a changed model: {'; '.join(changes)}")
    metric = Metric(job.metric) if job.metric else None
    if metric and split.evaluation.labels is None:
        raise DataError(f"metric {job.metric!r} needs labels, and the evaluation data have none",
                        origin="evaluation data", hint=f"add a {job.data.label_key!r} array")
    if metric:
        metric.check_labels(split.evaluation.labels, len(split.evaluation), split.evaluation.origin or "evaluation data",
                            job.data.label_key)
    with progress.task(f"reference outputs ({source.reference_name})", len(split.evaluation)) as adv:
        # Stateful: closed-loop over the streams; the state inputs then hold what the reference saw.
        if sig.pristine:  # state kept inside: the reference starts from the state as shipped
            source.model = sig.pristine()
        evaluation, ref_out = sig.complete(source.run, split.evaluation, advance=adv)
    split = cal.DataSplit(sig.calibration_set(source.run, split.calibration), evaluation)
    if sig.pristine:  # ... and so does every variant exported from it
        source.model = sig.pristine()
    ref_metric = metric(ref_out, split.evaluation.labels) if metric else None
    report["reference"] = {"name": source.reference_name, "metric": ref_metric}
    report.update(sig.describe())

    workdir = Path(tempfile.mkdtemp(prefix="serve-kit-optimize-"))
    try:
        ctx = BuildContext(source, inputs, outputs, split.calibration, workdir, progress,
                           cache_dir=job.repository / model_name / BUILD_CACHE,
                           max_batch_size=_served_max_batch(job, model_name), memory_budget=job.memory_budget)
        built: dict[str, Artifact] = {}
        for spec, target in zip(target_specs, targets):
            record, artifact = _run_target(job, spec, target, ctx, split.evaluation, ref_out, metric, ref_metric,
                                           progress)
            report["variants"].append(record)
            if artifact is not None:
                built[spec.name] = artifact
            gc.collect()

        # -- latency -----------------------------------------------------------------------------
        _measure_latency(job, model_name, report, source, built, split.evaluation, progress)

        # -- selection and write -----------------------------------------------------------------
        _select_and_write(job, model_name, report, built, split.evaluation, ref_out, source, ctx, metric,
                          ref_metric, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def signature_changes(repository: Path, model_name: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                      source: dict[str, Any]) -> list[str]:
    """How a new version would differ from the model's latest one: inputs/outputs (names,
    datatypes, shapes, as config.yaml holds them) and the source (its kind, a factory's name).
    Empty when the model is new or the same model (retrained: another file is fine)."""
    repo = Repository(repository)
    cfg_path = repository / model_name / "config.yaml"
    if not cfg_path.exists():
        return []
    cfg = Repository(repository).config(model_name)  # checked and bounded like every repository read
    out = []
    for what, old, new in (("input", cfg.inputs, inputs), ("output", cfg.outputs, outputs)):
        o, n = {t.name: t for t in old}, {t.name: t for t in new}
        if list(o) != list(n):
            out.append(f"{what}s {list(o)} -> {list(n)}")
        for name in o.keys() & n.keys():
            if o[name].model_dump() != n[name].model_dump():
                out.append(f"{what} {o[name].describe()} -> {n[name].describe()}")
    numbers = repo.version_numbers(model_name)
    if numbers:
        info = repo.version(model_name, numbers[-1])
        old_src = (info.manifest or {}).get("source") or {}
        factory = source.get("kind") == "torch" and source.get("format") != "torch.export"
        if old_src.get("kind") != source.get("kind"):
            out.append(f"source kind {old_src.get('kind')} (v{info.version}) -> {source.get('kind')}")
        elif factory and old_src.get("ref") != source.get("ref"):
            out.append(f"source factory {old_src.get('ref')} (v{info.version}) -> {source.get('ref')}")
        # Another file of the same kind and signature (sha256) is the model retrained: the
        # normal next version, recorded in the report (`source_previous`) and not refused.
    return out


def previous_source(repository: Path, model_name: str) -> dict[str, Any] | None:
    """The source record of the model's latest version, if any."""
    repo = Repository(repository)
    numbers = repo.version_numbers(model_name) if (repository / model_name).is_dir() else []
    if not numbers:
        return None
    info = repo.version(model_name, numbers[-1])
    return {"version": info.version, **((info.manifest or {}).get("source") or {})}


def _served_threads(job: OptimizeJob, model_name: str) -> int:
    """The intra-op thread count the server (and `serve-kit bench`) will give each backend
    instance of the written version: every figure is measured at it, the eager reference too.
    (torch's default, the whole machine, made eager digits read 95 ms instead of 0.1 ms when the
    cores were busy: its OpenMP threads waited on each other.)"""
    from ..runtime.models import available_cores, backend_options, default_intra_op_threads

    cfg_path = job.repository / model_name / "config.yaml"
    if cfg_path.exists():
        return int(backend_options(Repository(job.repository).config(model_name), available_cores())["intra_op_threads"])
    return default_intra_op_threads(available_cores(), job.repo_spec.instance_group.count)


def _measure_latency(job: OptimizeJob, model_name: str, report: dict[str, Any], source: Source,
                     built: dict[str, Artifact], evaluation: cal.Dataset, progress: ProgressSink) -> None:
    """Contract 8: the reference and every passed variant, interleaved in the same windows, at
    the server's thread count; a speedup only where both sides are stable."""
    from ..bench.offline import STABILITY_PCT, interleaved_speedup, measure_interleaved

    threads = _served_threads(job, model_name)
    ref_name = source.reference_name
    report["latency_settings"] = {"intra_op_threads": threads, "min_seconds": job.latency.min_seconds,
                                  "stability_pct": STABILITY_PCT, "interleaved": True}
    makers: dict[str, Any] = {ref_name: lambda: _reference_runner(source, threads)}
    for rec in report["variants"]:
        if rec["status"] == "passed":
            makers[rec["name"]] = (lambda a=built[rec["name"]]: _backend_for(
                a, source.inputs, source.outputs, {"intra_op_threads": threads}).infer)
    fns: dict[str, Any] = {}
    for name, make in makers.items():
        try:
            fns[name] = make()
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the run
            _latency_failed(report, name, e, progress)
    sizes = job.latency.batch_sizes
    latency: dict[str, dict[str, Any]] = {n: {} for n in fns}
    with progress.task(f"measure latency (interleaved, {threads} thread(s))", len(sizes)) as adv, \
            _torch_threads(threads, source):
        for b in sizes:
            results, errors = measure_interleaved(fns, evaluation.tiled(b), b, rounds=3,
                                                  min_seconds=job.latency.min_seconds, reference=ref_name)
            for name, e in errors.items():
                fns.pop(name, None)
                latency.pop(name, None)
                _latency_failed(report, name, e, progress)
            for name, r in results.items():
                latency[name][str(b)] = r
            adv(1)
    fns.clear()
    gc.collect()
    ref_lat = latency.get(ref_name)
    report["reference"]["latency"] = ref_lat
    for rec in report["variants"]:
        lat = latency.get(rec["name"])
        if lat is None or rec["name"] == ref_name:
            continue
        rec["latency"] = lat
        if ref_lat:
            cmp = {b: interleaved_speedup(ref_lat[b], v) for b, v in lat.items()}
            rec["speedup"] = {b: (c["ratio"] if c["stable"] else None) for b, c in cmp.items()}
            rec["speedup_range"] = {b: c["range"] for b, c in cmp.items()}
            # The median round-by-round ratio, stable or not: a record, never a claim (`speedup`).
            rec["speedup_median"] = {b: c["ratio"] for b, c in cmp.items()}
            unstable = [b for b, c in cmp.items() if not c["stable"]]
            if unstable:
                rec["speedup_unstable"] = unstable


def _reference_runner(source: Source, threads: int):
    """The reference as it would be served: an ONNX source in its own session with the server's
    options (its validation session ran with ONNX Runtime's defaults)."""
    if source.kind == "onnx":
        from ..runtime.backends import load_backend

        return load_backend("onnxruntime", source.model, output_names=[o.name for o in source.outputs or []],
                            options={"intra_op_threads": threads}).infer
    return source.run


@contextlib.contextmanager
def _torch_threads(threads: int, source: Source):
    """torch's intra-op width for the measurement (eager and TorchScript run in this thread)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or threads <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _latency_failed(report: dict[str, Any], name: str, e: Exception, progress: ProgressSink) -> None:
    row = failure_row(e, "latency")
    if name == report["reference"]["name"]:
        report["reference"]["latency_error"] = row
        progress.log(f"{name}: latency not measured: {row['error']}", "red")
        return
    rec = next(r for r in report["variants"] if r["name"] == name)
    rec.pop("latency", None)
    # A variant that breaks on the latency inputs (other batch sizes) would break when served.
    rec.update(row)
    _log_row(progress, name, rec)


BLOCKING = ("failed", "error", "bug")
"""Row statuses that block writing without --keep-going (fail-closed; contract 5)."""


def blocking_rows(report: dict[str, Any], strict: bool) -> list[dict[str, Any]]:
    """The rows that keep a run from writing unless --keep-going: missed gates, errors and bugs;
    under --strict also targets that did not apply or could not run here."""
    statuses = BLOCKING + (("not-applicable", "unavailable") if strict else ())
    return [r for r in report["variants"] if r["status"] in statuses]


def outcome(report: dict[str, Any], strict: bool = False) -> int:
    """The exit code of a run (contract 5; README "Exit codes"):

    1 if any row is `bug`; else 0 if a version was written; else 3 if any row missed its gate;
    else 1 (errors, or no target applied). With `--select none` (validate only), or
    `--when-slower nothing` when no variant was faster, nothing is meant to be written: 0 unless a
    row failed, erred or (under --strict) did not apply.
    """
    from ..errors import EXIT_ERROR, EXIT_GATE, EXIT_OK

    rows = report.get("variants") or []
    if any(r["status"] == "bug" for r in rows):
        return EXIT_ERROR
    if report.get("written"):
        return EXIT_OK
    if any(r["status"] == "failed" for r in rows):
        return EXIT_GATE
    if report.get("select") == "none" and not blocking_rows(report, strict) and rows:
        return EXIT_OK
    if report.get("slower") and report.get("when_slower") == "nothing" and not blocking_rows(report, strict):
        return EXIT_OK  # asked to write nothing that is not faster: done as asked
    return EXIT_ERROR


def _select_and_write(job: OptimizeJob, model_name: str, report: dict[str, Any], built: dict[str, Artifact],
                      evaluation: cal.Dataset, ref_out: dict[str, np.ndarray], source: Source, ctx: BuildContext,
                      metric: Metric | None, ref_metric: float | None, progress: ProgressSink) -> None:
    variants = report["variants"]
    passed = [r for r in variants if r["status"] == "passed"]
    blocking = blocking_rows(report, job.strict)
    report["gate_failed"] = [r["name"] for r in variants if r["status"] == "failed"]
    report["errors"] = [r["name"] for r in variants if r["status"] in ("error", "bug")]
    if job.strict:
        report["strict_blocking"] = [r["name"] for r in variants if r["status"] in ("not-applicable", "unavailable")]
    chosen = None
    if job.select not in ("fastest", "none"):
        chosen = next((r for r in passed if r["name"] == job.select), None)
        if chosen is None:
            status = next((r["status"] for r in variants if r["name"] == job.select), "not run")
            report["selection_error"] = f"--select {job.select}: that variant {status}"
    elif job.select == "fastest" and passed:
        chosen = _fastest(job, report, [r for r in passed if r.get("latency")])
        if chosen is None and report.get("slower") and job.when_slower == "source" \
                and not (blocking and not job.keep_going):
            chosen = _source_row(job, report, built, source, ctx, evaluation, ref_out, metric, ref_metric, progress)
    report["selected"] = chosen["name"] if chosen else None
    if chosen and (not blocking or job.keep_going):
        report["written"] = _write_version(job, model_name, chosen, built[chosen["name"]], report,
                                           evaluation, ref_out, ctx.source.signature)
    elif chosen:
        report["not_written_because"] = (", ".join(f"{r['name']} {r['status']}" for r in blocking)
                                         + " (use --keep-going to write the fastest passing one anyway)")
    elif report.get("slower"):
        why = report["slower"]
        if job.when_slower == "nothing":
            why += " (--when-slower nothing)"
        elif blocking and not job.keep_going:
            why += "; and the source is not written either: " + ", ".join(
                f"{r['name']} {r['status']}" for r in blocking) + " (--keep-going writes it anyway)"
        report["not_written_because"] = why
    elif passed and job.select == "fastest":
        report["not_written_because"] = "no passing variant could be measured (see its row)"
    elif job.select != "none" and not report.get("selection_error"):
        report["not_written_because"] = "no variant passed its gate"


def _fastest(job: OptimizeJob, report: dict[str, Any], timed: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest passing variant that is stably faster than the reference by --min-speedup at
    every measured batch size (_stably_faster); None (and report["slower"] says why) when there
    is none."""
    if not timed:
        return None
    by_speed = sorted(timed, key=lambda r: _geomean([v["p50_ms"] for v in r["latency"].values()]))
    if not report["reference"].get("latency"):
        report["speedup_note"] = "the reference's latency was not measured: the fastest variant is written unchecked"
        return by_speed[0]
    x = job.min_speedup
    for rec in by_speed:
        if _stably_faster(rec, x):
            return rec
    best = by_speed[0]
    figures = ", ".join(f"@{b}: " + (f"{v:.2f}x" if v is not None else
                                      "UNSTABLE {:.2f}-{:.2f}x".format(*best["speedup_range"][b]))
                        for b, v in (best.get("speedup") or {}).items())
    report["slower"] = (f"no passing variant is stably faster than the source ({report['reference']['name']}) "
                        f"by {x:g}x; the fastest, {best['name']}, measured {figures}")
    return None


def _stably_faster(rec: dict[str, Any], x: float) -> bool:
    """Faster than the reference by `x` at every batch size: a stable ratio of at least `x`, or,
    where the windows were not stable, `x` or more in every single round (the whole range)."""
    sp, rng = rec.get("speedup") or {}, rec.get("speedup_range") or {}
    if not rng:
        return False
    return all((sp.get(b) is not None and sp[b] >= x) or r[0] >= x for b, r in rng.items())


def _source_row(job: OptimizeJob, report: dict[str, Any], built: dict[str, Artifact], source: Source,
                ctx: BuildContext, evaluation: cal.Dataset, ref_out: dict[str, np.ndarray], metric: Metric | None,
                ref_metric: float | None, progress: ProgressSink) -> dict[str, Any] | None:
    """--when-slower source: the source model written as is, as its own row `source` (an ONNX or
    TorchScript file is copied; an eager PyTorch source is served through its FP32 TorchScript or
    ONNX export, whichever passed and measured faster). Validated like any variant."""
    rec: dict[str, Any] = {"name": "source", "precision": "fp32", "config": {}, "reason": report["slower"]}
    # A TorchScript file with bound constants is not servable as is: its exports stand in for it.
    if source.kind == "onnx" or (source.kind == "torchscript" and not ctx.source.signature.constants):
        backend, fname = ("onnxruntime", "model.onnx") if source.kind == "onnx" else ("torchscript", "model.pt")
        d = ctx.workdir / "source"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.model if source.kind == "onnx" else source.ref, d / fname)
        artifact = Artifact(d / fname, backend, details={"source_file": source.ref})
        try:
            b = _backend_for(artifact, ctx.inputs, ctx.outputs)
            sig = ctx.source.signature
            out = sig.run(b.infer, evaluation)
            del b
            gate, rec["gate_origin"] = _gate_for(job, "fp32", TargetSpec(name="source"))
            v = validate(sig.batch_first(out), sig.batch_first(ref_out), evaluation, metric, ref_metric, gate)
        except Exception as e:  # noqa: BLE001 - the row says what broke, the run goes on
            rec.update(backend=backend, **failure_row(e, "validate"))
            report["variants"].append(rec)
            _log_row(progress, "source", rec)
            return None
        rec.update(backend=backend, status="passed" if v.result.passed else "failed", validation=v.to_dict(),
                   details=artifact.details, size_bytes=artifact.path.stat().st_size,
                   latency=report["reference"].get("latency"))
    else:
        fp32 = [r for r in report["variants"] if r["name"] in ("torchscript", "onnx") and r["status"] == "passed"
                and r.get("latency")]
        if not fp32:
            report["slower"] += ("; the eager source can only be written through its FP32 torchscript or onnx "
                                 "export, and neither passed here (add -t onnx or -t torchscript)")
            return None
        via = min(fp32, key=lambda r: _geomean([v["p50_ms"] for v in r["latency"].values()]))
        artifact = built[via["name"]]
        rec.update({k: via[k] for k in ("backend", "status", "validation", "size_bytes", "latency", "speedup",
                                        "speedup_range", "gate_origin") if k in via},
                   details={**via.get("details", {}), "exported_by": via["name"]})
    report["variants"].append(rec)
    if rec["status"] != "passed":
        return None
    built["source"] = artifact
    progress.log(f"{report['slower']}: writing the source model as is (--when-slower source)", "yellow")
    return rec


def _served_max_batch(job: OptimizeJob, model_name: str) -> int:
    """The max_batch_size the written config.yaml will have (_write_version keeps an existing one)."""
    cfg_path = job.repository / model_name / "config.yaml"
    limit = Repository(job.repository).config(model_name).max_batch_size if cfg_path.exists() \
        else job.repo_spec.max_batch_size
    return max(limit, 1)


def _backend_for(artifact: Artifact, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 extra: dict[str, Any] | None = None):
    return load_backend(artifact.backend, artifact.path, output_names=[o.name for o in outputs],
                        options={"input_names": [s.name for s in inputs], **(extra or {}),
                                 **artifact.backend_options})


def _run_target(job: OptimizeJob, spec: TargetSpec, target: Target, ctx: BuildContext, evaluation: cal.Dataset,
                ref_out: dict[str, np.ndarray], metric: Metric | None, ref_metric: float | None,
                progress: ProgressSink) -> tuple[dict[str, Any], Artifact | None]:
    """Build, load and validate one target (retrying with the target's own suggestions after a
    missed gate). Never raises for what happens inside the target: every outcome is a row
    (contract: `passed | failed | not-applicable | unavailable | error | bug`)."""
    cls = type(target)
    record: dict[str, Any] = {"name": spec.name, "precision": cls.precision, "backend": cls.backend,
                              "config": target.config.model_dump()}
    attempt, history, phase = 0, [], "check"
    try:
        reason = target.unavailable_reason(ctx.source)
        if reason:
            record.update(status="unavailable", reason=reason)
            progress.log(f"{spec.name}: unavailable: {reason}", "dim")
            return record, None
        gate, gate_origin = _gate_for(job, cls.precision, spec)
        record["gate_origin"] = gate_origin
        while True:
            attempt += 1
            record["attempts"] = attempt
            outdir = ctx.workdir / f"{spec.name}-{attempt}"
            t0 = time.perf_counter()
            phase = "build"
            with progress.task(f"build {spec.name}" + (f" (attempt {attempt})" if attempt > 1 else "")):
                artifact = target.build(ctx, outdir)
            build_s = time.perf_counter() - t0
            phase = "load"
            backend = _backend_for(artifact, ctx.inputs, ctx.outputs)
            phase = "validate"
            sig = ctx.source.signature
            with progress.task(f"validate {spec.name}", len(evaluation)) as adv:
                # As served: a stateful variant runs closed-loop on its own state.
                out = sig.run(backend.infer, evaluation, advance=adv)
            del backend
            v = validate(sig.batch_first(out), sig.batch_first(ref_out), evaluation, metric, ref_metric, gate)
            record.update(status="passed" if v.result.passed else "failed", validation=v.to_dict(),
                          details=artifact.details, size_bytes=artifact.path.stat().st_size,
                          build_seconds=round(build_s, 2), attempts=attempt, config=target.config.model_dump())
            if v.result.passed:
                return record, artifact
            progress.log(f"{spec.name}: gate missed: " + "; ".join(v.result.failures), "yellow")
            phase = "retry"
            new_config = target.retry_config(ctx, artifact, evaluation, attempt)
            history.append({"attempt": attempt, "failures": v.result.failures,
                            **({"diagnosis": artifact.details["diagnosis"]} if "diagnosis" in artifact.details else {})})
            record["history"] = history
            if new_config is None:
                return record, None
            target = cls(new_config)
    except Exception as e:  # noqa: BLE001 - one target's failure must never lose the run
        row = failure_row(e, phase)
        if record.get("status") == "failed":
            # The gate was missed and then the retry (the diagnosis) broke: the miss stands, and
            # what broke is kept beside it.
            record["retry_error"] = row
        else:
            record.pop("validation", None)
            record.update(row)
        _log_row(progress, spec.name, record)
        return record, None


def failure_row(e: BaseException, phase: str | None = None) -> dict[str, Any]:
    """The row fields for an exception raised while a target ran (contract 4).

    TargetNotApplicable -> not-applicable, TargetUnavailable -> unavailable (cause in `reason`);
    another ServeKitError, or an exception raised inside a library (ONNX Runtime, onnx, torch,
    Model Optimizer, numpy, the user's own model code) -> error, naming the library and the first
    line of its message; an exception raised by serve-kit's own code -> bug, with its traceback.
    """
    import traceback

    where = {"phase": phase} if phase else {}
    if isinstance(e, TargetNotApplicable):
        return {"status": "not-applicable", "reason": e.render(), **where}
    if isinstance(e, TargetUnavailable):
        return {"status": "unavailable", "reason": e.render(), **where}
    if isinstance(e, ServeKitError):
        return {"status": "error", "error": e.render(), **where}
    first = _first_line(e)
    library, function = raised_in(e)
    if library is None:
        return {"status": "bug", "error": f"{type(e).__name__}: {first}",
                "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)), **where}
    text = f"{library} raised {type(e).__name__}" + (f" in {function}" if function else "") + (f": {first}" if first else "")
    return {"status": "error", "error": text, "library": library, **where}


def _first_line(e: BaseException) -> str:
    """The line of an exception's message that says what went wrong. (TorchScript puts its
    interpreter's stack first and the raised error last.)"""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    if "TorchScript interpreter" in lines[0] and len(lines) > 1:
        return lines[-1][:500]
    return lines[0][:500]


def raised_in(e: BaseException) -> tuple[str | None, str | None]:
    """(top-level package, module.function) of the code that raised `e`, or (None, None) when
    serve-kit's own code did. The innermost Python frame decides; an exception type defined by
    a library (e.g. ONNX Runtime's `Fail`, raised from C++ called by our code) names that library."""
    import traceback

    frames = list(traceback.walk_tb(e.__traceback__))
    if frames:
        frame = frames[-1][0]
        module = frame.f_globals.get("__name__", "") or ""
        top = module.split(".")[0]
        if top and top != "serve_kit":
            return top, f"{module}.{frame.f_code.co_name}"
    etype_top = (type(e).__module__ or "").split(".")[0]
    if etype_top not in ("builtins", "serve_kit", ""):
        return etype_top, None
    return None, None


def _log_row(progress: ProgressSink, name: str, record: dict[str, Any]) -> None:
    status = record["status"]
    if status in ("not-applicable", "unavailable"):
        progress.log(f"{name}: {status}: {record['reason']}", "dim")
    elif status in ("error", "bug"):
        progress.log(f"{name}: {status}: {record['error']}", "red")
    if record.get("retry_error"):
        progress.log(f"{name}: after the missed gate, the retry failed: {record['retry_error']['error']}", "red")


def _write_version(job: OptimizeJob, model_name: str, rec: dict[str, Any], artifact: Artifact,
                   report: dict[str, Any], evaluation: cal.Dataset, ref_out: dict[str, np.ndarray],
                   sig: signature.Signature) -> dict[str, Any]:
    repo = Repository(job.repository)
    inputs = [TensorSpec(**s) for s in report["inputs"]]
    outputs = [TensorSpec(**s) for s in report["outputs"]]
    cfg_path = job.repository / model_name / "config.yaml"
    spec = job.repo_spec
    fresh = dict(name=model_name, backend=rec["backend"], max_batch_size=sig.served_max_batch(spec.max_batch_size),
                 inputs=inputs, outputs=outputs, dynamic_batching=spec.dynamic_batching,
                 instance_group=spec.instance_group)
    if cfg_path.exists():
        # Keep the serving settings someone may have tuned; the signature and backend follow the model.
        old = repo.config(model_name)
        fresh.update(dynamic_batching=old.dynamic_batching, instance_group=old.instance_group,
                     max_batch_size=sig.served_max_batch(old.max_batch_size), version_policy=old.version_policy,
                     warmup=old.warmup, parameters=old.parameters)
    if sig.hidden_state:
        # A warm-up request would leave its state for the first client's stream.
        fresh["warmup"] = {"batch_sizes": []}
    # What the file needs to load as validated (e.g. `device: cuda`) wins over older parameters.
    fresh["parameters"] = {**fresh.get("parameters", {}),
                           **{k: _parameter(v) for k, v in artifact.backend_options.items()}}
    if fresh["max_batch_size"] == 0:
        fresh["dynamic_batching"] = None
    config = parse_model(ModelConfig, fresh, f"config for {model_name}")
    with repo.new_version(model_name) as stage:
        model_file = artifact.path.name
        shutil.copyfile(artifact.path, stage.dir / model_file)
        n = min(SAMPLES_STORED, len(evaluation))
        write_samples(stage.dir / SAMPLES, sig.head(evaluation.inputs, n), sig.head(ref_out, n))
        manifest = {
            "model_file": model_file, "backend": rec["backend"], "variant": rec["name"],
            "precision": rec["precision"], "source": report["source"],
            "calibration": report["calibration"], "evaluation": report["evaluation"],
            "tools": report["tools"], "target_config": rec["config"], "details": rec.get("details", {}),
            "validation": rec["validation"], "latency": rec.get("latency"),
            "speedup": {"over": report["reference"]["name"], "stable_ratio": rec.get("speedup"),
                        "range": rec.get("speedup_range")},
            "reference": {"name": report["reference"]["name"], "metric": report["reference"]["metric"]},
            "recipe": report["recipe"], "samples_file": SAMPLES,
            **sig.describe(),
            **({"forced": report["forced"]} if report.get("forced") else {}),
        }
        version = stage.commit(config, manifest, extra_files=lambda v: {
            REPORT: _report_text(_version_report(job, model_name, rec, report, v))})
    return _written(job, model_name, rec, version)


def _written(job: OptimizeJob, model_name: str, rec: dict[str, Any], version: int) -> dict[str, Any]:
    return {"model": model_name, "version": version, "path": str(job.repository / model_name / str(version)),
            "variant": rec["name"]}


def _version_report(job: OptimizeJob, model_name: str, rec: dict[str, Any], report: dict[str, Any],
                    version: int) -> dict[str, Any]:
    """The report as it reads once `version` is written (the copy kept inside the version)."""
    written = _written(job, model_name, rec, version)
    out = {**report, "written": written, "report_path": str(Path(written["path"]) / REPORT),
           "seconds": round(time.time() - report["started_unix"], 2)}
    out["exit_code"] = outcome(out, job.strict)
    return out


def _parameter(value: Any) -> str:
    """config.yaml parameters are strings (Triton's convention); backend_options() reads them back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _report_text(report: dict[str, Any]) -> str:
    import json

    return json.dumps(report, indent=2, default=_json_default) + "\n"


def _write_report(job: OptimizeJob, model_name: str, report: dict[str, Any]) -> None:
    """Contract 6: always `<model>/.runs/<time>-<pid>.json`; the written version holds its own
    copy (written with it, see _write_version); `--report PATH` gets one more."""
    runs = Path(report["run_report_path"])
    w = report.get("written")
    report["report_path"] = str(Path(w["path"]) / REPORT) if w else str(runs)
    text = _report_text(report)
    atomic_write_text(runs, text)
    if job.report_path:
        atomic_write_text(Path(job.report_path), text)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
