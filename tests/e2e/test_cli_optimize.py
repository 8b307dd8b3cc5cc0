"""Whole-command runs of `serve-kit optimize` / `inspect` / `recipes`, as a user (or CI) runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sk_models

CLI = [sys.executable, "-c", "from serve_kit.cli import main; main()"]


def sk(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits_repo(tmp_path_factory):
    """`serve-kit optimize --recipe digits-cnn`: the README's first command, run once."""
    env = dict(os.environ, COLUMNS="200")
    repo = tmp_path_factory.mktemp("digits") / "repo"
    r = sk("--json", "optimize", "--recipe", "digits-cnn", "-r", str(repo), env=env)
    return repo, r


def test_digits_recipe_end_to_end(digits_repo):
    repo, r = digits_repo
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    status = {v["name"]: v["status"] for v in report["variants"]}
    expected = {name: "passed" for name in (
        "torchscript", "onnx", "onnx-int8-static", "onnx-int8-dynamic", "onnx-int4",
        "modelopt-int8", "modelopt-fp8", "modelopt-int4", "modelopt-torch-int8")}
    from serve_kit.gpu import cuda_unavailable_reason, tensorrt_unavailable_reason

    for name, reason in (("torchscript-cuda-fp16", cuda_unavailable_reason()),
                         ("trt-fp16", tensorrt_unavailable_reason()), ("trt-int8", tensorrt_unavailable_reason())):
        expected[name] = "unavailable" if reason else "passed"
        if reason:  # never silently skipped: the report and the table say why
            v = next(v for v in report["variants"] if v["name"] == name)
            assert reason in v["reason"], v
    assert status == expected
    int8 = next(v for v in report["variants"] if v["name"] == "onnx-int8-static")
    assert int8["validation"]["metric_delta"] >= -1.0  # the bar: at most 1 point of top-1
    assert report["reference"]["metric"] > 95
    assert report["written"]["version"] == 1
    assert set(report["reference"]["latency"]) == {"1", "32"}


