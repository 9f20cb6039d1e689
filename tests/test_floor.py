"""authz.testing.floor: both benchmark floors answer the constant OK and stop cleanly."""

from __future__ import annotations

import grpc
import pytest

from authz.testing.envoy import free_port
from authz.testing.floor import CHECK_METHOD, OK_RESPONSE, FloorProcess

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("aio", [False, True], ids=["threads", "aio"])
def test_floor_answers_ok_and_exits_on_sigterm(aio: bool) -> None:
    """Each flavour answers any body (even garbage) with the pre-encoded OK, as
    raw bytes over gRPC, and exits 0 on SIGTERM (the benchmarks stop it so)."""
    floor = FloorProcess(free_port(), workers=2, aio=aio).start()
    process = floor.process
    assert process is not None
    assert floor.ready_line.endswith("(aio)") is aio  # the flavour asked for runs
    try:
        with grpc.insecure_channel(f"127.0.0.1:{floor.port}") as channel:
            check = channel.unary_unary(CHECK_METHOD)
            assert check(b"\xff\x00garbage", timeout=5) == OK_RESPONSE
            assert check(b"", timeout=5) == OK_RESPONSE
    finally:
        floor.stop()
    assert process.returncode == 0
