"""Events on policy ConfigMaps: aggregated like client-go's recorder, posted off the lock.

Against the API emulator: churn on one ConfigMap gives a bounded number of Event
objects whose counts add up to what happened, and a slow Events API does not
hold up policy updates (the source posts from a background queue).
"""

from __future__ import annotations

import threading
import time

import pytest

from authz.kube.client import KubeApi
from authz.kube.events import COMBINED_PREFIX, EventRecorder, EventSettings
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, Replica, emu, policy_cm, replica, rule

__all__ = ["emu", "replica"]  # fixtures
pytestmark = pytest.mark.kube

GOOD = "rules: [{name: kadath, hosts: [api.kadath.io]}]"
BAD = "rules: [{name: kadath, hosts: ['*']}]"


def set_policy(emu: KubeEmulator, name: str, text: str) -> None:
    emu.modify("v1", "ConfigMap", "shop", name, lambda o: o["data"].update({"policy.yaml": text}))


def counts(emu: KubeEmulator, reason: str) -> list[int]:
    return [int(e.get("count") or 1) for e in emu.events("shop", involved="p", reason=reason)]


def event_calls(emu: KubeEmulator) -> list[str]:
    return [r.method for r in list(emu.requests) if r.path.endswith("/events") or "/events/" in r.path]


class TestAggregation:
    def test_churn_gives_few_events_with_counts(self, emu: KubeEmulator, replica: Replica) -> None:
        """60 flips bad/good: one Warning and one Normal Event, counts 30 and 30, and
        API calls bounded by the pacing interval, not by the churn."""
        emu.seed(policy_cm("shop", "p", [rule("kadath", "api.kadath.io")]))
        interval = 0.1
        assert replica.start(events=EventSettings(min_interval=interval)).wait_ready(5)
        started = time.monotonic()
        for i in range(60):
            set_policy(emu, "p", BAD if i % 2 == 0 else GOOD)
        emu.wait_for(lambda: sum(counts(emu, "PolicyInvalid")) == 30
                     and sum(counts(emu, "PolicyAccepted")) == 30, timeout=10)
        elapsed = time.monotonic() - started
        assert counts(emu, "PolicyInvalid") == [30]
        assert counts(emu, "PolicyAccepted") == [30]
        warning = emu.events("shop", involved="p", reason="PolicyInvalid")[0]
        assert warning["firstTimestamp"] <= warning["lastTimestamp"]
        calls = event_calls(emu)
        assert calls.count("POST") == 2
        # Each of the two Events is written at most once per interval.
        assert calls.count("PATCH") <= 2 * (elapsed / interval + 1)

    def test_many_different_messages_are_combined(self, emu: KubeEmulator,
                                                  replica: Replica) -> None:
        """25 different errors on one ConfigMap: at most max_similar + 1 Warning Events,
        the last one combined, and no occurrence lost from the counts."""
        emu.seed(policy_cm("shop", "p", [rule("kadath", "api.kadath.io")]))
        settings = EventSettings(min_interval=0.0, max_similar=5)
        assert replica.start(events=settings).wait_ready(5)
        for i in range(25):
            set_policy(emu, "p", f"rules: [{{name: r{i}, hosts: ['*']}}]")
        emu.wait_for(lambda: sum(counts(emu, "PolicyInvalid")) == 25, timeout=10)
        warnings = emu.events("shop", involved="p", reason="PolicyInvalid")
        assert len(warnings) == 6
        combined = [e for e in warnings if e["message"].startswith(COMBINED_PREFIX)]
        assert len(combined) == 1 and combined[0]["count"] == 20
        assert "r24" in combined[0]["message"]  # it shows the latest error

    def test_window_and_expiry_start_new_events(self, emu: KubeEmulator) -> None:
        """A repeat within the window is a PATCH of the count; after the window, or when the
        Event expired from the API server, a new Event is created."""
        now = [1000.0]
        api = KubeApi(emu.api_client(), service_ns=SVC_NS)
        recorder = EventRecorder(api, component="egress-authz", instance="t",
                                 settings=EventSettings(window=60, min_interval=0),
                                 clock=lambda: now[0]).start()
        cm = emu.seed(policy_cm("shop", "p", []))[0]
        try:
            for _ in range(3):
                recorder.record(cm, "Warning", "PolicyInvalid", "bad")
                assert recorder.flush(5)
            assert counts(emu, "PolicyInvalid") == [3]
            assert (recorder.created, recorder.patched) == (1, 2)
            now[0] += 61
            recorder.record(cm, "Warning", "PolicyInvalid", "bad")
            assert recorder.flush(5)
            assert counts(emu, "PolicyInvalid") == [3, 1]
            newest = emu.events("shop", reason="PolicyInvalid")[-1]["metadata"]["name"]
            emu.remove("v1", "Event", "shop", newest)  # the API server's TTL removed it
            recorder.record(cm, "Warning", "PolicyInvalid", "bad")
            assert recorder.flush(5)
            assert counts(emu, "PolicyInvalid") == [3, 1]
            assert recorder.created == 3 and recorder.failed == 0
        finally:
            recorder.stop()

    def test_queue_is_bounded(self, emu: KubeEmulator) -> None:
        """With the API blocked, distinct Events beyond max_pending are dropped and counted."""
        gate = threading.Event()
        emu.before_request = lambda method, path: gate.wait(10) if "/events" in path else None
        api = KubeApi(emu.api_client(), service_ns=SVC_NS)
        recorder = EventRecorder(api, component="egress-authz", instance="t",
                                 settings=EventSettings(max_pending=10, max_similar=1000)).start()
        cm = emu.seed(policy_cm("shop", "p", []))[0]
        try:
            for i in range(50):
                recorder.record(cm, "Warning", "PolicyInvalid", f"bad {i}")
            # One is in flight (taken off the queue), ten wait, the rest were dropped.
            assert 39 <= recorder.dropped <= 40
        finally:
            gate.set()
            recorder.stop()


class TestPostingOffTheLock:
    def test_slow_events_api_does_not_delay_policy_updates(
            self, emu: KubeEmulator, replica: Replica) -> None:
        """While the Event for a broken ConfigMap hangs in the API (30 s), another
        ConfigMap's change comes into force (about 0.1 s; the bound only has to be
        shorter than the hang)."""
        emu.seed(policy_cm("shop", "p", [rule("kadath", "api.kadath.io")]),
                 policy_cm("shop", "q", [rule("kadath", "api.kadath.io")]))
        gate, entered = threading.Event(), threading.Event()

        def hang_events(method: str, path: str) -> None:
            if "/events" in path:
                entered.set()
                gate.wait(30)

        emu.before_request = hang_events
        try:
            assert replica.start().wait_ready(30)
            set_policy(emu, "p", BAD)
            assert entered.wait(30), "the Warning Event was never posted"
            set_policy(emu, "q", "rules: [{name: leng, hosts: [api.leng.com]}]")
            emu.wait_for(lambda: replica.allows("shop", "api.leng.com"), timeout=20.0)
            assert not emu.events("shop")  # the Event is still hanging
        finally:
            gate.set()
        emu.wait_for(lambda: counts(emu, "PolicyInvalid") == [1], timeout=20)
