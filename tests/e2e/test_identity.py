"""Who is calling, end to end, in both worlds (conftest.py: file and kube).

The certificate names a namespace and service account; the Pod at the source
address must agree, and supplies the labels. Each attack here is a stolen or
misused certificate replayed through the real gateway Envoy; each is judged by
what the client and the upstream saw, and paired with a call that must still
work, so that a service denying everything cannot pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from authz.testing.clients import HTTPResult
from authz.testing.pods import Pod

from .conftest import CART_FINANCE, CART_MARKETING, FRONTEND, World, eventually

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(90)]

# Addresses no Pod of the shared world has (conftest.py); scenarios that place
# Pods there remove them again.
NOWHERE = "127.0.0.9"
SPARE = "127.0.0.6"
SPARE_2 = "127.0.0.7"
SPARE_3 = "127.0.0.8"


def reason(result: HTTPResult) -> str | None:
    if result.status != 403 or not result.body:
        return None
    value = json.loads(result.body).get("reason")
    return str(value) if value is not None else None


def impostor(owner: Pod, ip: str) -> Pod:
    """`owner`'s certificate (namespace, service account) used from `ip`."""
    return Pod(f"stolen-{owner.name}", owner.namespace, owner.service_account, ip)


@contextmanager
def pods(world: World, *placed: Pod) -> Iterator[dict[str, Pod]]:
    """Put Pods in the world for one test; whatever is there at the end is removed.
    Yields the live set (name -> Pod) so a test can swap Pods in and out."""
    live: dict[str, Pod] = {}
    for pod in placed:
        world.put_pod(pod)
        live[pod.name] = pod
    try:
        yield live
    finally:
        for pod in live.values():
            world.delete_pod(pod)


def swap(world: World, live: dict[str, Pod], old: Pod | None, new: Pod | None) -> None:
    if old is not None:
        world.delete_pod(live.pop(old.name))
    if new is not None:
        world.put_pod(new)
        live[new.name] = new


class TestStolenCertificate:
    """shop/cart's certificate in the wrong hands."""

    def test_from_another_pods_address_is_identity_mismatch(self, world: World) -> None:
        """From frontend's Pod address, cart's certificate is refused on both paths
        (identity-mismatch), though cart may reach the host; nothing reaches the upstream."""
        thief = impostor(CART_FINANCE, FRONTEND.ip)
        before = world.mesh.http_upstream.accepts
        denied = world.http(thief, "api.kadath.io")
        assert reason(denied) == "identity-mismatch", denied
        assert world.tls(thief, "api.kadath.io").reply is None
        assert world.mesh.http_upstream.accepts == before
        assert world.http(CART_FINANCE, "api.kadath.io").status == 200

    def test_from_an_address_no_pod_has_is_unknown_workload(self, world: World) -> None:
        """From an address no Pod has, cart's certificate is refused on both paths
        (unknown-workload), even for a service-account-only rule; the body says why."""
        thief = impostor(CART_FINANCE, NOWHERE)
        before = world.mesh.http_upstream.accepts
        denied = world.http(thief, "api.kadath.io")
        assert reason(denied) == "unknown-workload", denied
        assert NOWHERE in json.loads(denied.body)["message"]
        assert world.tls(thief, "api.kadath.io").reply is None
        assert world.mesh.http_upstream.accepts == before
        assert world.http(CART_MARKETING, "api.kadath.io").status == 200

    def test_forwarded_headers_lend_no_address(self, world: World) -> None:
        """X-Forwarded-For / X-Real-IP naming cart's Pod do not make an unknown source one."""
        forged = {"x-forwarded-for": CART_FINANCE.ip, "x-real-ip": CART_FINANCE.ip,
                  "x-envoy-external-address": CART_FINANCE.ip}
        denied = world.http(impostor(CART_FINANCE, NOWHERE), "api.kadath.io", headers=forged)
        assert reason(denied) == "unknown-workload", denied


class TestPodChanges:
    """The Pod index follows Pods as they come, change and go (watch or file)."""

    def test_reused_ip_belongs_to_the_new_pod(self, world: World) -> None:
        """A finance cart Pod is deleted and a frontend Pod gets its IP: cart's certificate
        from that IP becomes identity-mismatch; the new Pod is judged as frontend."""
        old = Pod("cart-old", "shop", "cart", SPARE, {"function": "finance"})
        new = Pod("frontend-new", "shop", "frontend", SPARE)
        with pods(world, old) as live:
            eventually(lambda: world.http(old, "payments.kadath.io").status == 200,
                       timeout=10, what="the finance Pod's label rule in force")
            swap(world, live, old, new)
            eventually(lambda: reason(world.http(old, "api.kadath.io")) == "identity-mismatch",
                       timeout=10, what="cart's certificate refused at the reused IP")
            assert reason(world.http(old, "payments.kadath.io")) == "identity-mismatch"
            assert world.http(new, "cdn.kadath.io").status == 200
            assert reason(world.http(new, "api.kadath.io")) == "host-not-allowed"

    def test_deleted_pod_leaves_its_address_unknown(self, world: World) -> None:
        """Once its Pod is gone, an address vouches for nobody: unknown-workload."""
        gone = Pod("cart-gone", "shop", "cart", SPARE_2)
        with pods(world, gone) as live:
            eventually(lambda: world.http(gone, "api.kadath.io").status == 200,
                       timeout=10, what="the new Pod allowed")
            swap(world, live, gone, None)
            eventually(lambda: reason(world.http(gone, "api.kadath.io")) == "unknown-workload",
                       timeout=10, what="the deleted Pod's address unknown")

    def test_label_change_is_used_by_the_next_checks(self, world: World) -> None:
        """Relabelled function=marketing -> finance, a Pod gains the finance rule; and back."""
        marketing = Pod("cart-relabel", "shop", "cart", SPARE_3, {"function": "marketing"})
        finance = Pod(marketing.name, "shop", "cart", SPARE_3, {"function": "finance"})
        with pods(world, marketing) as live:
            eventually(lambda: world.http(marketing, "api.kadath.io").status == 200,
                       timeout=10, what="the new Pod allowed")
            assert reason(world.http(marketing, "payments.kadath.io")) == "host-not-allowed"
            swap(world, live, None, finance)
            eventually(lambda: world.http(finance, "payments.kadath.io").status == 200,
                       timeout=10, what="the finance label in force")
            swap(world, live, None, marketing)
            eventually(lambda: world.http(marketing, "payments.kadath.io").status == 403,
                       timeout=10, what="the finance label gone")

    def test_every_address_of_a_dual_stack_pod(self, world: World) -> None:
        """status.podIPs, not only status.podIP: a dual-stack Pod whose podIP is its IPv6
        address (written uncompressed) is found at its IPv4 address, labels and all."""
        dual = Pod("cart-dual", "shop", "cart", SPARE, {"function": "finance"},
                   pod_ips=("fd00:10:0:0:0:0:0:7", SPARE))
        with pods(world, dual):
            eventually(lambda: world.http(dual, "payments.kadath.io").status == 200,
                       timeout=10, what="the dual-stack Pod found at its IPv4 address")
            tls = world.tls(dual, "payments.kadath.io")
            assert tls.reply == b"hello payments.kadath.io: ping\n", tls
