"""Prometheus metrics in the text exposition format, without a client library.

Counters and histograms are updated from the recording side and by the
sources; `render()` is served on the admin endpoint's /metrics.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from typing import TypeVar


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[label_values] = self._values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        return self._values.get(label_values, 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *label_values: str) -> None:
        with self._lock:
            self._values[label_values] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    def lines(self) -> list[str]:
        with self._lock:
            counts = list(self._counts)
            total, count = self._sum, self._count
        out, running = [], 0
        for bound, n in zip(self.buckets, counts, strict=False):
            running += n
            out.append(f'{self.name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {count}')
        out.append(f"{self.name}_sum {total:g}")
        out.append(f"{self.name}_count {count}")
        return out


M = TypeVar("M", bound=_Metric)


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        out: list[str] = []
        for metric in self._metrics:
            out.extend(metric.header())
            out.extend(metric.lines())
        return "\n".join(out) + "\n"


# One registry per process: a worker process serves its own /metrics.
REGISTRY = Registry()
CHECKS = REGISTRY.add(
    Counter(
        "egress_authz_checks_total",
        "Check requests answered, by verdict, reason and source namespace.",
        ("verdict", "reason", "namespace"),
    )
)
CHECK_SECONDS = REGISTRY.add(
    Histogram(
        "egress_authz_check_duration_seconds",
        "Time from a Check's arrival to its answer being built.",
        (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
    )
)
POLICY_REVISION = REGISTRY.add(
    Gauge("egress_authz_policy_revision", "Revision of the policy snapshot in force.")
)
POLICY_ERRORS = REGISTRY.add(
    Counter(
        "egress_authz_policy_errors_total",
        "Policy ConfigMaps or files rejected by validation.",
        ("source",),
    )
)
WATCH_RECONNECTS = REGISTRY.add(
    Counter(
        "egress_authz_watch_reconnects_total",
        "Kubernetes watch reconnections, by resource.",
        ("resource",),
    )
)
API_UNREACHABLE = REGISTRY.add(
    Gauge(
        "egress_authz_kube_api_unreachable",
        "1 while the Kubernetes API server cannot be reached (serving the last snapshot).",
    )
)
TRACE_DROPPED = REGISTRY.add(
    Counter(
        "egress_authz_trace_records_dropped_total",
        "Decision records dropped because a recording queue was full.",
        ("sink",),
    )
)
ADMIN_REFUSED = REGISTRY.add(
    Counter(
        "egress_authz_admin_refused_total",
        "Admin connections closed or refused by a limit (authz/httpserve.py), by reason.",
        ("reason",),
    )
)
ADMIN_CPU = REGISTRY.add(
    Counter(
        "egress_authz_admin_cpu_seconds_total",
        "Thread CPU time the admin endpoint's handlers used (held to a share of one core).",
    )
)
UNFENCED_WILDCARD_NAMESPACES = REGISTRY.add(
    Gauge(
        "egress_authz_unfenced_wildcard_namespaces",
        "Namespaces whose policy allows a wildcard host while no NetworkPolicy fences their "
        "egress (`serve --kube`; Warning Event WildcardUnfenced on the policy ConfigMap).",
    )
)
