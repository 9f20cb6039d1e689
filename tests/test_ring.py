"""authz.observe.ring: the decision buffer is bounded and shared fairly between sources."""

from __future__ import annotations

import io
import random
from collections import Counter

from authz.model import Identity
from authz.observe.metrics import Metrics
from authz.observe.recorder import DecisionRecorder, TracingSettings
from authz.observe.ring import UNRESOLVED, RingBuffer, source_of
from authz.records import DecisionRecord
from tests.test_tracing import make_record


def from_namespace(ns: str) -> DecisionRecord:
    """A decision for a caller whose address resolved to a Pod in `ns`."""
    return make_record(namespace=ns, account="app", pod=f"{ns}-pod")


def forged(ns: str) -> DecisionRecord:
    """A forged Check: any principal, but no Pod behind the source address."""
    rec = make_record(namespace=ns)
    rec.identity = Identity(principal=f"spiffe://cluster.local/ns/{ns}/sa/x", source_ip="6.6.6.6")
    return rec


def held(ring: RingBuffer) -> Counter[str]:
    return Counter(source_of(r) for r in ring.snapshot())


class TestFairShare:
    def test_single_source_uses_whole_ring(self) -> None:
        """Alone, a source keeps the last `size` records, oldest evicted first."""
        ring = RingBuffer(100)
        recs = [from_namespace("shop") for _ in range(250)]
        for r in recs:
            ring.append(r)
        assert ring.snapshot() == recs[-100:]
        assert len(ring) == 100

    def test_flood_keeps_everyone_elses_decisions(self) -> None:
        """One namespace flooding 20x the ring evicts only its own records: the ten
        quiet namespaces keep every decision they made."""
        metrics = Metrics()
        ring = RingBuffer(1000, metrics=metrics)
        quiet = {f"ns{i}": [from_namespace(f"ns{i}") for _ in range(50)] for i in range(10)}
        for recs in quiet.values():
            for r in recs:
                ring.append(r)
        flood = from_namespace("flood")
        for _ in range(20_000):
            ring.append(flood)
        kept = held(ring)
        assert len(ring) == 1000
        for ns, recs in quiet.items():
            assert kept[ns] == 50
            assert all(ring.find(r.decision.decision_id) is r for r in recs)
        assert kept["flood"] == 500
        # Evictions of the flooder beyond an equal share are counted.
        shares = {"sink": "ring-share"}
        assert metrics.value("egress_authz_trace_records_dropped_total", shares) >= 19_000

    def test_largest_source_trimmed_first(self) -> None:
        """When full, the oldest record of the source holding the most is evicted."""
        ring = RingBuffer(10)
        for _ in range(8):
            ring.append(from_namespace("big"))
        a = [from_namespace("a") for _ in range(2)]
        for r in a:
            ring.append(r)
        ring.append(from_namespace("b"))  # full: "big" (8) loses its oldest
        assert held(ring) == {"big": 7, "a": 2, "b": 1}
        for _ in range(20):
            ring.append(from_namespace("b"))
        assert held(ring) == {"big": 4, "a": 2, "b": 4}  # equal shares, "a" untouched

    def test_forged_namespaces_share_one_bucket(self) -> None:
        """Inventing a namespace per forged request buys nothing: callers without a
        resolved Pod share one bucket, and real namespaces keep their records."""
        ring = RingBuffer(1000)
        real = [from_namespace(f"team{i}") for i in range(4) for _ in range(100)]
        for r in real:
            ring.append(r)
        for i in range(10_000):
            ring.append(forged(f"fake{i}-{random.random()}"))
        kept = held(ring)
        assert kept[UNRESOLVED] == 600
        assert all(kept[f"team{i}"] == 100 for i in range(4))

    def test_snapshot_in_arrival_order(self) -> None:
        """Across sources the snapshot is oldest first, in the order records arrived."""
        ring = RingBuffer(50)
        recs = [from_namespace(random.choice("abc")) for _ in range(40)]
        for r in recs:
            ring.append(r)
        assert ring.snapshot() == recs


class TestRecorderFairness:
    def test_recorder_keys_by_resolved_namespace(self) -> None:
        """Through DecisionRecorder.record(): a flood of forged Checks leaves a real
        namespace's denials in the buffer."""
        recorder = DecisionRecorder(
            TracingSettings(ring_size=200, decision_log=False), log_stream=io.StringIO()
        )
        mine = [from_namespace("payments") for _ in range(20)]
        for r in mine:
            recorder.record(r)
        for i in range(5_000):
            recorder.record(forged(f"ns{i}"))
        recorder.close()
        ids = {r.decision.decision_id for r in recorder.ring.snapshot()}
        assert all(r.decision.decision_id in ids for r in mine)
        assert len(recorder.ring) == 200


class TestLogQueueFairness:
    """The decision log and spans are fed from one bounded queue: a flooding source
    must not crowd everyone else's decisions out of it (issue 12, forged and
    flooding callers) any more than out of the ring."""

    def test_flood_leaves_room_for_other_sources_in_the_log(self) -> None:
        """With the recorder thread behind (not started), one namespace's flood
        fills at most its share of the queue: a quiet namespace's decisions still
        reach the decision log, and the flood's excess is counted as `queue-share`."""
        out = io.StringIO()
        settings = TracingSettings(ring_size=1_000, queue_size=100)
        metrics = Metrics()
        recorder = DecisionRecorder(settings, log_stream=out, metrics=metrics)
        for _ in range(1_000):
            recorder.record(from_namespace("flood"))
        for _ in range(200):  # a forged flood in the shared bucket
            recorder.record(forged("anything"))
        quiet = [from_namespace("payments") for _ in range(10)]
        for r in quiet:
            recorder.record(r)
        assert recorder.pending <= settings.queue_size
        recorder.close()
        logged = out.getvalue()
        assert all(r.decision.decision_id in logged for r in quiet)
        shares = {"sink": "queue-share"}
        assert metrics.value("egress_authz_trace_records_dropped_total", shares) >= (
            1_000 - settings.queue_size
        )

    def test_lone_source_is_not_limited_below_the_queue(self) -> None:
        """Fairness costs a lone source nothing while the queue has room: every
        decision of a burst smaller than half the queue is logged."""
        out = io.StringIO()
        recorder = DecisionRecorder(TracingSettings(queue_size=100), log_stream=out)
        burst = [from_namespace("shop") for _ in range(50)]
        for r in burst:
            recorder.record(r)
        recorder.close()
        assert all(r.decision.decision_id in out.getvalue() for r in burst)

    def test_queue_share_is_a_documented_sink(self) -> None:
        """The drop counter's new `sink` value is documented where the others are."""
        from pathlib import Path

        docs = (Path(__file__).resolve().parents[1] / "docs" / "tracing.md").read_text()
        assert "`queue-share`" in docs
