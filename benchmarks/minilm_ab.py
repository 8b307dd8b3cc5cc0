"""A/B of the MiniLM recipe's written INT8 model against its FP32 ONNX export, as served.

Issue 12 measured, outside serve-kit, INT8 p50 10.7 / 13.9 / 22.2 ms against FP32 10.4-10.6 ms in
three rounds at sequence 128, while optimize's table claimed 2.0-2.4x. This script repeats that
measurement in a way anyone can rerun and that says where the spread comes from:

- the models are the files `serve-kit optimize --recipe minilm` writes (`-t onnx-int8-dynamic`, and
  `-t onnx` for FP32 under another model name), or the latest ones in --repository;
- each model runs in its OWN process through serve-kit's ONNX Runtime backend
  (`load_backend("onnxruntime", ...)`: serve-kit's session options, its disabled fusions, a thread
  pool per session), as `serve-kit serve` runs one model: no shared pool, no other session's
  spinning threads in the process (--placement same puts both in one process, to show that effect);
- windows alternate between the two processes (order flipped every window), so machine noise
  falls on both; every round starts fresh processes; intra-op threads 1 and 2 are measured
  separately (--threads);
- per round and threads setting: each model's p50 over all its calls, the ratio of the p50s, and
  the spread of the per-window ratios; over rounds, the spread of the round ratios.

    .venv/bin/python benchmarks/minilm_ab.py                      # builds both, 3 rounds, threads 1,2
    .venv/bin/python benchmarks/minilm_ab.py --repository R --rounds 5 --json
    .venv/bin/python benchmarks/minilm_ab.py --windows 2 --runs 3 --rounds 1 --threads 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "minilm"


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def latest_files(repo: Path, models: list[str]) -> dict[str, Path]:
    """{'fp32': file, 'int8': file}: the latest version of each kind among the named models."""
    from minilm_int8 import from_repository  # benchmarks/, on sys.path when run as a script

    found: dict[str, Path] = {}
    for model in models:
        try:
            found.update(from_repository(repo, model, int8_variant="onnx-int8-dynamic"))
        except Exception:  # a model name that is not in the repository
            continue
    return found


def build(repo: Path, log) -> dict[str, Path]:
    """Both files as a user gets them: `serve-kit optimize --recipe minilm`, one target each."""
    for name, target in (("minilm", "onnx-int8-dynamic"), ("minilm-fp32", "onnx")):
        cmd = [sys.executable, "-m", "serve_kit", "optimize", "--recipe", RECIPE, "-r", str(repo),
               "--name", name, "-t", target, "--select", target, "--batch-sizes", "1"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        log(f"serve-kit optimize -t {target}: exit {done.returncode} in {time.perf_counter() - t0:.0f} s")
        if done.returncode != 0:
            log(done.stdout[-2000:] + done.stderr[-2000:])
    return latest_files(repo, ["minilm", "minilm-fp32"])


# ---------------------------------------------------------------------------------------------
# the measuring processes


def child(paths: list[str], threads: int, seq: int, batch: int) -> None:
    """Load the model(s) through serve-kit's backend; answer `RUN i n` lines with n call times."""
    from serve_kit.recipes import minilm
    from serve_kit.runtime.backends import load_backend

    backends = [load_backend("onnxruntime", Path(p), output_names=["embedding"],
                             options={"intra_op_threads": threads}) for p in paths]
    sentences = minilm.load_sentences()[minilm.N_CALIBRATION:minilm.N_CALIBRATION + batch]  # held out
    inputs = minilm.tokenize(sentences, length=seq)
    for b in backends:
        for _ in range(10):
            b.infer(inputs)
    print("READY", flush=True)
    for line in sys.stdin:
        _, i, n = line.split()
        fn = backends[int(i)].infer
        times = []
        for _ in range(int(n)):
            t0 = time.perf_counter()
            fn(inputs)
            times.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps(times), flush=True)


