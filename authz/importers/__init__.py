"""Import FQDN egress policies written for other systems (see docs/migrating.md).

One module per source system turns its objects into drafts (common.py); the
emitter (emit.py) validates them with the policy parser and lays them out as
ConfigMaps plus a report of every source element. Pure: no gRPC, Kubernetes
client or OpenTelemetry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .common import ImportError_, Translation

# --from value -> module; order is the order --help lists them in.
SOURCES = {
    "cilium": "cilium",
    "gke": "gke",
    "k8s-anp": "anp",
    "squid": "squid",
    "aws-nfw": "aws",
    "serviceentry": "serviceentry",
}


@dataclass(frozen=True)
class Options:
    namespace: str | None = None  # where identity-less sources (and missing namespaces) land
    cluster_namespace: str = "egress-authz"


def translate(source: str, paths: list[str], options: Options) -> Translation:
    """Read `paths` as `source` objects; raises ImportError_ for unreadable input."""
    if source not in SOURCES:
        raise ImportError_(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    module = importlib.import_module(f"{__name__}.{SOURCES[source]}")
    result: Translation = module.translate(paths, options)
    return result
