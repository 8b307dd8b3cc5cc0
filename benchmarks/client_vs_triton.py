"""serve_kit.client against another Open Inference Protocol server: Triton (nvidia-pytriton's
bundled tritonserver), serving the digits CNN through ONNX Runtime, over HTTP and gRPC.

    python3 -m venv .bench-venv && .bench-venv/bin/pip install nvidia-pytriton==0.7.0 onnxruntime==1.32.0
    .venv/bin/python benchmarks/client_vs_triton.py [--calls 300] [--workdir /tmp/cvt]

For each protocol: the client's answers against ONNX Runtime run here on the same inputs, then a
loop of --calls sequential calls (deadline 60 s each) during which Triton is stopped and started
again on the same ports; it prints the failed calls (the figure: 0), the calls that needed a
retry, and the most tries one call took. Triton knows nothing of serve-kit's Idempotency-Key or
answer headers: this is the client on the plain protocol.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_vs_triton as svt  # noqa: E402 - the Triton worker and model preparation live there

from serve_kit.client import Client  # noqa: E402


class SamePorts(svt.PyTriton):
    """A PyTriton server that keeps its ports across a restart (the client's URL stays valid)."""

    def start(self, timeout: float = 180.0):
        if not self.http_port:
            return super().start(timeout)
        ports = (self.http_port, self.grpc_port)
        real = svt.free_port
        it = iter(ports)
        svt.free_port = lambda: next(it, None) or real()  # start() asks for both ports again
        try:
            return super().start(timeout)
        finally:
            svt.free_port = real


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/client-vs-triton"))
    ap.add_argument("--bench-python", default=str(svt.ROOT / ".bench-venv/bin/python"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = svt.prepare(args.workdir, ["digits"])["digits"]
    svt.PyTriton.python = args.bench_python
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.model_path), providers=["CPUExecutionProvider"])
    with np.load(model.version_dir / "samples.npz") as z:
        images = z["input.input"]
    expected = session.run(None, {"input": images})[0]
    server = SamePorts(model, args.workdir).start()
    failures = 0
    try:
        for protocol in ("http", "grpc"):
            port = server.http_port if protocol == "http" else server.grpc_port
            with Client(f"{protocol}://127.0.0.1:{port}", deadline=60) as client:
                got = np.concatenate([client.infer("digits", {"input": images[i:i + 1]}).outputs["logits"]
                                      for i in range(len(images))])
                ok = np.allclose(got, expected, atol=1e-5)
                print(f"{protocol}: {len(images)} answers match ONNX Runtime here: {ok}", flush=True)
                failures += not ok
                results: list = []
                down: list[float] = []

                def restart() -> None:
                    time.sleep(1.0)
                    t = time.monotonic()
                    server.stop()
                    time.sleep(1.0)
                    server.start()
                    down.append(time.monotonic() - t)

                restarter = threading.Thread(target=restart)
                restarter.start()
                t0 = time.monotonic()
                i = 0
                while i < args.calls or restarter.is_alive():  # calls before, during and after the restart
                    i += 1
                    try:
                        r = client.infer("digits", {"input": images[i % len(images)][None]})
                        results.append(r.attempts)
                    except Exception as e:  # noqa: BLE001 - the figure is how many calls fail
                        results.append(e)
                    time.sleep(0.005)
                restarter.join()
                failed = [r for r in results if not isinstance(r, int)]
                retried = [r for r in results if isinstance(r, int) and r > 1]
                print(f"{protocol}: {len(results)} calls in {time.monotonic() - t0:.1f} s across a Triton restart "
                      f"({down[0]:.1f} s from stop to ready again): "
                      f"{len(failed)} failed, {len(retried)} retried, at most {max(results, key=lambda r: r if isinstance(r, int) else 0)} "
                      f"tries" + (f"; first failure: {failed[0]}" if failed else ""), flush=True)
                failures += len(failed)
    finally:
        server.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