class Proc:
    def __init__(self, paths: list[Path], threads: int, seq: int, batch: int):
        cmd = [sys.executable, __file__, "--child", *map(str, paths), "--threads", str(threads),
               "--seq", str(seq), "--batch", str(batch)]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        line = self.p.stdout.readline()
        if line.strip() != "READY":
            self.p.kill()
            raise RuntimeError(f"measuring process did not start: {line!r}")

    def run(self, index: int, n: int) -> list[float]:
        self.p.stdin.write(f"RUN {index} {n}\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(30)


def one_round(paths: dict[str, Path], threads: int, args) -> dict:
    kinds = ["fp32", "int8"]
    if args.placement == "separate":
        procs = {k: Proc([paths[k]], threads, args.seq, args.batch) for k in kinds}
        call = {k: (lambda k=k: procs[k].run(0, args.runs)) for k in kinds}
    else:
        shared = Proc([paths[k] for k in kinds], threads, args.seq, args.batch)
        procs = {"shared": shared}
        call = {k: (lambda i=i: shared.run(i, args.runs)) for i, k in enumerate(kinds)}
    times = {k: [] for k in kinds}
    window_p50 = {k: [] for k in kinds}
    try:
        for w in range(args.windows):
            for k in (kinds if w % 2 == 0 else kinds[::-1]):
                t = call[k]()
                times[k] += t
                window_p50[k].append(float(np.median(t)))
    finally:
        for p in procs.values():
            p.close()
    wr = np.asarray(window_p50["fp32"]) / np.asarray(window_p50["int8"])
    p50 = {k: float(np.median(v)) for k, v in times.items()}
    return {"threads": threads, "fp32_p50_ms": p50["fp32"], "int8_p50_ms": p50["int8"],
            "ratio": p50["fp32"] / p50["int8"], "window_ratio_range": [float(wr.min()), float(wr.max())],
            "window_p50_ms": window_p50}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, help="take the latest onnx / onnx-int8-dynamic versions from here")
    ap.add_argument("--models", default="minilm,minilm-fp32", help="model names to look in (--repository)")
    ap.add_argument("--threads", default="1,2", help="intra-op threads settings, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per round")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--runs", type=int, default=20, help="calls per window")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--placement", choices=["separate", "same"], default="separate",
                    help="each model in its own process (as served) or both in one")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, int(args.threads), args.seq, args.batch)
        return 0
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    sys.path.insert(0, str(ROOT))
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="minilm-ab-") as tmp:
        if args.repository:
            paths, origin = latest_files(args.repository, args.models.split(",")), str(args.repository)
        else:
            paths, origin = build(Path(tmp) / "repo", log), "built now with serve-kit optimize --recipe minilm"
        missing = [k for k in ("fp32", "int8") if k not in paths]
        if missing:
            log(f"no {', '.join(missing)} model found ({origin})")
            return 1
        rounds = []
        for r in range(args.rounds):
            for t in [int(x) for x in args.threads.split(",")]:
                res = {"round": r + 1, **one_round(paths, t, args)}
                rounds.append(res)
                log(f"round {r + 1} threads {t}: FP32 p50 {res['fp32_p50_ms']:.2f} ms, INT8 p50 "
                    f"{res['int8_p50_ms']:.2f} ms -> {res['ratio']:.2f}x (windows "
                    f"{res['window_ratio_range'][0]:.2f}-{res['window_ratio_range'][1]:.2f}x)")
    summary = {}
    for t in sorted({r["threads"] for r in rounds}):
        ratios = [r["ratio"] for r in rounds if r["threads"] == t]
        summary[str(t)] = {"ratio_median": float(np.median(ratios)), "ratio_range": [min(ratios), max(ratios)]}
        log(f"threads {t}: INT8/FP32 speedup over {len(ratios)} rounds: median {np.median(ratios):.2f}x, "
            f"range {min(ratios):.2f}-{max(ratios):.2f}x")
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpu_count": len(os.sched_getaffinity(0)), "onnxruntime": ort.__version__, "origin": origin,
           "models": {k: str(v) for k, v in paths.items()}, "seq": args.seq, "batch": args.batch,
           "placement": args.placement, "windows": args.windows, "runs_per_window": args.runs,
           "rounds": rounds, "summary": summary}
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
