"""`serve-kit bench` (closed loop) against NVIDIA's perf_analyzer: same server, model, input and load.

Question: do serve-kit bench's throughput and p50 agree with perf_analyzer's (tritonclient
2.51.0's binary) within 10 %, over HTTP (binary tensors) and gRPC, at several concurrencies,
against serve-kit's runtime and against Triton (tritonserver via pytriton, the second Open
Inference Protocol server)?

Setup (reused from serve_vs_triton.py): model `mlp` (y = relu(x W1) W2, 512x512 FP32, input
[-1, 512], dynamic batching with serve-kit's defaults), one real sample as the input of both
tools. perf_analyzer: synchronous closed loop, 3 fixed windows of --window-ms (stability
threshold 1,000,000 %), binary tensors. serve-kit bench: `--concurrency N --warmup 1 --window
W --min-windows 3 --max-windows 3`, binary tensors, the same sample (--data). The two tools
alternate (A B, then B A) per round; the table gives the median over rounds, and the ratio
serve-kit / perf_analyzer. With --pin (default) the server runs on CPU 0 and both clients on
CPU 1: perf_analyzer spends ~3x the CPU per request of serve-kit bench's worker, and on a
2-core machine that CPU would otherwise come out of the server's share and make the two tools
measure different servers.

    .venv/bin/python benchmarks/bench_vs_perf_analyzer.py                      # serve-kit and Triton
    .venv/bin/python benchmarks/bench_vs_perf_analyzer.py --servers serve-kit --rounds 2

perf_analyzer needs libb64 (`apt-get install libb64-0d`); Triton needs the bench venv of
serve_vs_triton.py (`.bench-venv` with nvidia-pytriton==0.7.0 and onnxruntime==1.32.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_vs_triton as svt  # noqa: E402


def run_serve_kit_bench(server, protocol: str, concurrency: int, window_s: float, data: Path) -> dict:
    port = server.http_port if protocol == "http" else server.grpc_port
    cmd = [str(ROOT / ".venv/bin/serve-kit"), "--json", "bench", "--url", f"{protocol}://127.0.0.1:{port}",
           "--model", server.model.name, "--data", str(data), "--concurrency", str(concurrency), "--warmup", "1",
           "--window", str(window_s), "--min-windows", "3", "--max-windows", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"serve-kit bench failed ({p.returncode}): {p.stderr[-2000:]}")
    r = json.loads(p.stdout)["results"][0]
    return {"throughput": r["throughput"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "errors": r["errors_total"], "generator_cpu": max(r["generator"]["cpu_per_worker"]),
            "stable": r["stable"]}


def run_wrk(server, concurrency: int, seconds: float, data: Path, workdir: Path) -> dict:
    """wrk (C, epoll) replaying the same binary-tensor request bytes: a third opinion over HTTP."""
    import re

    from serve_kit.bench import inputs as inp

    target = inp.parse_target(f"http://127.0.0.1:{server.http_port}", server.model.name, None)
    info = inp.fetch_model_info(target)
    arrays = inp.load_data(data, False, info, server.model.name, None)
    raw = inp.http_requests(target, info, inp.request_inputs(arrays, info, 1), binary=True)[0]
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = [line.split(": ", 1) for line in head.decode().split("\r\n")[1:]]
    script = workdir / "wrk-post.lua"
    script.write_text('wrk.method = "POST"\n'
                      + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers if k not in ("Host",
                                                                                           "Content-Length"))
                      + 'wrk.body = "' + "".join(f"\\{b:03d}" for b in body) + '"\n')
    url = f"http://127.0.0.1:{server.http_port}{target.model_path}/infer"
    subprocess.run(["wrk", "-t1", f"-c{concurrency}", "-d1s", "-s", str(script), url], capture_output=True,
                   timeout=60)  # warm-up
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or "Non-2xx" in out:
        raise RuntimeError(f"wrk failed: {out}")
    lat = {p: re.search(rf"{p}%\s+([\d.]+)(us|ms|s)\b", out) for p in ("50", "99")}
    ms = {p: float(v.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[v.group(2)] for p, v in lat.items()}
    return {"throughput": float(m.group(1)), "p50_ms": ms["50"], "p99_ms": ms["99"]}


def pinned(cls):
    class Pinned(cls):
        def command(self):
            cmd, env = super().command()
            return ["taskset", "-c", "0", *cmd], env

    return Pinned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="serve-kit,triton")
    ap.add_argument("--protocols", default="http,grpc")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window-ms", type=int, default=2000)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--bench-python", default=str(ROOT / ".bench-venv/bin/python"))
    ap.add_argument("--perf-analyzer", default=str(ROOT / ".venv/bin/perf_analyzer"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--model", default="mlp", help="mlp (512 wide) or mlpN (N wide)")
    ap.add_argument("--wrk", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure HTTP with wrk (when installed), same request bytes")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="server on CPU 0, clients on CPU 1")
    args = ap.parse_args()
    args.wrk = args.wrk and bool(shutil.which("wrk"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-vs-pa-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = svt.prepare(workdir, [args.model])[args.model]
    data = workdir / "one-sample.npz"
    np.savez(data, x=model.sample["x"])  # the sample perf_analyzer sends (write_input_data)
    load = svt.Load(args.perf_analyzer, args.window_ms, workdir)
    svt.PyTriton.python = args.bench_python
    kinds = {"serve-kit": svt.ServeKit, "triton": svt.PyTriton}
    if args.pin:
        kinds = {k: pinned(v) for k, v in kinds.items()}
        os.sched_setaffinity(0, {1})  # perf_analyzer and serve-kit bench inherit CPU 1
    rows = []
    for kind in args.servers.split(","):
        if kind == "triton" and not Path(args.bench_python).exists():
            print(f"skipping Triton: {args.bench_python} not found (see serve_vs_triton.py)")
            continue
        with kinds[kind](model, workdir) as server:
            load.run(server, "http", 16, window_ms=1000)  # warm-up, thrown away
            for protocol in args.protocols.split(","):
                for c in [int(x) for x in args.concurrency.split(",")]:
                    got = {"perf_analyzer": [], "serve-kit bench": []}
                    use_wrk = args.wrk and protocol == "http"
                    if use_wrk:
                        got["wrk"] = []
                    for r in range(args.rounds):
                        order = ["perf_analyzer", "serve-kit bench"][:: 1 if r % 2 == 0 else -1]
                        order += ["wrk"] if use_wrk else []
                        for tool in order:
                            if tool == "wrk":
                                res = run_wrk(server, c, 3 * args.window_ms / 1000, data, workdir)
                            else:
                                res = (load.run(server, protocol, c) if tool == "perf_analyzer" else
                                       run_serve_kit_bench(server, protocol, c, args.window_ms / 1000, data))
                            got[tool].append(res)
                            print(f"{kind:9} {protocol:4} c={c:<3} round {r + 1} {tool:15} "
                                  f"{res['throughput']:>9,.0f} infer/s  p50 {res['p50_ms']:.3f} ms  "
                                  f"p99 {res['p99_ms']:.3f} ms", flush=True)
                    med = {t: {k: statistics.median(x[k] for x in v) for k in ("throughput", "p50_ms", "p99_ms")}
                           for t, v in got.items()}
                    pa, sk = med["perf_analyzer"], med["serve-kit bench"]
                    rows.append({"server": kind, "protocol": protocol, "concurrency": c, "perf_analyzer": pa,
                                 "serve_kit": sk, "wrk": med.get("wrk"),
                                 "throughput_ratio": sk["throughput"] / pa["throughput"],
                                 "p50_ratio": sk["p50_ms"] / pa["p50_ms"], "runs": got,
                                 "loadavg": os.getloadavg()[0], "pinned": args.pin})
    print("\n| server | protocol | conc | perf_analyzer infer/s | serve-kit infer/s | ratio | perf_analyzer p50 ms "
          "| serve-kit p50 ms | ratio | perf_analyzer p99 ms | serve-kit p99 ms | wrk infer/s | wrk p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pa, sk, wk = r["perf_analyzer"], r["serve_kit"], r.get("wrk")
        print(f"| {r['server']} | {r['protocol']} | {r['concurrency']} | {pa['throughput']:,.0f} | "
              f"{sk['throughput']:,.0f} | {r['throughput_ratio']:.3f} | {pa['p50_ms']:.3f} | {sk['p50_ms']:.3f} | "
              f"{r['p50_ratio']:.3f} | {pa['p99_ms']:.3f} | {sk['p99_ms']:.3f} | "
              + (f"{wk['throughput']:,.0f} | {wk['p50_ms']:.3f} |" if wk else "- | - |"))
    out = args.out or workdir / "bench_vs_perf_analyzer.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nraw results: {out}; load average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
