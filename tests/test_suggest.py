"""`egress-authz suggest` never widens: replayed decisions in, a policy out that
allows every observed request and none of their near misses.

The decisions are shaped as the admin API records them (the fields `suggest`
reads); the suggested ConfigMap is loaded with the real loader and judged
with the real engine, as the service would judge it once applied.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest
import yaml

from authz.commands.suggest import MAX_PATHS, suggest_configmap
from authz.engine import compile_policy, decide
from authz.loader import LoadResult, build_policy_set, load_objects
from authz.model import Destination, Identity, Protocol, Verdict, Workload

NS = "shop"


def seen(
    account: str, host: str, port: int, protocol: str, method: str = "", path: str = ""
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "reason": "host-not-allowed", "verdict": "audit", "mode": "audit", "namespace": NS,
        "service_account": account, "host": host, "port": port, "protocol": protocol,
        "labels": {"app": account},
    }  # fmt: skip
    if protocol == "HTTP":
        d |= {"method": method, "path": path}
    return d


# What a namespace did during its audit period.
OBSERVED = [
    seen("cart", "api.kadath.io", 443, "TLS"),
    seen("cart", "api.kadath.io", 80, "HTTP", "GET", "/"),  # "/" must not become "every path"
    seen("cart", "api.kadath.io", 80, "HTTP", "POST", "/v1/orders"),
    seen("cart", "api.kadath.io", 80, "HTTP", "GET", "/v1/orders?page=2"),
    seen("cart", "api.leng.com", 443, "TLS"),
    seen("cart", "api.leng.com", 8443, "TLS"),
    seen("cart", "hooks.leng.com", 8080, "HTTP", "PUT", "/hook"),
    seen("billing", "api.leng.com", 443, "TLS"),
]

# Each differs from an observed request in one respect (or combines two
# observed ones in a way never seen together).
NEAR_MISSES = [
    ("cart", "api.kadath.io", 8443, "TLS", "", ""),  # TLS port seen only for another host
    ("cart", "api.kadath.io", 443, "HTTP", "GET", "/"),  # HTTP on the TLS port
    ("cart", "api.kadath.io", 80, "TLS", "", ""),  # TLS on the HTTP port
    ("cart", "api.kadath.io", 80, "HTTP", "GET", "/admin"),  # a path under "/"
    ("cart", "api.kadath.io", 80, "HTTP", "GET", "/v1/orders/1"),  # below an exact path
    ("cart", "api.kadath.io", 80, "HTTP", "GET", "/v1/ordersX"),  # a longer sibling
    ("cart", "api.kadath.io", 80, "HTTP", "GET", "/v1/"),  # the parent
    ("cart", "api.kadath.io", 80, "HTTP", "POST", "/"),  # a method seen on another path
    ("cart", "api.kadath.io", 80, "HTTP", "DELETE", "/v1/orders"),  # a method never seen
    ("cart", "api.kadath.io", 80, "HTTP", "GET", "/v1/x/../../admin"),  # resolves to /admin
    ("cart", "api.leng.com", 80, "HTTP", "GET", "/"),  # HTTP to a TLS-only host
    ("cart", "hooks.leng.com", 443, "TLS", "", ""),  # TLS to an HTTP-only host
    ("cart", "hooks.leng.com", 8080, "HTTP", "GET", "/hook"),  # another method
    ("cart", "hooks.leng.com", 80, "HTTP", "PUT", "/hook"),  # another port
    ("cart", "www.kadath.io", 443, "TLS", "", ""),  # a sibling host
    ("cart", "kadath.io", 443, "TLS", "", ""),  # the parent domain
    ("billing", "api.leng.com", 8443, "TLS", "", ""),  # a port only cart used
    ("billing", "api.kadath.io", 443, "TLS", "", ""),  # a host only cart used
    ("other", "api.leng.com", 443, "TLS", "", ""),  # an account never seen
]


def suggested(decisions: list[dict[str, Any]], **kw: Any) -> tuple[str, LoadResult]:
    text = suggest_configmap(decisions, NS, name="suggested", **kw)
    result = LoadResult()
    load_objects(yaml.safe_load_all(text), "suggestion", result, cluster_namespace="egress-authz")
    assert result.problems == [] and len(result.policies) == 1, (result.problems, text)
    return text, result


def verdict(result: LoadResult, request: tuple[str, str, int, str, str, str]) -> bool:
    account, host, port, protocol, method, path = request
    snapshot = compile_policy(build_policy_set(result.policies, revision=1))
    workload = Workload(NS, account, MappingProxyType({"app": account}), name=f"{account}-1")
    identity = Identity(f"spiffe://cluster.local/ns/{NS}/sa/{account}", "10.0.0.1", workload)
    if protocol == "HTTP":
        dest = Destination(port, Protocol.HTTP, http_host=host, method=method, path=path)
    else:
        dest = Destination(port, Protocol.TLS, sni=host)
    # The suggestion keeps audit mode, where a denial is let through as `audit`:
    # only a rule's allow counts.
    return decide(snapshot, identity, dest).verdict is Verdict.ALLOW


def as_request(d: dict[str, Any]) -> tuple[str, str, int, str, str, str]:
    return (
        d["service_account"], d["host"], d["port"], d["protocol"],
        d.get("method", ""), d.get("path", ""),
    )  # fmt: skip


class TestReplay:
    def test_every_observed_request_is_allowed(self) -> None:
        """Applied, the suggestion allows each request it was made from."""
        _, result = suggested(OBSERVED)
        for d in OBSERVED:
            assert verdict(result, as_request(d)), d

    @pytest.mark.parametrize("request_", NEAR_MISSES, ids=lambda r: " ".join(map(str, r)))
    def test_no_near_miss_is_allowed(self, request_: tuple[str, str, int, str, str, str]) -> None:
        """Nothing that was not observed: other ports, protocols, methods, paths, hosts, accounts."""
        text, result = suggested(OBSERVED)
        assert not verdict(result, request_), text

    def test_root_path_is_exact(self) -> None:
        """A request to `/` is suggested as the exact path `/`, never the prefix `/`."""
        text, _ = suggested(OBSERVED)
        rules = yaml.safe_load(yaml.safe_load(text)["data"]["policy.yaml"])["rules"]
        for rule in rules:
            assert "/" not in (rule.get("http") or {}).get("paths", []), rule

    def test_one_rule_per_protocol_and_port_set(self) -> None:
        """HTTP on one port and TLS on another never share a rule."""
        text, _ = suggested(OBSERVED)
        rules = yaml.safe_load(yaml.safe_load(text)["data"]["policy.yaml"])["rules"]
        assert all(len(r["protocols"]) == 1 for r in rules)
        tls_leng = [r for r in rules if "api.leng.com" in r["hosts"] and "cart" in str(r)]
        assert [r["ports"] for r in tls_leng] == [[443, 8443]]


class TestNarrowing:
    MANY = [seen("cart", "api.kadath.io", 80, "HTTP", "GET", f"/v1/items/{i}") for i in range(30)]

    def test_many_paths_under_one_prefix_become_it_with_a_comment(self) -> None:
        """More than MAX_PATHS paths sharing /v1/items/ become that prefix, and the comment says so."""
        text, result = suggested(self.MANY)
        assert "narrowed: /v1/items/ is the longest prefix" in text
        assert verdict(result, ("cart", "api.kadath.io", 80, "HTTP", "GET", "/v1/items/99"))
        assert not verdict(result, ("cart", "api.kadath.io", 80, "HTTP", "GET", "/v1/other"))
        assert not verdict(result, ("cart", "api.kadath.io", 80, "HTTP", "POST", "/v1/items/1"))

    def test_no_common_prefix_stays_exact(self) -> None:
        """Many paths with nothing in common below / stay exact: / is never proposed."""
        spread = [
            seen("cart", "api.kadath.io", 80, "HTTP", "GET", f"/p{i}") for i in range(MAX_PATHS + 5)
        ]
        text, result = suggested(spread)
        assert "narrowed" not in text
        assert verdict(result, ("cart", "api.kadath.io", 80, "HTTP", "GET", "/p3"))
        assert not verdict(result, ("cart", "api.kadath.io", 80, "HTTP", "GET", "/q"))
