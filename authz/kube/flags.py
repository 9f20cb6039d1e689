"""`serve --kube` flags; imports nothing heavy so that `--help` stays fast."""

from __future__ import annotations

import argparse


def _selector(text: str) -> str:
    """Checked here, kept as text (worker processes get the flags back as argv)."""
    from ..render import parse_selector

    try:
        parse_selector(text)
        return text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


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
    g.add_argument("--gateway-selector", metavar="K=V,...", type=_selector,
                   default="istio=egressgateway,egress-authz.io/gateway=egress-authz",
                   help="labels of the egress gateway pods, for the Gateway the service "
                   "writes (default: %(default)s)")
    f = p.add_argument_group("layer 3 (NetworkPolicy fence for namespaces labelled "
                             "egress-authz.io/egress-fence=true)")
    f.add_argument("--no-fence", action="store_true",
                   help="never write the fence NetworkPolicy (still report unfenced wildcards)")
    f.add_argument("--fence-dns-namespace", metavar="NS", default="kube-system",
                   help="namespace of the cluster DNS pods (default: %(default)s)")
    f.add_argument("--fence-dns-labels", metavar="K=V,...", type=_selector,
                   default="k8s-app=kube-dns",
                   help="labels of the cluster DNS pods (default: %(default)s)")
    f.add_argument("--fence-istiod-namespace", metavar="NS", default="istio-system",
                   help="namespace of istiod (default: %(default)s)")
    f.add_argument("--fence-cluster-pods", action=argparse.BooleanOptionalAction, default=True,
                   help="let fenced pods reach every pod of the cluster (default: yes)")
    g.add_argument("--no-write", action="store_true",
                   help="read policies only; never write Istio objects")
