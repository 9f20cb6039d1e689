"""`serve --kube` flags; imports nothing heavy so that `--help` stays fast."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kubernetes")
    g.add_argument("--kube", action="store_true",
                   help="policies from ConfigMaps and workloads from Pods of the cluster "
                   "(in-cluster config, or --kubeconfig); writes the Istio registry")
    g.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file (default: in-cluster)")
    g.add_argument("--namespace", metavar="NS", default=None,
                   help="the service's namespace: cluster-tier ConfigMap and Lease "
                   "(default: the service account's namespace, else egress-authz)")
    g.add_argument("--namespace-selector", metavar="SELECTOR", default=None,
                   help="only Namespaces matching this label selector contribute policies")
    g.add_argument("--gateway-namespace", metavar="NS", default="istio-egress",
                   help="namespace of the egress gateway (default: %(default)s)")
    g.add_argument("--gateway-service", metavar="NAME", default="istio-egressgateway",
                   help="the egress gateway's Service in --gateway-namespace; its port -> "
                   "targetPort pairs, watched, are the gateway port map unless "
                   "--gateway-port-map is given (default: %(default)s)")
    g.add_argument("--no-write", action="store_true",
                   help="read policies only; never write Istio objects")
