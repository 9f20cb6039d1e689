"""`serve --kube`: the Kubernetes source, leader election and registry writer as one
PolicySource, plus the flags that configure them (serve.py only calls into here)."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable

from ..fence import FenceOptions
from ..gateway_ports import GatewayPorts
from ..observe.metrics import Metrics
from ..render import RenderOptions, parse_selector
from ..store import PolicyStore
from ..workloads import WorkloadIndex
from .client import KubeApi, configuration, service_namespace
from .fence import FenceMonitor
from .gateway_service import GatewayServiceWatch
from .leader import LeaderElector
from .source import KubePolicySource, KubeSettings
from .writer import RegistryWriter

GATEWAY_SYNC_WAIT = 5.0  # seconds; the API server is down if listing one Service takes longer


class KubeController:
    """A PolicySource: watches feed the store and index; the Lease holder writes."""

    name = "kubernetes"

    def __init__(self, api: KubeApi, index: WorkloadIndex, *, settings: KubeSettings,
                 options: RenderOptions, write: bool = True,
                 ports: GatewayPorts | None = None, gateway_service: str | None = None,
                 fence: FenceOptions | None = None, metrics: Metrics | None = None) -> None:
        # One set of metrics for every part (serve hands the process's own; tests a fresh one).
        self.source = KubePolicySource(api, index, settings, metrics=metrics)
        self.metrics = metrics = self.source.metrics
        # The gateway port map from the gateway's Service, unless a fixed map was given.
        self.gateway_ports: GatewayServiceWatch | None = None
        if ports is not None and gateway_service:
            self.gateway_ports = GatewayServiceWatch(
                api, ports, namespace=options.gateway_namespace, name=gateway_service,
                health=self.source.health)
        identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}-{os.getpid()}"
        self.writer: RegistryWriter | None = None
        self.elector: LeaderElector | None = None
        if write:
            self.elector = LeaderElector(api, identity)

        def is_leader() -> bool:
            return bool(self.elector and self.elector.is_leader)
        # Layer 3 (always watched, for the report; fences written only with `fence`).
        self.fence_monitor = FenceMonitor(api, index_store_placeholder(), is_leader=is_leader,
                                          health=self.source.health, instance=identity,
                                          metrics=metrics)
        if self.elector is not None:
            writer = RegistryWriter(api, index_store_placeholder(), options=options,
                                    is_leader=is_leader, health=self.source.health,
                                    fences=self.fence_monitor.opted_in if fence else None,
                                    fence_options=fence, metrics=metrics)
            self.writer = writer
            self.fence_monitor.on_opt_in = writer.poke
            self.elector.on_change = lambda leader: writer.poke() if leader else None

    @classmethod
    def from_args(cls, args: argparse.Namespace, index: WorkloadIndex,
                  ports: GatewayPorts | None = None,
                  metrics: Metrics | None = None) -> KubeController:
        ns = args.namespace or service_namespace()
        api = KubeApi(k8s_client(args.kubeconfig), service_ns=ns)
        domain = getattr(args, "cluster_domain", None) or RenderOptions.cluster_domain
        return cls(api, index,
                   settings=KubeSettings(service_namespace=ns,
                                         namespace_selector=args.namespace_selector,
                                         cluster_domain=domain),
                   options=RenderOptions(
                       gateway_namespace=args.gateway_namespace,
                       gateway_service=getattr(args, "gateway_service", None)
                       or RenderOptions.gateway_service,
                       gateway_selector=parse_selector(args.gateway_selector),
                       cluster_domain=domain),
                   write=not args.no_write, ports=ports,
                   gateway_service=None if getattr(args, "gateway_port_map", None)
                   else getattr(args, "gateway_service", None),
                   fence=None if args.no_fence else FenceOptions(
                       gateway_namespace=args.gateway_namespace,
                       gateway_selector=parse_selector(args.gateway_selector),
                       dns_namespace=args.fence_dns_namespace,
                       dns_labels=parse_selector(args.fence_dns_labels),
                       istiod_namespace=args.fence_istiod_namespace,
                       allow_cluster_pods=args.fence_cluster_pods),
                   metrics=metrics)

    def start(self, store: PolicyStore, on_error: Callable[[str], None]) -> None:
        if self.gateway_ports is not None:
            self.gateway_ports.start()
            # The map first, so that readiness (a policy loaded) does not come before it.
            self.gateway_ports.wait_synced(GATEWAY_SYNC_WAIT)
        self.source.start(store, on_error)
        self.fence_monitor.store = store
        self.fence_monitor.start()
        if self.writer is not None and self.elector is not None:
            self.writer.store = store
            self.writer.start()
            self.elector.start()

    def stop(self) -> None:
        if self.elector is not None:
            self.elector.stop(release=True)  # hand over at once on a clean shutdown
        if self.writer is not None:
            self.writer.stop()
        self.fence_monitor.stop()
        self.source.stop()
        if self.gateway_ports is not None:
            self.gateway_ports.stop()

    def ready(self) -> bool:
        return self.source.ready()


def index_store_placeholder() -> PolicyStore:
    """The writer is built before serve() hands us the real store (set in start())."""
    return PolicyStore()


def k8s_client(kubeconfig: str | None):  # type: ignore[no-untyped-def]
    from kubernetes import client as k8s

    return k8s.ApiClient(configuration(kubeconfig=kubeconfig))
