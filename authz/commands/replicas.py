"""`--kube` for `traces`, `explain` and `suggest`: every replica, through the API.

The service's pods are listed (`pods` list in --kube-namespace, by label),
and each ready replica's admin port is reached through the Kubernetes API's
pods/portforward subresource, as `egress-authz ui --kube` and `kubectl
port-forward` do: a local forwarder on 127.0.0.1 per replica, and the
ordinary admin client against it. `ReplicaClient` has the admin client's
methods and answers for all of them: lists are merged newest first by the
decisions' time, a decision id is looked up on each replica, live streams
are merged as they come, and every decision says which replica answered
(`replica`: the pod's name). A replica that cannot be reached is reported
on stderr and the others still answer.

RBAC this needs (the chart's `cliRole`, docs/kubernetes.md): `get`/`list`
on pods and `create` on pods/portforward in the service's namespace.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .admin_client import AdminClient, AdminError, AdminNotFound

DEFAULT_NAMESPACE = "egress-authz"
DEFAULT_SELECTOR = "app.kubernetes.io/name=egress-authz"
ADMIN_PORT = 9090  # the chart's ports.admin


def add_kube_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("in a cluster (--kube)")
    g.add_argument(
        "--kube", action="store_true",
        help="ask every ready replica of the service, through the Kubernetes API "
        "(pods/portforward), and merge their answers",
    )  # fmt: skip
    g.add_argument(
        "--kube-namespace", default=DEFAULT_NAMESPACE, metavar="NS",
        help=f"with --kube: the service's namespace (default {DEFAULT_NAMESPACE})",
    )  # fmt: skip
    g.add_argument(
        "--selector", "-l", default=DEFAULT_SELECTOR, metavar="LABELS",
        help=f"with --kube: the replicas' labels (default {DEFAULT_SELECTOR})",
    )  # fmt: skip
    g.add_argument(
        "--admin-port", type=int, default=ADMIN_PORT, metavar="N",
        help=f"with --kube: the pods' admin port (default {ADMIN_PORT})",
    )  # fmt: skip
    g.add_argument("--kubeconfig", metavar="PATH", help="with --kube: a kubeconfig file")


def client_for(args: argparse.Namespace, command: str) -> Any:
    """An AdminClient for --server, or a ReplicaClient over the cluster with --kube."""
    if getattr(args, "kube", False):
        return ReplicaClient.connect(
            args.kube_namespace, args.selector, args.admin_port, args.kubeconfig, command
        )
    return AdminClient(args.server)


def ready_pods(pods: list[Any]) -> list[Any]:
    """The Running pods whose Ready condition is True and that are not terminating,
    by name (what the Service sends traffic to, so what holds decisions)."""

    def ready(pod: Any) -> bool:
        status = pod.status
        conditions = (status.conditions or []) if status else []
        return bool(status and status.phase == "Running") and any(
            c.type == "Ready" and c.status == "True" for c in conditions
        )

    found = [p for p in pods if ready(p) and not p.metadata.deletion_timestamp]
    return sorted(found, key=lambda p: str(p.metadata.name))


@dataclass
class Replica:
    name: str
    client: AdminClient
    forwarder: Any


class ReplicaClient:
    """The admin client's methods, answered by every replica and merged."""

    def __init__(self, replicas: list[Replica], command: str = "egress-authz") -> None:
        self.replicas = replicas
        self.command = command
        self.server = ", ".join(r.name for r in replicas)

    @classmethod
    def connect(
        cls, namespace: str, selector: str, port: int, kubeconfig: str | None, command: str
    ) -> ReplicaClient:
        from kubernetes import client as k8s
        from kubernetes.stream import portforward

        from ..kube.client import configuration
        from .ui import Forwarder

        try:
            api = k8s.CoreV1Api(k8s.ApiClient(configuration(kubeconfig=kubeconfig)))
            pods = api.list_namespaced_pod(namespace, label_selector=selector).items
        except Exception as e:  # no kubeconfig, API unreachable, RBAC: say which
            raise AdminError(f"cannot list the service's pods in {namespace}: {e}") from e
        ready = ready_pods(pods)
        if not ready:
            raise AdminError(
                f"no ready pod in namespace {namespace} matches {selector} "
                f"(of {len(pods)} found)"
            )
        replicas = []
        for pod in ready:
            name = pod.metadata.name

            def connect(name: str = name) -> Any:
                pf = portforward(
                    api.connect_get_namespaced_pod_portforward, name, namespace, ports=str(port)
                )
                sock = pf.socket(port)
                sock.setblocking(True)
                return sock

            forwarder = Forwarder(connect)
            threading.Thread(target=forwarder.serve_forever, daemon=True).start()
            client = AdminClient(f"http://127.0.0.1:{forwarder.port}")
            replicas.append(Replica(name, client, forwarder))
        return cls(replicas, command)

    def close(self) -> None:
        for r in self.replicas:
            r.forwarder.stop()

    # -- the admin client's methods -------------------------------------------

    def decisions(self, **filters: Any) -> list[dict[str, Any]]:
        """Every replica's matching decisions, newest first by time, `limit` in all."""
        answers: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, AdminError] = {}

        def ask(r: Replica) -> None:
            try:
                answers[r.name] = r.client.decisions(**filters)
            except AdminError as e:
                errors[r.name] = e

        self._each(ask)
        if errors and not answers:
            raise AdminError(self._failures(errors))
        self._warn(errors)
        merged = [
            {**d, "replica": name} for name, found in answers.items() for d in found
        ]
        merged.sort(key=lambda d: (str(d.get("time") or ""), str(d.get("decision_id"))),
                    reverse=True)  # fmt: skip
        limit = filters.get("limit")
        return merged[: int(limit)] if limit else merged

    def decision(self, decision_id: str) -> dict[str, Any]:
        """The decision from whichever replica recorded it (decision ids are unique)."""
        found: list[dict[str, Any]] = []
        errors: dict[str, AdminError] = {}

        def ask(r: Replica) -> None:
            try:
                found.append({**r.client.decision(decision_id), "replica": r.name})
            except AdminNotFound:
                pass
            except AdminError as e:
                errors[r.name] = e

        self._each(ask)
        self._warn(errors)
        if found:
            return found[0]
        raise AdminNotFound(
            f"decision {decision_id[:64]} is in no replica's buffer "
            f"({len(self.replicas) - len(errors)} of {len(self.replicas)} asked: too old, "
            "or never recorded)"
        )

    def stream(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every replica's live decisions, as they come, each saying its replica."""
        out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=10_000)
        left = len(self.replicas)

        def follow(r: Replica) -> None:
            try:
                for d in r.client.stream(**filters):
                    out.put(("decision", {**d, "replica": r.name}))
            except AdminError as e:
                out.put(("error", f"{r.name}: {e}"))
            finally:
                out.put(("end", r.name))

        for r in self.replicas:
            threading.Thread(target=follow, args=(r,), daemon=True).start()
        while left:
            kind, item = out.get()
            if kind == "decision":
                yield item
            elif kind == "error":
                print(f"{self.command}: replica {item}", file=sys.stderr)
            else:
                left -= 1

    # -- plumbing ------------------------------------------------------------

    def _each(self, ask: Any) -> None:
        threads = [threading.Thread(target=ask, args=(r,)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _failures(self, errors: dict[str, AdminError]) -> str:
        return "; ".join(f"replica {name}: {e}" for name, e in sorted(errors.items()))

    def _warn(self, errors: dict[str, AdminError]) -> None:
        if errors:
            print(
                f"{self.command}: some replicas did not answer (the others' decisions follow): "
                + self._failures(errors),
                file=sys.stderr,
            )
