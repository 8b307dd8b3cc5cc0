import sys
from pathlib import Path

RUNTIME_TESTS = Path(__file__).resolve().parents[1] / "runtime"
if str(RUNTIME_TESTS) not in sys.path:  # the real-server helpers (rt_server, rt_models)
    sys.path.insert(0, str(RUNTIME_TESTS))
# The rollout on the real digits CNN is tests/runtime/test_rollout_digits.py (it uses the digits
# build that tests/runtime/conftest.py starts at collection).
