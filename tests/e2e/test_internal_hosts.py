"""SSRF through the real gateway Envoy: a namespace rule naming internal hosts is refused.

The owner of `shop` writes a ConfigMap allowing cart to reach the cloud metadata
server and the Kubernetes API by name. Before the fix the gateway forwarded both
(the loopback mesh routes every host to its upstream); now the ConfigMap is refused
and reported, and the gateway answers 403 host-not-allowed on HTTP and closes TLS,
in both policy sources (`serve --policies` and `serve --kube`).
"""

from __future__ import annotations

import pytest

from authz.testing.policies import policy_configmap

from .conftest import CART_FINANCE, World, eventually

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(90)]

INTERNAL = ("metadata.google.internal", "kubernetes.default.svc.cluster.local")
PROBE = "probe.kadath.io"


def test_internal_hosts_are_not_opened(world: World) -> None:
    """The refused ConfigMap is reported (log; Event with --kube), a later good one is
    in force (the barrier), and requests for the internal hosts never reach the
    upstream. Removes both ConfigMaps before returning."""
    hosts = ", ".join(INTERNAL)
    world.put_policy(policy_configmap("egress-internal", "shop", f"""
        - name: metadata
          workloads: {{serviceAccounts: [cart]}}
          hosts: [{hosts}]
          ports: {world.ports}
        """))
    # Sources apply changes in order: once the later ConfigMap is in force, the
    # internal one has been read too.
    world.put_policy(policy_configmap("egress-probe", "shop", f"""
        - name: probe
          workloads: {{serviceAccounts: [cart]}}
          hosts: [{PROBE}]
          ports: {world.ports}
        """))
    try:
        eventually(lambda: world.http(CART_FINANCE, PROBE).status == 200, timeout=10,
                   what="the probe ConfigMap in force")
        before = world.mesh.http_upstream.accepts
        for host in INTERNAL:
            denied = world.http(CART_FINANCE, host)
            assert denied.status == 403, (host, denied.body)
            assert denied.json()["reason"] == "host-not-allowed"
            assert world.tls(CART_FINANCE, host).reply is None
        assert world.mesh.http_upstream.accepts == before
        eventually(lambda: 'shop/egress-internal rules[0] "metadata" hosts[0]'
                   in world.service.output(), timeout=10, what="the refusal logged")
        if world.mode == "kube":
            emu = world.backend.emu  # type: ignore[attr-defined]
            (event,) = emu.wait_for(lambda: emu.events("shop", involved="egress-internal",
                                                       reason="PolicyInvalid"), timeout=10)
            assert "allowInternalHosts" in event["message"]
    finally:
        world.delete_policy("shop", "egress-internal")
        world.delete_policy("shop", "egress-probe")
    eventually(lambda: world.http(CART_FINANCE, PROBE).status == 403, timeout=10,
               what="the probe ConfigMap withdrawn")
