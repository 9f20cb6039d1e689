"""The five end-to-end scenarios of issue 3, through a real Envoy 1.40.

Every request crosses the real gateway Envoy (istio/envoy/gateway.yaml),
which asks `egress-authz serve` over gRPC; the answer is judged by what the
client and the loopback upstream saw, never by asking the service. The world
(pods, policies) is described in conftest.py.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from authz.testing.clients import ISTIO_DEFAULT_GATEWAY_SNI, HTTPResult
from authz.testing.pki import spiffe_id

from .conftest import (
    CART_FINANCE,
    CART_MARKETING,
    CLUSTER_DENIED_HOST,
    FRONTEND,
    RELOAD_HOSTS,
    World,
    cluster_policy,
    eventually,
    plain_get,
    reload_policy,
)

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(90)]

DECISION_HEADER = "x-egress-authz-decision-id"


def deny_body(result: HTTPResult) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(result.body)
    return body


class TestHTTPPath:
    """Scenario 1: mTLS client certificates, HTTP ext_authz filter, 403 with a reason."""

    def test_allowed_host_reaches_the_upstream(self, world: World) -> None:
        """cart may reach api.kadath.io: the upstream answers, with the decision id added."""
        before = len(world.mesh.http_upstream.requests)
        result = world.http(CART_FINANCE, "api.kadath.io", path="/v1/ping")
        assert result.status == 200, result.body
        seen = world.mesh.http_upstream.requests[before:]
        assert [(r.host, r.path) for r in seen] == [("api.kadath.io", "/v1/ping")]
        assert seen[0].headers.get(DECISION_HEADER), seen[0].headers

    def test_denied_host_gets_403_with_reason(self, world: World) -> None:
        """An unlisted host is refused by the service: 403, JSON reason, upstream untouched."""
        before = world.mesh.http_upstream.accepts
        result = world.http(CART_FINANCE, "denied.example")
        assert result.status == 403
        assert result.headers.get("content-type") == "application/json"
        body = deny_body(result)
        assert body["reason"] == "host-not-allowed"
        assert body["host"] == "denied.example"
        assert body["decision_id"]
        assert "shop" in str(body["workload"]) and "cart" in str(body["workload"])
        assert world.mesh.http_upstream.accepts == before

    def test_same_host_other_identity_other_verdict(self, world: World) -> None:
        """frontend may not reach api.kadath.io (cart's), but may reach cdn.kadath.io."""
        denied = world.http(FRONTEND, "api.kadath.io")
        assert denied.status == 403
        assert deny_body(denied)["reason"] == "host-not-allowed"
        assert world.http(FRONTEND, "cdn.kadath.io").status == 200
        assert world.http(CART_FINANCE, "cdn.kadath.io").status == 403

    def test_sni_host_mismatch_is_denied(self, world: World) -> None:
        """Domain fronting: mTLS SNI api.kadath.io, Host payments.kadath.io, both allowed
        to this pod on their own, together denied."""
        fronted = world.http(CART_FINANCE, "payments.kadath.io", sni="api.kadath.io")
        assert fronted.status == 403
        assert deny_body(fronted)["reason"] == "sni-host-mismatch"
        assert world.http(CART_FINANCE, "payments.kadath.io").status == 200

    def test_istio_default_sni_is_a_mismatch(self, world: World) -> None:
        """Without `egress-authz render`'s per-host DestinationRules the sidecar's SNI is
        the gateway's cluster name: the gateway config in istio/envoy then denies HTTP
        (that name, with its underscores, is not even a valid host)."""
        result = world.http(CART_FINANCE, "api.kadath.io", sni=ISTIO_DEFAULT_GATEWAY_SNI)
        assert result.status == 403
        assert deny_body(result)["reason"] in {"sni-host-mismatch", "invalid-host"}

    def test_headers_cannot_claim_an_identity(self, world: World) -> None:
        """A forged X-Forwarded-For or client-cert header does not make frontend a cart pod."""
        forged = {
            "x-forwarded-for": CART_FINANCE.ip,
            "x-forwarded-client-cert": f"URI={spiffe_id('shop', 'cart')}",
            DECISION_HEADER: "forged",
        }
        assert world.http(FRONTEND, "api.kadath.io", headers=forged).status == 403

    def test_through_the_http_sidecar(self, world: World) -> None:
        """The mesh's own HTTP path: plain HTTP to the pod's sidecar, which adds the mTLS."""
        sidecar = world.mesh.sidecar("shop", "cart", CART_FINANCE.ip, kind="http")
        port = world.mesh.listen_port(sidecar)
        assert plain_get(port, "api.kadath.io", "/via-sidecar")[0] == 200
        status, body = plain_get(port, "denied.example", "/via-sidecar")
        assert status == 403
        assert json.loads(body)["reason"] == "host-not-allowed"

    def test_access_log_carries_the_decision_id(self, world: World) -> None:
        """The gateway's access log line joins the decision through dynamic metadata."""
        result = world.http(CART_FINANCE, "api.kadath.io", path="/joined")
        assert result.status == 200
        seen = next(r for r in world.mesh.http_upstream.requests if r.path == "/joined")
        decision_id = seen.headers[DECISION_HEADER]
        eventually(
            lambda: decision_id in world.mesh.access_log.read_text(),
            timeout=5,
            what="access log line with the decision id",
        )


class TestTLSPath:
    """Scenario 2: app TLS wrapped in mTLS by a sidecar Envoy, network ext_authz filter."""

    def test_allowed_sni_reaches_the_upstream(self, world: World) -> None:
        """The app's own TLS to api.kadath.io arrives intact at the upstream."""
        result = world.tls(CART_FINANCE, "api.kadath.io")
        assert result.reply == b"hello api.kadath.io: ping\n", result

    def test_denied_sni_is_closed_and_upstream_sees_nothing(self, world: World) -> None:
        """A host cart may not reach: the connection is closed, no byte reaches the upstream."""
        before = world.mesh.tls_upstream.accepts
        result = world.tls(CART_FINANCE, "denied.example")
        assert result.reply is None, result
        time.sleep(0.2)  # an accept racing the close would show up by now
        assert world.mesh.tls_upstream.accepts == before

    def test_other_identity_other_verdict(self, world: World) -> None:
        """frontend's sidecar is refused api.kadath.io but may open cdn.kadath.io."""
        assert world.tls(FRONTEND, "api.kadath.io").reply is None
        assert world.tls(FRONTEND, "cdn.kadath.io").reply == b"hello cdn.kadath.io: ping\n"


class TestLabels:
    """Scenario 3: one service account, two pods, different labels, different verdicts."""

    def test_http_label_selects_the_pod(self, world: World) -> None:
        """payments.kadath.io is for function=finance: 127.0.0.2 yes, 127.0.0.3 no."""
        assert world.http(CART_FINANCE, "payments.kadath.io").status == 200
        denied = world.http(CART_MARKETING, "payments.kadath.io")
        assert denied.status == 403
        assert deny_body(denied)["reason"] == "host-not-allowed"

    def test_tls_label_selects_the_pod(self, world: World) -> None:
        """The same through each pod's own sidecar (bound to the pod IP)."""
        allowed = world.tls(CART_FINANCE, "payments.kadath.io")
        assert allowed.reply == b"hello payments.kadath.io: ping\n", allowed
        assert world.tls(CART_MARKETING, "payments.kadath.io").reply is None

    def test_rules_without_labels_apply_to_both(self, world: World) -> None:
        """The service-account rule (api.kadath.io) holds for both pods."""
        assert world.http(CART_MARKETING, "api.kadath.io").status == 200
        assert world.http(CART_FINANCE, "api.kadath.io").status == 200


class TestFailClosed:
    """Scenario 4: service down => Envoy denies; service back => allowed, same Envoy."""

    def test_stop_denies_restart_allows(self, world: World) -> None:
        """Stops the shared service and always starts it again before returning."""
        gateway_pid = world.mesh.gateway.pid
        assert world.http(CART_FINANCE, "api.kadath.io").status == 200
        http_before = world.mesh.http_upstream.accepts
        tls_before = world.mesh.tls_upstream.accepts
        world.service.stop()
        try:
            down = world.http(CART_FINANCE, "api.kadath.io")
            # Envoy's own 403 (status_on_error): no service, so no JSON reason.
            assert down.status == 403
            assert not down.body
            assert world.tls(CART_FINANCE, "api.kadath.io").reply is None
            time.sleep(0.2)
            assert world.mesh.http_upstream.accepts == http_before
            assert world.mesh.tls_upstream.accepts == tls_before
        finally:
            world.service.start()
        took = eventually(
            lambda: world.http(CART_FINANCE, "api.kadath.io").status == 200,
            timeout=10,
            what="allowed again after restart",
        )
        assert world.tls(CART_FINANCE, "api.kadath.io").reply == b"hello api.kadath.io: ping\n"
        assert world.mesh.gateway.pid == gateway_pid
        print(f"allowed again {took:.2f}s after the service was ready")


class TestPolicyReload:
    """Scenario 5: a host removed from the policy is denied within a second."""

    def test_removed_host_denied_within_a_second(self, world: World) -> None:
        """Edits the egress-reload ConfigMap under traffic, then restores it (and waits)."""
        # (started, finished, status): a request in flight during the edit may
        # see either policy; only those wholly before or after are judged.
        results: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                started = time.monotonic()
                status = world.http(CART_FINANCE, "reload.kadath.io").status
                results.append((started, time.monotonic(), status))
                time.sleep(0.02)

        eventually(
            lambda: world.http(CART_FINANCE, "reload.kadath.io").status == 200,
            timeout=10,
            what="reload.kadath.io allowed before the edit",
        )
        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            eventually(lambda: len(results) >= 3, timeout=10, what="traffic flowing")
            edited = time.monotonic()
            world.write_reload_policy(("keep.kadath.io",))
            eventually(
                lambda: sum(t > edited + 1.0 for t, _, _ in results) >= 3,
                timeout=10,
                what="requests more than 1s after the edit",
            )
        finally:
            stop.set()
            sender.join(timeout=10)
            world.write_reload_policy(RELOAD_HOSTS)
        try:
            assert all(s == 200 for _, done, s in results if done < edited), results
            late = [s for t, _, s in results if t >= edited + 1.0]
            assert late and all(s == 403 for s in late), results
            first_deny = min(done for _, done, s in results if s == 403)
            print(f"first denial {first_deny - edited:.3f}s after the edit")
            assert world.http(CART_FINANCE, "keep.kadath.io").status == 200
        finally:
            eventually(
                lambda: world.http(CART_FINANCE, "reload.kadath.io").status == 200,
                timeout=10,
                what="reload.kadath.io allowed again after restoring the file",
            )

    def test_deleted_configmap_revokes_its_rules(self, world: World) -> None:
        """Deleting egress-reload denies its hosts (the namespace's other ConfigMap stays in
        force); putting it back allows them again. Restores it before returning."""
        assert world.http(CART_FINANCE, "keep.kadath.io").status == 200
        world.delete_policy("shop", "egress-reload")
        try:
            eventually(
                lambda: world.http(CART_FINANCE, "keep.kadath.io").status == 403,
                timeout=5,
                what="keep.kadath.io denied after the delete",
            )
            denied = world.http(CART_FINANCE, "reload.kadath.io")
            assert deny_body(denied)["reason"] == "host-not-allowed"
            assert world.http(CART_FINANCE, "api.kadath.io").status == 200
        finally:
            world.put_policy(reload_policy(world.ports, RELOAD_HOSTS))
        eventually(
            lambda: world.http(CART_FINANCE, "keep.kadath.io").status == 200,
            timeout=10,
            what="keep.kadath.io allowed again after restoring the ConfigMap",
        )


class TestClusterTier:
    """The cluster-tier ConfigMap in the service's namespace."""

    def test_cluster_deny_beats_the_namespace_allow(self, world: World) -> None:
        """shop's rule lists blocked.kadath.io next to api.kadath.io; the cluster deny wins
        on both paths, the rule's other host is unaffected."""
        before = world.mesh.http_upstream.accepts
        denied = world.http(CART_FINANCE, CLUSTER_DENIED_HOST)
        assert denied.status == 403
        assert deny_body(denied)["reason"] == "cluster-denied"
        assert world.tls(CART_FINANCE, CLUSTER_DENIED_HOST).reply is None
        assert world.mesh.http_upstream.accepts == before
        assert world.http(CART_FINANCE, "api.kadath.io").status == 200

    def test_cluster_policy_edit_lifts_and_restores_the_deny(self, world: World) -> None:
        """Emptying the cluster deny list lets shop's rule apply; restored, the deny is back."""
        world.put_policy(cluster_policy(()))
        try:
            eventually(
                lambda: world.http(CART_FINANCE, CLUSTER_DENIED_HOST).status == 200,
                timeout=10,
                what="the host allowed without the cluster deny",
            )
        finally:
            world.put_policy(cluster_policy((CLUSTER_DENIED_HOST,)))
        eventually(
            lambda: world.http(CART_FINANCE, CLUSTER_DENIED_HOST).status == 403,
            timeout=10,
            what="the cluster deny back in force",
        )
