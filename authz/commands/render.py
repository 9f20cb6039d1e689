"""`egress-authz render`: the Istio objects the controller would write, as YAML, offline.

For GitOps users and for review: the same renderer the in-cluster writer uses
(authz.render), fed from policy files instead of a ConfigMap watch. Objects read from
files carry no ownerReferences (those need the ConfigMaps' uids).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import exits
from ._common import add_cluster_domain, add_cluster_namespace, add_output, load_or_report


def _selector(text: str) -> dict[str, str]:
    from ..render import parse_selector

    try:
        return parse_selector(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "render",
        help="print the ServiceEntries, VirtualServices, DestinationRules and Gateway as YAML",
        description="Render the Istio objects that make the allowed hosts, and only those, "
        "reachable through the egress gateway.",
    )
    p.add_argument("--policies", required=True, metavar="PATH",
                   help="a policy ConfigMap file or a directory of them")
    p.add_argument("--gateway-namespace", default="istio-egress", metavar="NS",
                   help="namespace of the egress gateway (default: %(default)s)")
    p.add_argument("--gateway-service", default="istio-egressgateway", metavar="NAME",
                   help="Service of the egress gateway (default: %(default)s)")
    p.add_argument("--gateway-name", default="egress-authz", metavar="NAME",
                   help="the chart's Gateway for plain HTTP (default: %(default)s)")
    p.add_argument("--gateway-selector", metavar="K=V,...", type=_selector,
                   default="istio=egressgateway,egress-authz.io/gateway=egress-authz",
                   help="labels of the egress gateway pods (default: %(default)s)")
    add_output(p, "yaml", "json")
    add_cluster_namespace(p)
    add_cluster_domain(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..loader import build_policy_set
    from ..render import RenderOptions, render

    result = load_or_report(args.policies, args.cluster_namespace, args.cluster_domain)
    if result is None:
        return exits.USAGE  # policy errors, printed
    options = RenderOptions(gateway_namespace=args.gateway_namespace,
                            gateway_service=args.gateway_service, gateway_name=args.gateway_name,
                            gateway_selector=args.gateway_selector,
                            cluster_domain=args.cluster_domain)
    objects = render(build_policy_set(result.policies), options)
    if args.output == "json":
        import json

        # One JSON document: a Kubernetes List, which `kubectl apply -f -` takes as is.
        json.dump({"apiVersion": "v1", "kind": "List", "items": objects}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        yaml.safe_dump_all(objects, sys.stdout, sort_keys=False, default_flow_style=False)
    return exits.OK
