"""authz.observe.pooled.RecordForwarder: a worker's batches that cannot reach the
supervisor are dropped, never waited on, and counted on the metrics it was given."""

from __future__ import annotations

import socket
from typing import cast

import pytest

from authz.observe.metrics import Metrics
from authz.observe.pooled import RecordForwarder
from authz.records import DecisionRecord

pytestmark = pytest.mark.timeout(30)

FORWARD = {"sink": "forward"}
DROPPED = "egress_authz_trace_records_dropped_total"


def forwarder(metrics: Metrics) -> tuple[RecordForwarder, socket.socket]:
    """A forwarder on one end of a datagram pair; the other end is the 'supervisor'."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return RecordForwarder(ours.detach(), metrics), theirs


def test_unpicklable_batch_is_dropped_and_counted() -> None:
    """A batch that cannot be pickled is lost whole, counted under sink="forward"."""
    metrics = Metrics()
    fwd, peer = forwarder(metrics)
    try:
        fwd(cast(list[DecisionRecord], [lambda: None, lambda: None]))
        assert metrics.value(DROPPED, FORWARD) == 2
    finally:
        fwd.close()
        peer.close()


def test_gone_supervisor_drops_and_counts() -> None:
    """With the supervisor's end closed, a batch is dropped and counted; a batch that
    arrives is not counted."""
    metrics = Metrics()
    fwd, peer = forwarder(metrics)
    try:
        fwd(cast(list[DecisionRecord], [1, 2, 3]))
        assert peer.recv(65536)  # delivered whole
        assert metrics.value(DROPPED, FORWARD) == 0
        peer.close()
        fwd(cast(list[DecisionRecord], [1, 2, 3]))
        assert metrics.value(DROPPED, FORWARD) == 3
    finally:
        fwd.close()
