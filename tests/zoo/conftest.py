from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    # Everything under tests/zoo is the zoo: `-m zoo` selects it, `-m "not zoo"` leaves it out.
    # (A hook of this conftest sees every collected item, not only this folder's.)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.zoo)
