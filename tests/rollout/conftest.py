import importlib.util
import sys
from pathlib import Path

import pytest

RUNTIME_TESTS = Path(__file__).resolve().parents[1] / "runtime"
if str(RUNTIME_TESTS) not in sys.path:  # the real-server helpers (rt_server, rt_models)
    sys.path.insert(0, str(RUNTIME_TESTS))

# The real digits repository fixture lives in tests/runtime/conftest.py (its build starts at
# collection); reuse it rather than a second copy of the build.
_spec = importlib.util.spec_from_file_location("runtime_conftest", RUNTIME_TESTS / "conftest.py")
_rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rt)
digits_repo = _rt.digits_repo


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if not hasattr(config, "_digits_build"):  # tests/runtime's own hook may have started it already
        _rt.pytest_collection_modifyitems(session, config, items)


def pytest_unconfigure(config):
    _rt.pytest_unconfigure(config)
