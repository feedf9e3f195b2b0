"""Shared by the tests that compile for accelerators this machine lacks (libtpu, the CUDA plugin)."""

import os

import pytest

from sharding import topology


def require_compiler(spec: str) -> None:
    """Skip when the compile-only compiler of target `spec` is not installed (the `aot` extra), or
    fail instead under LONGCAT_REQUIRE_AOT=1, which .ci/run sets so that CI never skips them."""
    try:
        topology.check_compiler_available(topology.parse_target(spec))
    except topology.TopologyError as error:
        if os.environ.get("LONGCAT_REQUIRE_AOT") == "1":
            pytest.fail(f"LONGCAT_REQUIRE_AOT=1, but {error}")
        pytest.skip(str(error))
