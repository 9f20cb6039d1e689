"""Wildcards over a public suffix (`*.com`, `*.co.uk`, `*.github.io`) are refused (issue 10, 7).

The Mozilla Public Suffix List comes from the `publicsuffixlist` package's bundled
snapshot: no network at run time. Both sections count: ICANN (`com`, `co.uk`) and
private (`github.io`, `s3.amazonaws.com`), where strangers register the names below.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from authz import hosts
from authz.policy import PolicyError, parse_configmap

CLUSTER_NS = "egress-authz"


def configmap(body: str, *, cluster: bool = False) -> dict[str, object]:
    labels = {"egress-authz.io/tier": "cluster"} if cluster else {"egress-authz.io/policy": "true"}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "p", "namespace": CLUSTER_NS if cluster else "shop",
                         "labels": labels},
            "data": {"policy.yaml": body}}


def problems(body: str, *, cluster: bool = False) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_configmap(configmap(body, cluster=cluster), cluster_namespace=CLUSTER_NS)
    return info.value.problems


OVER_WIDE = ["*.com", "*.co.uk", "*.github.io", "*.s3.amazonaws.com", "*.herokuapp.com",
             "*.cloudfront.net", "*.foo.ck", "*.io", "*.xn--p1ai", "*.рф", "*.example",
             "*.COM.", "*.blogspot.com"]
# Internal suffixes (`*.internal`, `*.svc.cluster.local`) are refused for another
# reason: tests/test_internal_hosts.py.
NARROW = ["*.kadath.io", "*.amazonaws.com", "*.bucket.s3.amazonaws.com", "*.www.ck",
          "*.example.com", "*.svc.kadath.io", "*.api.github.com", "*.me.github.io"]


class TestNamespacePolicies:
    @pytest.mark.parametrize("pattern", OVER_WIDE)
    def test_over_wide_refused(self, pattern: str) -> None:
        """A wildcard whose suffix is a public suffix (or a whole TLD) is a located error
        that says why and what to write instead."""
        (msg,) = problems(f"rules: [{{name: r, hosts: [{pattern!r}]}}]")
        assert 'rules[0] "r" hosts[0]' in msg
        assert "public suffix" in msg or "top-level domain" in msg
        assert "name the hosts" in msg

    @pytest.mark.parametrize("pattern", NARROW)
    def test_narrow_wildcards_accepted(self, pattern: str) -> None:
        """Wildcards below a registrable domain stay allowed, including private-section
        tenants (`*.me.github.io`) and a PSL exception (`*.www.ck`)."""
        policy = parse_configmap(configmap(f"rules: [{{name: r, hosts: [{pattern!r}]}}]"),
                                 cluster_namespace=CLUSTER_NS)
        assert policy.rules[0].hosts == (hosts.parse_pattern(pattern),)

    def test_exact_public_suffix_host_is_fine(self) -> None:
        """Naming a public suffix exactly (one host, `github.io`) is not a wildcard."""
        parse_configmap(configmap("rules: [{name: r, hosts: [github.io, co.uk]}]"),
                        cluster_namespace=CLUSTER_NS)

    def test_namespace_cannot_opt_in(self) -> None:
        """The opt-in field exists only in the cluster policy."""
        msgs = problems("allowPublicSuffixWildcards: true\nrules: [{name: r, hosts: ['*.com']}]")
        assert any("allowPublicSuffixWildcards" in m and "cluster policy" in m for m in msgs)
        assert any("top-level domain com" in m for m in msgs)


class TestClusterPolicy:
    def test_cluster_rules_refused_without_opt_in(self) -> None:
        """The cluster tier's allow rules are held to the same rule by default."""
        (msg,) = problems("rules: [{name: r, hosts: ['*.github.io']}]", cluster=True)
        assert "allowPublicSuffixWildcards" in msg

    def test_cluster_opt_in(self) -> None:
        """`allowPublicSuffixWildcards: true` in the cluster policy lets its rules name one."""
        policy = parse_configmap(configmap(
            "allowPublicSuffixWildcards: true\nrules: [{name: r, hosts: ['*.github.io']}]",
            cluster=True), cluster_namespace=CLUSTER_NS)
        assert policy.rules[0].hosts == ("*.github.io",)

    def test_opt_in_must_be_boolean(self) -> None:
        """A mistyped opt-in is an error, not a silent yes."""
        msgs = problems("allowPublicSuffixWildcards: 'yes please'\nrules: []", cluster=True)
        assert any("must be true or false" in m for m in msgs)

    def test_deny_may_name_public_suffixes(self) -> None:
        """Denying a whole suffix narrows access, so `deny: ['*.zip']` needs no opt-in."""
        policy = parse_configmap(configmap("deny: ['*.zip', '*.github.io']\nrules: []",
                                           cluster=True), cluster_namespace=CLUSTER_NS)
        assert policy.deny == ("*.zip", "*.github.io")


def test_no_network_at_run_time() -> None:
    """The list is the package's bundled snapshot: deciding works with every socket refused."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from authz import hosts\n"
        "assert hosts.public_suffix_problem('*.github.io')\n"
        "assert hosts.public_suffix_problem('*.kadath.io') is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_suggest_never_proposes_a_refused_wildcard() -> None:
    """`suggest --wildcards` folds siblings only under a registrable domain: never
    `*.github.io` or `*.co.uk`, which the policy parser would refuse."""
    from authz.commands.suggest import _wildcard

    assert _wildcard({"a.github.io", "b.github.io"}) == ["a.github.io", "b.github.io"]
    assert _wildcard({"a.co.uk", "b.co.uk"}) == ["a.co.uk", "b.co.uk"]
    assert _wildcard({"a.kadath.io", "b.kadath.io"}) == ["*.kadath.io"]
    assert _wildcard({"a.me.github.io", "b.me.github.io"}) == ["*.me.github.io"]
