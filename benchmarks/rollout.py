"""Rollout overheads on the real digits CNN: the primary's latency with a 100 % shadow against no
shadow, and the response cache's hits (issue 14).

    .venv/bin/python benchmarks/rollout.py [--rate 1000] [--rounds 3] [--seconds 3] [--json out.json]

Builds a repository with two versions of the digits CNN (`serve-kit optimize --recipe digits-cnn
-t onnx` twice: the same seed trains the same model, so version 2 is an identical candidate),
starts `serve-kit serve` on 127.0.0.1, and runs `serve-kit bench --url` open-loop at --rate against
each setting in turn, interleaved over --rounds so the machine's drift hits every setting alike:

- `none`:   route digits -> digits:1 alone;
- `shadow`: the same, plus a shadow of digits:2 at 100 % (every request also runs on version 2);
- `cache`:  no shadow, version 1 with `response_cache` on (the inputs are the repository's 597
  evaluation samples, replayed: after the first pass every request is a hit);
- `switch`: blue-green switches digits:1 <-> digits:2 every 0.25 s while the load runs (the
  failed-request count is the figure: it must be 0).

It prints each setting's p50 / p99 per round and the median ratio to `none`, with the spread, and
the shadow agreement and cache hit counts read from /metrics. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("serve-kit"))
TOKEN = "bench-token"


def build(repo: Path) -> None:
    for _ in range(2):
        subprocess.run([EXE, "optimize", "--recipe", "digits-cnn", "-r", str(repo), "-t", "onnx"], check=True,
                       stdout=subprocess.DEVNULL)
    cfg_path = repo / "digits" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["version_policy"] = {"all": True}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def http(url: str, method: str = "GET", body: dict | None = None) -> bytes:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def metric(base: str, name: str, **labels) -> float:
    total = 0.0
    for line in http(base + "/metrics").decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def bench(base: str, rate: float, seconds: float, data: Path) -> dict:
    out = subprocess.run([EXE, "--json", "bench", "--url", base, "-m", "digits", "--rate", str(rate), "--data",
                          str(data), "--warmup", "1", "--window", str(seconds / 3)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["results"][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--settings", default="none,shadow,cache,switch", help="which settings to run (none is the baseline)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sk-rollout-bench-") as tmp:
        repo = Path(tmp) / "repo"
        build(repo)
        cache_repo = Path(tmp) / "cache-repo"
        subprocess.run(["cp", "-a", str(repo), str(cache_repo)], check=True)
        cfg_path = cache_repo / "digits" / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["response_cache"] = {"max_bytes": 64 * 1024 * 1024}
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        servers = {}
        try:
            for name, r in (("main", repo), ("cache", cache_repo)):
                proc = subprocess.Popen([EXE, "--json", "serve", str(r), "--http-port", "0", "--no-grpc",
                                         "--enable-management", "--management-token", TOKEN, "--log-level", "warning"],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                info = json.loads(proc.stdout.readline())
                servers[name] = (proc, info["http"])
            base, cache_base = servers["main"][1], servers["cache"][1]
            data = repo / "digits" / "1" / "samples.npz"
            rows: dict[str, list[dict]] = {"none": [], "shadow": [], "cache": [], "switch": []}
            switches = 0
            for rnd in range(args.rounds):
                for setting in ["none", *[x for x in args.settings.split(",") if x != "none"]]:
                    if setting == "none":
                        http(base + "/v2/routes/digits", "PUT", {"targets": [{"model": "digits", "version": 1}]})
                    elif setting == "shadow":
                        http(base + "/v2/routes/digits", "PUT", {"targets": [{"model": "digits", "version": 1}],
                                                                "shadow": {"model": "digits", "version": 2,
                                                                           "percent": 100}})
                    stop = threading.Event()
                    if setting == "switch":
                        def flip() -> None:
                            nonlocal switches
                            v = 1
                            while not stop.wait(0.25):
                                v = 3 - v
                                http(base + "/v2/routes/digits", "PUT", {"targets": [{"model": "digits", "version": v}]})
                                switches += 1
                        flipper = threading.Thread(target=flip, daemon=True)
                        flipper.start()
                    try:
                        r = bench(cache_base if setting == "cache" else base, args.rate, args.seconds, data)
                    finally:
                        stop.set()
                    rows[setting].append(r)
                    print(f"round {rnd + 1} {setting:6s}: {r['throughput']:7.0f}/s p50 {r['p50_ms']:.3f} ms "
                          f"p99 {r['p99_ms']:.3f} ms errors {r['errors_total']}", flush=True)
            time.sleep(1)
            agree_n = metric(base, "serve_kit_shadow_agreement_count", version="2")
            agree = metric(base, "serve_kit_shadow_agreement_sum", version="2") / max(agree_n, 1)
            dropped = metric(base, "serve_kit_shadow_dropped_total")
            shadow_runs = metric(base, "serve_kit_route_requests_total", role="shadow")
            hits = metric(cache_base, "serve_kit_cache_hits_total")
            misses = metric(cache_base, "serve_kit_cache_misses_total")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
    summary = {"rate": args.rate, "rounds": args.rounds, "seconds": args.seconds, "settings": {}}
    for setting, rs in rows.items():
        if not rs:
            continue
        ratios99 = [r["p99_ms"] / b["p99_ms"] for r, b in zip(rs, rows["none"])]
        ratios50 = [r["p50_ms"] / b["p50_ms"] for r, b in zip(rs, rows["none"])]
        summary["settings"][setting] = {
            "p50_ms": [r["p50_ms"] for r in rs], "p99_ms": [r["p99_ms"] for r in rs],
            "throughput": [r["throughput"] for r in rs], "errors": sum(r["errors_total"] for r in rs),
            "p99_ratio_median": statistics.median(ratios99), "p99_ratio_range": [min(ratios99), max(ratios99)],
            "p50_ratio_median": statistics.median(ratios50), "p50_ratio_range": [min(ratios50), max(ratios50)]}
    summary.update(switches=switches, shadow_agreement=agree, shadow_rows_compared=agree_n, shadow_requests=shadow_runs,
                   shadow_dropped=dropped, cache_hits=hits, cache_misses=misses)
    for setting, s in summary["settings"].items():
        print(f"{setting:6s}: p99 x{s['p99_ratio_median']:.3f} of none (range {s['p99_ratio_range'][0]:.3f}-"
              f"{s['p99_ratio_range'][1]:.3f}), p50 x{s['p50_ratio_median']:.3f} "
              f"({s['p50_ratio_range'][0]:.3f}-{s['p50_ratio_range'][1]:.3f}), errors {s['errors']}")
    print(f"shadow: {shadow_runs:.0f} mirrored, {agree_n:.0f} rows compared, agreement {agree:.4f}, "
          f"dropped {dropped:.0f}; cache: {hits:.0f} hits, {misses:.0f} misses; {switches} blue-green switches")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
