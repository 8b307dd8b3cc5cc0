"""serve-kit bench's load generator against `wrk` on a trivial loopback HTTP endpoint.

Question: can the generator (one worker process: asyncio + uvloop, raw keep-alive HTTP/1.1,
httptools) drive at least half the request rate of wrk (C, epoll) with the same connections,
so that it is not what limits a benchmark of a real model server?

Both clients send the same bytes: an Open Inference Protocol binary-tensor inference request
(POST, JSON header + 64 FP32 values) to an endpoint that answers every request with a fixed
small JSON body. Endpoints:
  python  a uvloop + httptools server in its own process (the kind of server bench targets)
  nginx   nginx-light, one worker process, `return 200` (a C server faster than both clients)
Each server is pinned to CPU 0 and both clients to CPU 1 (taskset), so the client under test
has a core to itself. Closed loop: wrk -t1 -cN; the generator: one worker, concurrency N.
Rounds alternate the order (wrk first, then generator first) and the table gives medians.

    apt-get install -y wrk nginx-light
    .venv/bin/python benchmarks/bench_loadgen_vs_wrk.py --connections 1,16,64 --seconds 5 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESPONSE_BODY = b'{"model_name":"m","model_version":"1","outputs":[]}'


def request_bytes(port: int) -> tuple[bytes, dict[str, str], bytes]:
    import numpy as np

    from serve_kit.runtime import protocol

    body, headers = protocol.encode_infer_request({"x": np.arange(64, dtype=np.float32).reshape(1, 64)},
                                                  binary=True, binary_output=True)
    headers = {**headers, "Content-Length": str(len(body))}
    head = f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body, headers, body


def serve_python(port: int) -> None:
    """The trivial endpoint (run in its own process)."""
    import asyncio

    import httptools
    import uvloop

    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(RESPONSE_BODY)).encode() + b"\r\n\r\n" + RESPONSE_BODY)

    class P(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
            self.p = httptools.HttpRequestParser(self)

        def data_received(self, d):
            self.p.feed_data(d)

        def on_message_complete(self):
            self.t.write(reply)

    async def main():
        server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.install()
    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def start_server(kind: str, port: int, workdir: Path) -> subprocess.Popen:
    if kind == "python":
        cmd = ["taskset", "-c", "0", sys.executable, __file__, "--serve", str(port)]
    else:
        conf = workdir / "nginx.conf"
        conf.write_text(f"""
worker_processes 1; daemon off; master_process off; error_log {workdir}/error.log crit; pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
  uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
  server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json;
    return 200 '{RESPONSE_BODY.decode()}'; }} }}
}}""")
        cmd = ["taskset", "-c", "0", shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def run_wrk(port: int, connections: int, seconds: float, headers: dict[str, str], body: bytes, workdir: Path) -> dict:
    script = workdir / "post.lua"
    lua_body = "".join(f"\\{b:03d}" for b in body)
    script.write_text('wrk.method = "POST"\n' + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items()
                                                        if k != "Content-Length")
                      + f'wrk.body = "{lua_body}"\n')
    duration = f"-d{max(1, round(seconds))}s"
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", duration, "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}/v2/models/m/infer"],
                         capture_output=True, text=True, timeout=seconds + 30)
    text = out.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise RuntimeError(f"wrk failed (exit {out.returncode}): {text}{out.stderr}")
    rate = float(m.group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", text)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": rate, "p50_ms": float(p50.group(1)) * scale, "errors": int(errors.group(1)) if errors else 0}


def run_generator(port: int, connections: int, seconds: float, payload: bytes) -> dict:
    from serve_kit.bench import stats
    from serve_kit.bench.loadgen import LoadRun, WorkerSpec

    windows = max(1, round(seconds))
    spec = WorkerSpec(index=0, protocol="http", host="127.0.0.1", port=port, payloads=[payload], mode="closed",
                      concurrency=connections, warmup_s=1.0, window_s=seconds / windows)
    run = LoadRun([spec])
    try:
        run.start()
        got = [run.next(60) for _ in range(windows)]
        run.stop(windows - 1, 30)
    finally:
        run.close()
    hist = stats.new_histogram()
    for w in got:
        hist.add(w.hist)
    ok = sum(w.ok for w in got)
    return {"rps": ok / seconds, "p50_ms": stats.summary(hist)["p50_ms"],
            "errors": sum(sum(w.errors.values()) for w in got),
            "cpu": statistics.mean(w.cpu[0] for w in got)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--servers", default="python,nginx")
    ap.add_argument("--connections", default="1,16,64")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.serve:
        serve_python(args.serve)
        return
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install -y wrk")
    os.sched_setaffinity(0, {1})  # the generator's worker inherits CPU 1; servers run on CPU 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for kind in args.servers.split(","):
            if kind == "nginx" and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
                print("nginx not installed; skipping (apt-get install -y nginx-light)")
                continue
            port = free_port()
            server = start_server(kind, port, workdir)
            payload, headers, body = request_bytes(port)
            try:
                for c in [int(x) for x in args.connections.split(",")]:
                    rows = {"wrk": [], "serve-kit": []}
                    for r in range(args.rounds):
                        order = ["wrk", "serve-kit"] if r % 2 == 0 else ["serve-kit", "wrk"]
                        for tool in order:
                            res = (run_wrk(port, c, args.seconds, headers, body, workdir) if tool == "wrk"
                                   else run_generator(port, c, args.seconds, payload))
                            rows[tool].append(res)
                            print(f"{kind:6} c={c:<3} round {r + 1} {tool:9} {res['rps']:>10,.0f} req/s  "
                                  f"p50 {res['p50_ms']:.3f} ms  errors {res['errors']}"
                                  + (f"  generator CPU {res['cpu']:.0%}" if "cpu" in res else ""), flush=True)
                    med = {t: statistics.median(x["rps"] for x in v) for t, v in rows.items()}
                    results.append({"server": kind, "connections": c, "wrk_rps": med["wrk"],
                                    "serve_kit_rps": med["serve-kit"], "ratio": med["serve-kit"] / med["wrk"],
                                    "wrk_p50_ms": statistics.median(x["p50_ms"] for x in rows["wrk"]),
                                    "serve_kit_p50_ms": statistics.median(x["p50_ms"] for x in rows["serve-kit"]),
                                    "serve_kit_cpu": statistics.median(x["cpu"] for x in rows["serve-kit"]),
                                    "rounds": rows})
            finally:
                server.terminate()
                server.wait(10)
    print("\n| server | connections | wrk req/s | serve-kit req/s | serve-kit / wrk | wrk p50 ms | serve-kit p50 ms "
          "| generator CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['server']} | {r['connections']} | {r['wrk_rps']:,.0f} | {r['serve_kit_rps']:,.0f} | "
              f"{r['ratio']:.2f} | {r['wrk_p50_ms']:.3f} | {r['serve_kit_p50_ms']:.3f} | {r['serve_kit_cpu']:.0%} |")
    print(f"\nload average: {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
