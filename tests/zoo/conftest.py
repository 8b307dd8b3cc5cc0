import pytest


def pytest_collection_modifyitems(items):
    # Everything under tests/zoo is the zoo: `-m zoo` selects it, `-m "not zoo"` leaves it out.
    for item in items:
        if "/zoo/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.zoo)
