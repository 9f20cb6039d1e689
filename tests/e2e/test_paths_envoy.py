"""Path-prefix rules hold through the real gateway Envoy (issue 10, item 8).

The gateway normalizes as Istio's MERGE_SLASHES builds it (istio/envoy/gateway.yaml);
what Envoy leaves alone, the service denies. Judged by what the client and the loopback
upstream saw, with both policy sources (`serve --policies`, `serve --kube`).
"""

from __future__ import annotations

import json

import pytest

from authz.paths import normalize_path
from authz.testing.policies import policy_configmap

from .conftest import CART_FINANCE, World, eventually

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(90)]

HOST = "paths.kadath.io"


@pytest.fixture(scope="module")
def paths_world(world: World) -> World:
    """The shared world (file or kube source) plus a rule allowing only /v1/ on HOST."""
    world.put_policy(policy_configmap("paths", "shop", f"""
        - name: v1-only
          workloads: {{serviceAccounts: [cart]}}
          hosts: [{HOST}]
          ports: {world.ports}
          protocols: [HTTP]
          http: {{paths: ["/v1/"]}}
    """))
    eventually(lambda: world.http(CART_FINANCE, HOST, path="/v1/x").status == 200, timeout=10,
               what="the paths policy in force")
    return world


@pytest.mark.parametrize("path", [
    "/v1/..;/admin", "/v1/%252e%252e/admin", "/v1/%c0%ae%c0%ae/admin",  # the three
    "/v1/%2e%2e/admin", "/v1/..%2fadmin", "/v1/%5c..%5cadmin", "/v1/.;/admin",
    "/v1/../admin", "/v1//../admin", "/v1/%2E%2e;x/admin", "/v1/..\\admin",
])
def test_no_spelling_reaches_the_upstream_outside_the_prefix(paths_world: World,
                                                            path: str) -> None:
    """Each attack spelling is refused (by Envoy: 400, or the service: 403), or Envoy
    normalized it to a path under /v1/ that the upstream then got as judged: never a
    path outside the prefix."""
    upstream = paths_world.mesh.http_upstream
    before = len(upstream.requests)
    result = paths_world.http(CART_FINANCE, HOST, path=path)
    seen = [r.path for r in upstream.requests[before:]]
    if result.status == 200:
        assert len(seen) == 1 and seen[0].startswith("/v1/"), seen
        assert normalize_path(seen[0]) == seen[0]
        return
    assert result.status in (400, 403), (result.status, result.body)
    if result.status == 403:
        assert json.loads(result.body)["reason"] in ("path-not-normalized", "path-not-allowed")
    assert seen == []


def test_double_escape_and_overlong_utf8_are_path_not_normalized(paths_world: World) -> None:
    """Two of the issue's spellings pass Envoy's normalization unchanged; the service
    denies them with path-not-normalized (Envoy itself resolves '..;' to '..')."""
    for path in ("/v1/%252e%252e/admin", "/v1/%c0%ae%c0%ae/admin"):
        result = paths_world.http(CART_FINANCE, HOST, path=path)
        assert result.status == 403
        assert json.loads(result.body)["reason"] == "path-not-normalized", path


def test_normal_paths_reach_the_upstream_as_judged(paths_world: World) -> None:
    """Allowed paths arrive in the form that was judged (Envoy normalized them first)."""
    upstream = paths_world.mesh.http_upstream
    for sent, seen in (("/v1/a/./b", "/v1/a/b"), ("/v1//x", "/v1/x"),
                       ("/v1/%7Euser?q=1", "/v1/~user?q=1")):
        before = len(upstream.requests)
        result = paths_world.http(CART_FINANCE, HOST, path=sent)
        assert result.status == 200, (sent, result.body)
        assert [r.path for r in upstream.requests[before:]] == [seen]
