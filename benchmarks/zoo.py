"""The model zoo at full size: `serve-kit optimize` on real models from PyPI wheels, larger data.

The same cases as tests/zoo (silero-vad ONNX/op15/TorchScript, PaddleOCR tiny detector and
recognizer, MTCNN ONet/RNet/PNet), with the "bench" data sizes (e.g. 100 calibration pages of
3x320x320 for the OCR detector, the issue's out-of-memory case). Per case and run it records the
exit code, wall time, peak RSS of the optimize process, the reference metric, and per target its
status, metric, p50 and speedup with optimize's stability flag.

--repeat 2 runs every case twice in a row with identical inputs and compares the speedups the two
runs report: the issue's bar is that they agree within the noise optimize itself states. --bench
also runs `serve-kit bench` offline on each written repository, for the figures optimize's table
must agree with.

    .venv/bin/python benchmarks/zoo.py                           # every case once, text
    .venv/bin/python benchmarks/zoo.py --cases ocr-det,vad-onnx --repeat 2 --json > zoo.json
    .venv/bin/python benchmarks/zoo.py --size ci --cases mtcnn-pnet   # a quick smoke run

Data and wheels are cached under ${SERVE_KIT_ZOO_CACHE:-~/.cache/serve-kit/zoo}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from zoo import harness  # noqa: E402
from zoo.cases import BY_NAME, CASES  # noqa: E402


def _speedups(run: harness.Run) -> dict[str, dict]:
    out = {}
    for v in (run.report or {}).get("variants", []):
        if v.get("status") != "passed":
            continue
        lat = v.get("latency") or {}
        out[v["name"]] = {
            "speedup": v.get("speedup"),
            "p50_ms": {b: x.get("p50_ms") for b, x in lat.items() if isinstance(x, dict)},
            # contract 8: a stability flag per figure, and the speedup's range across windows
            "stable": {b: x.get("stable") for b, x in lat.items() if isinstance(x, dict)},
            "speedup_range": v.get("speedup_range"),
            "speedup_median": v.get("speedup_median"),
        }
    return out


def _bench(run: harness.Run, workdir: Path) -> dict | None:
    w = (run.report or {}).get("written")
    if not w:
        return None
    cmd = [*harness.CLI, "--json", "bench", str(run.repo), "-m", run.case.name, "--batch-sizes", "1", "--no-flops",
           "--report", str(workdir / "bench.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=harness.env(), timeout=900)
    if done.returncode != 0:
        return {"exit": done.returncode, "stderr": done.stderr[-2000:]}
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        return {"exit": done.returncode, "stdout": done.stdout[-2000:]}
    return {"exit": 0, "agreement": agreement(run, doc), "results": [
        {k: r.get(k) for k in ("key", "p50_ms", "p99_ms", "stable", "throughput")} for r in doc.get("results", [])]}


def agreement(run: harness.Run, bench: dict) -> dict:
    """The written variant's p50 at batch 1 in optimize's table against `serve-kit bench` on the
    written version; for a PyTorch source also the speedup over eager each reports."""
    w = run.report["written"]
    row = run.row(w["variant"]) or {}
    opt_p50 = ((row.get("latency") or {}).get("1") or {}).get("p50_ms")
    ref_p50 = (((run.report.get("reference") or {}).get("latency") or {}).get("1") or {}).get("p50_ms")
    mine = [r for r in bench.get("results", []) if r.get("version") == w["version"] and r.get("batch_size") == 1]
    version = next((r for r in mine if not r["key"].endswith("/eager/b1")), None)
    eager = next((r for r in mine if r["key"].endswith("/eager/b1")), None)
    out = {"variant": w["variant"], "optimize_p50_ms": opt_p50,
           "bench_p50_ms": version and version.get("p50_ms"), "bench_stable": version and version.get("stable")}
    if opt_p50 and out["bench_p50_ms"]:
        out["p50_ratio_bench_over_optimize"] = out["bench_p50_ms"] / opt_p50
    if eager and version and eager.get("p50_ms") and version.get("p50_ms"):
        out["bench_speedup_over_eager"] = eager["p50_ms"] / version["p50_ms"]
        out["optimize_speedup"] = (row.get("speedup") or {}).get("1")
        out["optimize_reference_p50_ms"] = ref_p50
        out["bench_eager_p50_ms"] = eager["p50_ms"]
    return out


def compare_repeats(a: dict, b: dict) -> dict[str, dict]:
    """Per variant and batch size: the two runs' speedups (the claimed one where stable, else the
    median round-by-round ratio, flagged unstable), their ratio, and whether each run's figure
    lies within the other's stated range (its ratios over the rounds)."""
    out = {}
    for name in sorted(set(a) & set(b)):
        ma, mb = a[name].get("speedup_median") or {}, b[name].get("speedup_median") or {}
        for bs in sorted(set(ma) & set(mb)):
            x, y = ma[bs], mb[bs]
            ra = (a[name].get("speedup_range") or {}).get(bs)
            rb = (b[name].get("speedup_range") or {}).get(bs)
            stable = [((r.get("speedup") or {}).get(bs) is not None) for r in (a[name], b[name])]
            within = None
            if ra and rb:
                within = ra[0] <= y <= ra[1] or rb[0] <= x <= rb[1]
            out[f"{name}@{bs}"] = {"first": x, "second": y, "ratio": y / x if x else None, "stable": stable,
                                   "ranges": [ra, rb], "within_stated_noise": within}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    ap.add_argument("--size", default="bench", choices=["ci", "bench"], help="data sizes (tests/zoo/cases.py)")
    ap.add_argument("--repeat", type=int, default=1, help="consecutive identical runs per case (2: compare speedups)")
    ap.add_argument("--bench", action="store_true", help="also `serve-kit bench` each written repository")
    ap.add_argument("--extra", default="", help="extra optimize flags, e.g. '--max-memory 4G --keep-going'")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; cases: {', '.join(BY_NAME)}")
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    results = []
    with tempfile.TemporaryDirectory(prefix="serve-kit-zoo-") as tmp:
        for name in names:
            case = BY_NAME[name]
            runs = []
            for i in range(args.repeat):
                work = Path(tmp) / f"{name}-{i}"
                work.mkdir()
                run = harness.optimize(case, work, size=args.size, extra=tuple(args.extra.split()))
                entry = {**run.summary(), "speedups": _speedups(run),
                         "contract_problems": harness.contract_problems(run)}
                if args.bench:
                    entry["bench"] = _bench(run, work)
                runs.append(entry)
                log(f"{name} run {i + 1}: exit {run.returncode}, {run.seconds:.0f} s, peak RSS "
                    f"{run.peak_rss_mb:.0f} MB, reference metric {entry['reference_metric']}")
                for t, row in entry["rows"].items():
                    log(f"  {t}: {row.get('status')} metric={row.get('metric')} speedup={row.get('speedup')}"
                        + (f" ({row.get('reason') or row.get('error')})" if row.get("status") != "passed" else ""))
                if entry.get("bench"):
                    b = entry["bench"]
                    log("  bench on the written version: " + ", ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in b.items()))
                for p in entry["contract_problems"]:
                    log(f"  CONTRACT: {p.splitlines()[0]}")
            res = {"case": name, "runs": runs}
            if len(runs) >= 2:
                res["repeat"] = compare_repeats(runs[0]["speedups"], runs[1]["speedups"])
                for k, v in res["repeat"].items():
                    rng = " vs ".join("{:.2f}-{:.2f}".format(*r) if r else "-" for r in v["ranges"])
                    log(f"  repeat {k}: {v['first']:.2f}x vs {v['second']:.2f}x (ranges {rng}; stable "
                        f"{v['stable']}; within stated noise: {v['within_stated_noise']})")
            results.append(res)
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "python": platform.python_version(), "size": args.size, "repeat": args.repeat, "cases": results}
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    return 0 if all(not r["contract_problems"] for c in results for r in c["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
