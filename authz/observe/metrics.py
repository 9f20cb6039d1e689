"""The service's Prometheus metrics, on prometheus-client.

`Metrics` builds every metric on one registry. The process has one default
set (`METRICS`), which `serve` hands to every component that counts (the
sources, the Kubernetes watches/writer/fence, the recorder, the span pipe,
the admin endpoint); tests build their own on a fresh `CollectorRegistry`
and hand it to what they test, so they never read process-global counters.

Under `serve --workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR (a
temporary directory of its own) before any process imports this module:
prometheus-client then keeps every value in a per-process file there, and
`exposition()` in the supervisor adds them all up, so /metrics counts every
worker's Checks, including those of workers that were replaced. Gauges say
how their per-process values combine (`multiprocess_mode`).

Names and labels are a public contract (README, docs/tracing.md, the
chart's dashboard and PrometheusRule).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# One sample per series, as before: no `_created` companions to store and graph.
disable_created_metrics()  # type: ignore[no-untyped-call]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHECK_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    """Every metric the service exports, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.checks = Counter(
            "egress_authz_checks_total",
            "Check requests answered, by verdict, reason and source namespace.",
            ("verdict", "reason", "namespace"),
            registry=r,
        )
        self.check_seconds = Histogram(
            "egress_authz_check_duration_seconds",
            "Time from a Check's arrival to its answer being built.",
            buckets=CHECK_BUCKETS,
            registry=r,
        )
        self.policy_revision = Gauge(
            "egress_authz_policy_revision",
            "Revision of the policy snapshot in force.",
            registry=r,
            multiprocess_mode="livemin",  # the laggard worker's
        )
        self.policy_errors = Counter(
            "egress_authz_policy_errors_total",
            "Policy ConfigMaps or files rejected by validation.",
            ("source",),
            registry=r,
        )
        self.watch_reconnects = Counter(
            "egress_authz_watch_reconnects_total",
            "Kubernetes watch reconnections, by resource.",
            ("resource",),
            registry=r,
        )
        self.api_unreachable = Gauge(
            "egress_authz_kube_api_unreachable",
            "1 while the Kubernetes API server cannot be reached (serving the last snapshot).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.trace_dropped = Counter(
            "egress_authz_trace_records_dropped_total",
            "Decision records dropped because a recording queue was full.",
            ("sink",),
            registry=r,
        )
        self.admin_refused = Counter(
            "egress_authz_admin_refused_total",
            "Admin connections closed or refused by a limit (docs/security.md), by reason.",
            ("reason",),
            registry=r,
        )
        self.admin_cpu = Counter(
            "egress_authz_admin_cpu_seconds_total",
            "Thread CPU time the admin endpoint's handlers used (held to a share of one core).",
            registry=r,
        )
        self.registry_write_errors = Counter(
            "egress_authz_registry_write_errors_total",
            "Writes of the mesh registry (Istio objects, fence NetworkPolicies) that failed "
            "(the leader retries).",
            registry=r,
        )
        self.unfenced_wildcard_namespaces = Gauge(
            "egress_authz_unfenced_wildcard_namespaces",
            "Namespaces whose policy allows a wildcard host while no NetworkPolicy fences "
            "their egress (`serve --kube`; Warning Event WildcardUnfenced on the policy "
            "ConfigMap).",
            registry=r,
            multiprocess_mode="livemax",
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value in this registry (0 when never set): for tests and checks."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found


def exposition(metrics: Metrics | None = None) -> bytes:
    """What /metrics serves: under multiprocess mode every process's values
    added up (read from their files), else `metrics`' registry."""
    directory = os.environ.get(MULTIPROC_ENV)
    if metrics is None and directory:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest((metrics or METRICS).registry)


# The process's own set: what `serve` hands the sources, the recorder, the
# span pipe and the admin endpoint. Deliberately no module-level aliases of
# its metrics: a component updates the `Metrics` it was given, so a test can
# hand it a fresh registry and read only what that component counted.
METRICS = Metrics()
