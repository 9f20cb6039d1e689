"""`serve --workers N`: the pod's one admin endpoint sees every worker (authz/observe/pooled.py)."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_server import (
    FINANCE_RULE,
    Client,
    check_request,
    free_port,
    policy_yaml,
    start_serve,
    wait_for,
)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "shop.yaml").write_text(policy_yaml(["api.kadath.io"], extra_rule=FINANCE_RULE))
    return d


def admin_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return str(resp.read().decode())


def checks_counted(port: int) -> float:
    """egress_authz_checks_total summed over every series, as Prometheus would read it."""
    total = 0.0
    for family in text_string_to_metric_families(admin_get(port, "/metrics")):
        for s in family.samples:
            if s.name == "egress_authz_checks_total":
                total += s.value
    return total


def decisions(port: int) -> dict[str, Any]:
    return dict(json.loads(admin_get(port, "/v1/decisions?limit=1000")))


def send_checks(grpc_port: int, n: int) -> tuple[list[str], set[str]]:
    """n Checks, each on a new connection (the kernel spreads them over the workers)."""
    ids, workers = [], set()
    for _ in range(n):
        client = Client(grpc_port)
        r = client.check(check_request())
        client.close()
        assert r.status.code == 0
        decision_id = r.dynamic_metadata.fields["decision_id"].string_value
        ids.append(decision_id)
        workers.add(decision_id[:10])  # the id names the process that decided
    return ids, workers


class TestWorkersOneEndpoint:
    def test_metrics_and_decisions_count_every_worker(self, policies: Path) -> None:
        """--workers 2, N Checks answered by both workers: /metrics counts exactly N
        and /v1/decisions lists all N (worker 0's alone, as before, would not)."""
        grpc_port, admin_port = free_port(), free_port()
        proc, _ = start_serve(
            policies, grpc_port, "--workers", "2", "--admin-address", f"127.0.0.1:{admin_port}"
        )
        try:
            n = 40
            ids, workers = send_checks(grpc_port, n)
            assert len(workers) == 2, "the kernel sent every connection to one worker"
            wait_for(lambda: checks_counted(admin_port) >= n, 10)
            assert checks_counted(admin_port) == n
            wait_for(lambda: decisions(admin_port)["count"] >= n, 10)
            listed = decisions(admin_port)
            assert listed["count"] == n
            assert {d["decision_id"] for d in listed["decisions"]} == set(ids)
            one = json.loads(admin_get(admin_port, f"/v1/decisions/{ids[0]}"))
            assert one["decision_id"] == ids[0]
            assert admin_get(admin_port, "/readyz").startswith("ready")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0

    def test_counts_survive_a_replaced_worker(self, policies: Path) -> None:
        """A worker killed and replaced: its Checks stay counted and listed, and the
        new worker's are added (counters never go backwards)."""
        grpc_port, admin_port = free_port(), free_port()
        proc, _ = start_serve(
            policies, grpc_port, "--workers", "2", "--admin-address", f"127.0.0.1:{admin_port}"
        )
        try:
            first, _ = send_checks(grpc_port, 20)
            wait_for(lambda: decisions(admin_port)["count"] >= 20, 10)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            before = set(children.read_text().split())
            os.kill(int(sorted(before)[0]), signal.SIGKILL)
            wait_for(lambda: len(set(children.read_text().split()) - before) == 1, 15)
            wait_for(lambda: admin_get(admin_port, "/readyz").startswith("ready"), 15)
            second, _ = send_checks(grpc_port, 20)
            wait_for(lambda: checks_counted(admin_port) >= 40, 10)
            assert checks_counted(admin_port) == 40
            wait_for(lambda: decisions(admin_port)["count"] >= 40, 10)
            listed = {d["decision_id"] for d in decisions(admin_port)["decisions"]}
            assert listed == set(first) | set(second)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on: /proc/net/tcp{,6} LISTEN rows whose socket inode
    is one of the process's file descriptors."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


class TestSeparateAdmin:
    def test_one_worker_admin_in_another_process(self, policies: Path) -> None:
        """--separate-admin (what the chart runs): the admin port is the supervisor's, the
        Check port only the worker's, and the admin still sees every decision."""
        grpc_port, admin_port = free_port(), free_port()
        proc, _ = start_serve(
            policies, grpc_port, "--separate-admin", "--admin-address", f"127.0.0.1:{admin_port}"
        )
        try:
            ids, workers = send_checks(grpc_port, 10)
            assert len(workers) == 1
            wait_for(lambda: decisions(admin_port)["count"] >= 10, 10)
            assert {d["decision_id"] for d in decisions(admin_port)["decisions"]} == set(ids)
            assert checks_counted(admin_port) == 10
            [worker] = [c for c in _children(proc.pid) if grpc_port in _listening_ports(c)]
            assert admin_port in _listening_ports(proc.pid)
            assert grpc_port not in _listening_ports(proc.pid)
            assert admin_port not in _listening_ports(worker)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
