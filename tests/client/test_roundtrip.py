"""Arbitrary FP32 batches through the client and a real identity model come back bit for bit,
over HTTP (binary tensors) and gRPC (raw contents), sync and async."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from client_kit import Served, ident_repo
from serve_kit.client import AsyncClient, Client


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Served(ident_repo(tmp_path_factory.mktemp("ident")))
    yield s
    s.kill()


batches = st.integers(1, 8).flatmap(lambda n: arrays(np.float32, (n, 4), elements=st.floats(
    width=32, allow_nan=True, allow_infinity=True)))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sync_roundtrip(server, protocol):
    with Client(server.url(protocol)) as c:
        @settings(max_examples=40, deadline=None)
        @given(x=batches)
        def check(x):
            r = c.infer("ident", {"x": x})
            assert r["y"].dtype == np.float32 and r["y"].shape == x.shape
            np.testing.assert_array_equal(r["y"].view(np.uint32), x.view(np.uint32))

        check()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_concurrent_roundtrip(server, protocol):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 9)), 4)).astype(np.float32) for _ in range(40)]

    async def main():
        async with AsyncClient(server.url(protocol)) as c:
            return await asyncio.gather(*(c.infer("ident", {"x": x}) for x in xs))

    results = asyncio.run(main())
    assert len({r.request_id for r in results}) == len(xs)  # one key per call
    for x, r in zip(xs, results):
        np.testing.assert_array_equal(r["y"], x)
