import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from rt_models import ProbeBackend


@pytest.fixture(autouse=True)
def _fresh_probe():
    """Each test starts with an empty call log; a hung probe is always released at the end, so no
    worker thread outlives its test blocked."""
    ProbeBackend.reset()
    yield
    ProbeBackend.release.set()


# The real digits repository (`serve-kit optimize --recipe digits-cnn`) takes tens of seconds to
# build on 2 cores (training, export, validation). When a selected test needs it, the build starts
# as soon as collection is done, so it runs while the tests before it (mostly waiting on sleeping
# test backends) run; `digits_repo` waits for it.

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if not any("digits_repo" in getattr(item, "fixturenames", ()) for item in items):
        return
    from rt_server import cli_env, serve_kit_exe

    root = Path(tempfile.mkdtemp(prefix="sk-digits-"))
    log = open(root / "optimize.log", "w")
    # fp32 ONNX: served outputs must then match the samples' reference outputs to float precision.
    proc = subprocess.Popen([serve_kit_exe(), "--json", "optimize", "--recipe", "digits-cnn", "-r", str(root / "repo"),
                             "-t", "onnx", "--batch-sizes", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env=cli_env())
    config._digits_build = (proc, root, log)


def pytest_unconfigure(config):
    build = getattr(config, "_digits_build", None)
    if build is not None:
        proc, root, log = build
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_repo(request) -> Path:
    """A model repository holding the real `digits` model (version 1, with samples.npz)."""
    build = getattr(request.config, "_digits_build", None)
    assert build is not None, "the digits build starts at collection for tests that use digits_repo"
    proc, root, log = build
    rc = proc.wait(600)
    log.flush()
    assert rc == 0, f"serve-kit optimize --recipe digits-cnn failed (exit {rc}):\n" \
                    + (root / "optimize.log").read_text()[-4000:]
    return root / "repo"