def test_inspect_verifies_the_written_repository(digits_repo, cli_env):
    repo, _ = digits_repo
    r = sk("inspect", str(repo), env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "digits" in r.stdout and "input:FP32:-1x1x8x8" in r.stdout and "ok" in r.stdout
    r = sk("--json", "inspect", str(repo), env=cli_env)
    data = json.loads(r.stdout)
    assert data["verified"] is True and data["models"][0]["versions"][0]["verified"] is True


def test_strict_gate_exits_3_and_leaves_the_repository_untouched(digits_repo, cli_env, tmp_path):
    repo, _ = digits_repo
    # every run logs its report under .runs/ (also one that wrote nothing); nothing else changes
    before = {k: v for k, v in tree(repo).items() if "/.runs/" not in k}
    r = sk("optimize", "--recipe", "digits-cnn", "-r", str(repo), "-t", "onnx-int8-static",
           "--gate", "int8.min_cosine=1.0", "--report", str(tmp_path / "report.json"), env=cli_env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "missed their accuracy gate" in r.stderr and "Traceback" not in r.stderr
    assert "nothing written" in r.stderr
    after = {k: v for k, v in tree(repo).items() if "/.runs/" not in k}
    assert after == before
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["exit_code"] == 3 and rep["report_path"] in {str(p) for p in (repo / "digits" / ".runs").iterdir()}
    assert rep["gate_failed"] == ["onnx-int8-static"] and rep["written"] is None
    assert len(rep["variants"][0]["history"]) >= 2  # the diagnosis tried before giving up


def test_ctrl_c_leaves_no_partial_version(tmp_path, cli_env):
    repo = tmp_path / "repo"
    npz = sk_models.digits_npz(tmp_path / "d.npz")
    interrupted = 0
    for delay in (2.0, 4.0, 6.0):
        proc = subprocess.Popen([*CLI, "optimize", "sk_models:mlp", "--calibration-data", npz, "-r", str(repo),
                                 "--name", "mlp", "--metric", "top1"], env=cli_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # A job started in the background by a non-interactive shell (CI
                                # runners, `cmd &`) ignores SIGINT, and so would the CLI it starts.
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 130:
            interrupted += 1
            assert "interrupted" in err and "Traceback" not in err
            # the interrupted run still left its report
            if (repo / "mlp" / ".runs").is_dir():
                reports = [json.loads(p.read_text()) for p in (repo / "mlp" / ".runs").iterdir()]
                assert any((r.get("aborted") or {}).get("status") == "interrupted" for r in reports)
        else:  # finished before the signal: a complete version, never a partial one
            assert proc.returncode == 0, err
        model_dir = repo / "mlp"
        if model_dir.exists():
            assert not [p for p in model_dir.iterdir() if p.name.startswith(".staging")], "staging left behind"
            for v in model_dir.iterdir():
                if v.is_dir() and not v.name.startswith("."):
                    assert (v / "manifest.json").exists() and (v / "model.onnx").exists()
    assert interrupted >= 1


def _err(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    x, y = sk_models.digits_flat()
    np.savez(d / "good.npz", x=x[1000:1400], labels=y[1000:1400])
    np.savez(d / "f64.npz", x=x[1000:1400].astype(np.float64))
    np.savez(d / "shape.npz", x=x[1000:1400, :32])
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "corrupt.onnx").write_bytes(b"not an onnx model at all")
    torch.save({"w": torch.zeros(2), "p": Path("/")}, str(d / "pickle.pt"))
    torch.onnx.export(sk_models.mlp(), (torch.zeros(2, 64),), str(d / "mlp.onnx"), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    return d


@pytest.mark.parametrize("case,args,code,needle", [
    ("missing model", ["missing.onnx", "--calibration-data", "{d}/good.npz"], 1, "model file not found"),
    ("corrupt onnx", ["{d}/corrupt.onnx", "--calibration-data", "{d}/good.npz"], 1, "not a valid ONNX model"),
    ("pickle weights", ["sk_models:untrained_mlp", "--weights", "{d}/pickle.pt", "--calibration-data",
                        "{d}/good.npz"], 1, "never unpickles"),
    ("spec mismatch", ["{d}/mlp.onnx", "--input", "x:FP32:-1x32", "--calibration-data", "{d}/good.npz"], 1,
     "does not match the ONNX model"),
    ("bad spec syntax", ["{d}/mlp.onnx", "--input", "x-FP32", "--calibration-data", "{d}/good.npz"], 2,
     "NAME:DATATYPE:SHAPE"),
    ("wrong dtype", ["{d}/mlp.onnx", "--calibration-data", "{d}/f64.npz"], 1, "float64"),
    ("wrong shape", ["{d}/mlp.onnx", "--calibration-data", "{d}/shape.npz"], 1, "needs size 64"),
    ("object array", ["{d}/mlp.onnx", "--calibration-data", "{d}/objects.npy"], 1, "unpickling"),
    ("no data", ["{d}/mlp.onnx"], 1, "--allow-synthetic-calibration"),
    ("unknown recipe", ["--recipe", "resnet-9000"], 1, "digits-cnn"),
    ("unknown target", ["{d}/mlp.onnx", "-t", "onnx-int3", "--calibration-data", "{d}/good.npz"], 2,
     "targets: torchscript"),
    ("bad gate", ["{d}/mlp.onnx", "--gate", "int8.cosine=0.9", "--calibration-data", "{d}/good.npz"], 2,
     "PRECISION.FIELD=VALUE"),
    ("no model", [], 2, "--recipe"),
    ("unknown flag", ["--frobnicate"], 2, "No such option"),
])
def test_bad_input_gets_a_clear_error(files, cli_env, tmp_path, case, args, code, needle):
    args = [a.format(d=files) for a in args]
    r = sk("optimize", *args, "-r", str(tmp_path / "repo"), env=cli_env, timeout=120)
    assert r.returncode == code, f"{case}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    assert needle in _err(r), f"{case}: {r.stderr}"
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("manifest.json"))


def test_json_errors_are_machine_readable(cli_env, tmp_path):
    r = sk("--json", "optimize", "missing.onnx", "--allow-synthetic-calibration", env=cli_env)
    assert r.returncode == 1
    err = json.loads(r.stdout)
    assert err["error"] == "ModelLoadError" and err["value"] == "missing.onnx" and err["exit_code"] == 1


def test_onnx_source_with_npz_data_and_keep_going(files, cli_env, tmp_path):
    repo = tmp_path / "repo"
    r = sk("optimize", str(files / "mlp.onnx"), "--calibration-data", str(files / "good.npz"), "-r", str(repo),
           "--name", "mlp", "--metric", "top1", "-t", "onnx", "-t", "onnx-int8-dynamic", "-t", "torchscript",
           "--batch-sizes", "1,8", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "unavailable" in r.stdout  # torchscript from an ONNX source: reported, not silently skipped
    assert (repo / "mlp" / "1" / "model.onnx").exists()
    r = sk("optimize", str(files / "mlp.onnx"), "--calibration-data", str(files / "good.npz"), "-r", str(repo),
           "--name", "mlp", "-t", "onnx", "-t", "onnx-int8-dynamic", "--gate", "int8.min_cosine=1.0",
           "--keep-going", "--select", "fastest", env=cli_env)
    assert r.returncode == 0, r.stderr
    assert (repo / "mlp" / "2").is_dir()
    # the FP32 re-export of an ONNX source is rarely faster than the source itself: then the source
    # is written as is (--when-slower source, the default)
    assert json.loads((repo / "mlp" / "2" / "manifest.json").read_text())["variant"] in ("onnx", "source")


def test_help_and_version_do_not_import_torch(cli_env):
    code = ("import sys\nfrom serve_kit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, 'heavy import'\n"
            "print('light')")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True)
    assert r.returncode == 0 and "light" in r.stdout, r.stderr
    r = sk("--version", env=cli_env)
    assert r.returncode == 0 and r.stdout.startswith("serve-kit ")
    for cmd in ("optimize", "inspect", "recipes"):
        r = sk(cmd, "--help", env=cli_env)
        assert r.returncode == 0 and "Usage" in r.stdout


def test_recipes_list(cli_env):
    r = sk("recipes", "list", env=cli_env)
    assert r.returncode == 0 and "digits-cnn" in r.stdout
    r = sk("--json", "recipes", "show", "digits-cnn", env=cli_env)
    assert json.loads(r.stdout)["name"] == "digits-cnn"


def test_exit_codes_and_flags_of_mixed_outcomes(files, cli_env, tmp_path):
    repo = tmp_path / "repo"
    base = [str(files / "mlp.onnx"), "--calibration-data", str(files / "good.npz"), "-r", str(repo), "--name", "mlp",
            "--batch-sizes", "1"]
    # torchscript cannot be built from an ONNX source: unavailable never blocks, except --strict
    r = sk("--json", "optimize", *base, "-t", "onnx-int8-dynamic", "-t", "torchscript", "--strict", env=cli_env)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["written"] is None and rep["strict_blocking"] == ["torchscript"] and rep["exit_code"] == 1
    assert "Traceback" not in r.stderr and rep["report_path"].startswith(str(repo / "mlp" / ".runs"))
    # a missed gate, nothing written: 3
    r = sk("optimize", *base, "-t", "onnx-int8-dynamic", "--gate", "int8.min_cosine=1.0", env=cli_env)
    assert r.returncode == 3 and "missed their accuracy gate" in _err(r)
    # written (the source itself when nothing beats it): 0, and the table says what it measured
    r = sk("optimize", *base, "-t", "onnx", "-t", "torchscript", "--min-speedup", "1000", "--latency-seconds", "0.2",
           env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "is stably faster than the source" in " ".join(r.stdout.split())
    assert json.loads((repo / "mlp" / "1" / "manifest.json").read_text())["variant"] == "source"
    assert json.loads((repo / "mlp" / "1" / "optimize-report.json").read_text())["latency_settings"]["min_seconds"] == 0.2
    assert len(list((repo / "mlp" / ".runs").iterdir())) == 3
    # another model under the same name: refused before any work, 2
    r = sk("optimize", "sk_models:mlp", "--calibration-data", str(files / "good.npz"), "-r", str(repo),
           "--name", "mlp", "-t", "onnx", env=cli_env)
    assert r.returncode == 2 and "another model" in _err(r) and "--force" in r.stderr
    for bad, needle in ((["--max-memory", "lots"], "not a memory size"), (["--when-slower", "never"], "source"),
                        (["--min-speedup", "0"], "positive"), (["--latency-seconds", "-1"], "positive")):
        r = sk("optimize", *base, "-t", "onnx", *bad, env=cli_env)
        assert r.returncode == 2 and needle in _err(r), (bad, r.stderr)
