"""The optimize pipeline: source -> variants -> validation gates -> latency -> one new version.

Fail-closed: a variant that misses its accuracy gate is never written. By default the whole run
then fails (exit 3) and the repository is left as it was; with `keep_going` the fastest variant
that passed is written and the misses are reported.
"""

from __future__ import annotations

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
from ..bench.offline import measure
from ..config import (DEFAULT_GATES, DataSpec, GateConfig, LatencySpec, ModelConfig, RepositorySpec, SourceSpec,
                      TargetSpec, TensorSpec, parse_model)
from ..errors import DataError, ServeKitError, UsageError
from ..progress import ProgressSink
from ..repository import SAMPLES, Repository, atomic_write_text, load_model_config, write_samples
from ..runtime.backends import load_backend
from . import calibration as cal
from . import signature
from .source import Source, load_source
from .target import Artifact, BuildContext, Target, target_class
from .validate import Metric, validate

DEFAULT_TARGETS = ["torchscript", "onnx", "onnx-int8-static", "onnx-int8-dynamic", "onnx-int4"]
SAMPLES_STORED = 8
REPORT_NAME = "optimize-report.json"
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
        return cal.from_function(d.function, specs, d.label_key), None
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
    started = time.time()
    with progress.task("load source model"):
        source = load_source(job.source)

    # -- signature (optimize/signature.py: batch axes, constants, state) ---------------------------
    sig, split = signature.resolve(job, source, lambda specs, **kw: _load_data(job, specs, progress, **kw))
    split = _cap(split, job.data)
    inputs, outputs = sig.inputs, sig.outputs
    for ds in (split.calibration, split.evaluation):
        if ds.synthetic:
            progress.warn(f"{ds.origin}: synthetic data")

    # -- reference ------------------------------------------------------------------------------
    metric = Metric(job.metric) if job.metric else None
    if metric and split.evaluation.labels is None:
        raise DataError(f"metric {job.metric!r} needs labels, and the evaluation data have none",
                        origin="evaluation data", hint=f"add a {job.data.label_key!r} array")
    if metric:
        metric.check_labels(split.evaluation.labels, len(split.evaluation), split.evaluation.origin or "evaluation data",
                            job.data.label_key)
    with progress.task(f"reference outputs ({source.reference_name})", len(split.evaluation)) as adv:
        # Stateful: closed-loop over the streams; the state inputs then hold what the reference saw.
        evaluation, ref_out = sig.complete(source.run, split.evaluation, advance=adv)
    split = cal.DataSplit(sig.calibration_set(source.run, split.calibration), evaluation)
    ref_metric = metric(ref_out, split.evaluation.labels) if metric else None

    model_name = job.model_name or job.repo_spec.model_name or job.recipe or "model"
    report: dict[str, Any] = {
        "serve_kit": __version__, "recipe": job.recipe, "model": model_name,
        "repository": str(job.repository), "source": source.describe(),
        "inputs": [s.model_dump() for s in inputs], "outputs": [s.model_dump() for s in outputs],
        "calibration": split.calibration.describe(), "evaluation": split.evaluation.describe(),
        "metric": job.metric, "reference": {"name": source.reference_name, "metric": ref_metric},
        **sig.describe(),
        "tools": tool_versions(), "variants": [],
    }

    workdir = Path(tempfile.mkdtemp(prefix="serve-kit-optimize-"))
    try:
        ctx = BuildContext(source, inputs, outputs, split.calibration, workdir, progress,
                           cache_dir=job.repository / model_name / BUILD_CACHE,
                           max_batch_size=_served_max_batch(job, model_name))
        built: dict[str, Artifact] = {}
        for spec, target in zip(target_specs, targets):
            record, artifact = _run_target(job, spec, target, ctx, split.evaluation, ref_out, metric, ref_metric,
                                           progress)
            report["variants"].append(record)
            if artifact is not None:
                built[spec.name] = artifact

        # -- latency -----------------------------------------------------------------------------
        # One runner loaded at a time: an ONNX Runtime session that just ran keeps its pool
        # spinning for a while and steals a core from the next one measured.
        runners = {source.reference_name: lambda: source.run}
        for rec in report["variants"]:
            if rec["status"] == "passed":
                runners[rec["name"]] = (lambda a=built[rec["name"]]: _backend_for(a, inputs, outputs).infer)
        sizes = job.latency.batch_sizes
        latency: dict[str, dict[str, Any]] = {}
        with progress.task("measure latency", len(runners) * len(sizes)) as adv:
            for name, make in runners.items():
                fn = make()
                latency[name] = {}
                for b in sizes:
                    latency[name][str(b)] = measure(fn, split.evaluation.tiled(b), b, job.latency.min_seconds).to_dict()
                    adv(1)
                del fn
                gc.collect()
        ref_lat = latency[source.reference_name]
        report["reference"]["latency"] = ref_lat
        for rec in report["variants"]:
            if rec["name"] in latency:
                rec["latency"] = latency[rec["name"]]
                rec["speedup"] = {b: ref_lat[b]["p50_ms"] / v["p50_ms"] for b, v in latency[rec["name"]].items()}

        # -- selection and write -----------------------------------------------------------------
        passed = [r for r in report["variants"] if r["status"] == "passed"]
        failed = [r for r in report["variants"] if r["status"] in ("failed", "error")]
        report["gate_failed"] = [r["name"] for r in report["variants"] if r["status"] == "failed"]
        report["errors"] = [r["name"] for r in report["variants"] if r["status"] == "error"]
        chosen = None
        if job.select not in ("fastest", "none"):
            chosen = next((r for r in passed if r["name"] == job.select), None)
            if chosen is None:
                status = next((r["status"] for r in report["variants"] if r["name"] == job.select), "not run")
                report["selection_error"] = f"--select {job.select}: that variant {status}"
        elif job.select == "fastest" and passed:
            chosen = min(passed, key=lambda r: _geomean([v["p50_ms"] for v in r["latency"].values()]))
        report["selected"] = chosen["name"] if chosen else None
        report["written"] = None
        if chosen and (not failed or job.keep_going):
            report["written"] = _write_version(job, model_name, chosen, built[chosen["name"]], report,
                                               split.evaluation, ref_out, sig)
        elif chosen:
            report["not_written_because"] = ("variants failed: " + ", ".join(r["name"] for r in failed)
                                             + " (use --keep-going to write the fastest passing one anyway)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = round(time.time() - started, 2)
    _write_report(job, model_name, report)
    return report


def _served_max_batch(job: OptimizeJob, model_name: str) -> int:
    """The max_batch_size the written config.yaml will have (_write_version keeps an existing one)."""
    cfg_path = job.repository / model_name / "config.yaml"
    limit = load_model_config(cfg_path).max_batch_size if cfg_path.exists() else job.repo_spec.max_batch_size
    return max(limit, 1)


def _backend_for(artifact: Artifact, inputs: list[TensorSpec], outputs: list[TensorSpec]):
    return load_backend(artifact.backend, artifact.path, output_names=[o.name for o in outputs],
                        options={"input_names": [s.name for s in inputs], **artifact.backend_options})


def _run_target(job: OptimizeJob, spec: TargetSpec, target: Target, ctx: BuildContext, evaluation: cal.Dataset,
                ref_out: dict[str, np.ndarray], metric: Metric | None, ref_metric: float | None,
                progress: ProgressSink) -> tuple[dict[str, Any], Artifact | None]:
    cls = type(target)
    record: dict[str, Any] = {"name": spec.name, "precision": cls.precision, "backend": cls.backend,
                              "config": target.config.model_dump()}
    reason = target.unavailable_reason(ctx.source)
    if reason:
        record.update(status="unavailable", reason=reason)
        progress.log(f"{spec.name}: unavailable: {reason}", "dim")
        return record, None
    gate, gate_origin = _gate_for(job, cls.precision, spec)
    record["gate_origin"] = gate_origin
    attempt, history = 0, []
    while True:
        attempt += 1
        outdir = ctx.workdir / f"{spec.name}-{attempt}"
        t0 = time.perf_counter()
        try:
            with progress.task(f"build {spec.name}" + (f" (attempt {attempt})" if attempt > 1 else "")):
                artifact = target.build(ctx, outdir)
        except ServeKitError as e:
            record.update(status="error", error=e.render(), attempts=attempt)
            progress.log(f"{spec.name}: {e.render()}", "red")
            return record, None
        build_s = time.perf_counter() - t0
        backend = _backend_for(artifact, ctx.inputs, ctx.outputs)
        sig = ctx.source.signature
        with progress.task(f"validate {spec.name}", len(evaluation)) as adv:
            # As served: a stateful variant runs closed-loop on its own state.
            out = sig.run(backend.infer, evaluation, advance=adv)
        v = validate(sig.batch_first(out), sig.batch_first(ref_out), evaluation, metric, ref_metric, gate)
        record.update(status="passed" if v.result.passed else "failed", validation=v.to_dict(),
                      details=artifact.details, size_bytes=artifact.path.stat().st_size,
                      build_seconds=round(build_s, 2), attempts=attempt, config=target.config.model_dump())
        if v.result.passed:
            return record, artifact
        progress.log(f"{spec.name}: gate missed: " + "; ".join(v.result.failures), "yellow")
        new_config = target.retry_config(ctx, artifact, evaluation, attempt)
        history.append({"attempt": attempt, "failures": v.result.failures,
                        **({"diagnosis": artifact.details["diagnosis"]} if "diagnosis" in artifact.details else {})})
        record["history"] = history
        if new_config is None:
            return record, None
        target = cls(new_config)


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
        old = load_model_config(cfg_path)
        fresh.update(dynamic_batching=old.dynamic_batching, instance_group=old.instance_group,
                     max_batch_size=sig.served_max_batch(old.max_batch_size), version_policy=old.version_policy,
                     warmup=old.warmup, parameters=old.parameters)
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
            "reference": {"name": report["reference"]["name"], "metric": report["reference"]["metric"]},
            "recipe": report["recipe"], "samples_file": SAMPLES,
            **sig.describe(),
        }
        version = stage.commit(config, manifest)
    return {"model": model_name, "version": version, "path": str(job.repository / model_name / str(version)),
            "variant": rec["name"]}


def _parameter(value: Any) -> str:
    """config.yaml parameters are strings (Triton's convention); backend_options() reads them back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _write_report(job: OptimizeJob, model_name: str, report: dict[str, Any]) -> None:
    import json

    path = job.report_path or (job.repository / model_name / REPORT_NAME)
    report["report_path"] = str(path)
    atomic_write_text(Path(path), json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)
