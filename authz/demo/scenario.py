"""What the demo shows: three pods, three external hosts, and a script of calls
with the verdict each one must get. Plain data, read by the stack (pods,
hosts), the caller (calls) and the table (expectations).

The expectations follow from istio/examples/ (shop: api-connector may reach
api.kadath.io, finance may reach api.leng.com; the cluster denies
api.stealyourmoney.com) and the demo's marketing policy (audit mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from authz.testing.pods import Pod, pods_manifest

__all__ = ["Pod", "pods_manifest"]  # the stack imports both from here


API_CONNECTOR = Pod(
    "api-connector-7d9f8",
    "shop",
    "api-connector",
    "127.0.0.2",
    {"app": "api-connector", "function": "api-connector"},
)
CART = Pod("cart-5c6b4", "shop", "cart", "127.0.0.3", {"app": "cart", "function": "finance"})
ANALYTICS = Pod("analytics-84d2f", "marketing", "analytics", "127.0.0.4", {"app": "analytics"})
PODS = (API_CONNECTOR, CART, ANALYTICS)

KADATH = "api.kadath.io"
LENG = "api.leng.com"
STEAL = "api.stealyourmoney.com"
HOSTS = (KADATH, LENG, STEAL)


class Via(Enum):
    TLS = "TLS"  # the app's own TLS, through its sidecar (network ext_authz)
    HTTP = "HTTP"  # the app's plain HTTP, through its sidecar (HTTP ext_authz)
    # mTLS straight to the gateway's HTTP listener with a certificate and SNI
    # of the demo's choosing: what a compromised pod could try.
    RAW_HTTP = "HTTP*"

    @property
    def protocol(self) -> str:
        return "TLS" if self is Via.TLS else "HTTP"


@dataclass(frozen=True)
class Call:
    case: str  # what the row shows, in a few words
    pod: Pod  # where the call comes from (its IP, its sidecar)
    host: str
    via: Via
    expect_verdict: str
    expect_reason: str
    path: str = "/"
    # RAW_HTTP only: whose certificate is presented (default: the pod's own)
    # and the SNI sent (default: the host).
    certificate_of: Pod | None = None
    sni: str | None = None

    @property
    def expect_through(self) -> bool:
        """Allowed and audited calls reach the host; denied ones never do."""
        return self.expect_verdict in ("allow", "audit")

    @property
    def note(self) -> str | None:
        """What a RAW_HTTP call does differently, for a footnote under the table."""
        if self.certificate_of is not None and self.certificate_of != self.pod:
            return (
                f"the {self.pod.workload} pod ({self.pod.ip}) presents "
                f"{self.certificate_of.workload}'s certificate"
            )
        if self.sni is not None and self.sni != self.host:
            return f"mTLS SNI {self.sni}, HTTP Host {self.host}"
        return None


CALLS = (
    Call("allowed by label", API_CONNECTOR, KADATH, Via.TLS, "allow", "allowed"),
    Call("allowed by label", CART, LENG, Via.TLS, "allow", "allowed"),
    Call("denied by label", CART, KADATH, Via.TLS, "deny", "host-not-allowed"),
    Call("denied by host", API_CONNECTOR, LENG, Via.HTTP, "deny", "host-not-allowed"),
    Call("cluster deny", CART, STEAL, Via.TLS, "deny", "cluster-denied"),
    Call(
        "stolen certificate",
        ANALYTICS,
        KADATH,
        Via.RAW_HTTP,
        "deny",
        "identity-mismatch",
        certificate_of=API_CONNECTOR,
    ),
    Call("domain fronting", CART, STEAL, Via.RAW_HTTP, "deny", "sni-host-mismatch", sni=LENG),
    Call("allowed in audit ns", ANALYTICS, KADATH, Via.HTTP, "allow", "allowed", path="/v1/events"),
    Call("audit: let through", ANALYTICS, LENG, Via.HTTP, "audit", "host-not-allowed"),
    Call("audit keeps cluster deny", ANALYTICS, STEAL, Via.TLS, "deny", "cluster-denied"),
)

# The call whose decision `egress-authz explain` is shown for: a denial that
# a rule almost allowed, so the explanation has something to say.
EXPLAIN_CALL = 2
