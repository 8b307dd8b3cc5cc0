import pytest

from rt_models import ProbeBackend


@pytest.fixture(autouse=True)
def _fresh_probe():
    """Each test starts with an empty call log; a hung probe is always released at the end, so no
    worker thread outlives its test blocked."""
    ProbeBackend.reset()
    yield
    ProbeBackend.release.set()
