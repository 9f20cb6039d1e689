"""Clients that reach the gateway the way a mesh workload does.

`http_via_gateway` is the sidecar's half of the HTTP path (mTLS with the
workload certificate, plain HTTP inside); `tls_via_sidecar` is the app's
half of the TLS path (its own TLS to the external name, through the sidecar
Envoy). Both can bind a source address, which is how a test speaks for one
pod or another (127.0.0.2, 127.0.0.3, ...).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from .pki import Credential

# What Istio's sidecar puts in the outer SNI towards the gateway when no
# DestinationRule sets `sni`: the gateway's cluster name, never a Host.
ISTIO_DEFAULT_GATEWAY_SNI = "outbound_.80_._.istio-egressgateway.istio-system.svc.cluster.local"


def sni_for(host: str) -> str:
    """The SNI a sidecar sends for `host` under `egress-authz render`'s
    DestinationRules: the host without a :port."""
    if host.startswith("["):
        return host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


@dataclass
class HTTPResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class TLSResult:
    """`reply` is what the upstream answered; None when the connection was
    closed or reset before any reply (Envoy's network-filter denial)."""

    reply: bytes | None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def mtls_context(credential: Credential, ca_path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca_path)
    ctx.load_cert_chain(credential.cert_path, credential.key_path)
    # Mesh peers are named by SPIFFE URI SANs, which Python cannot check as a
    # hostname; the chain to the mesh root is still verified.
    ctx.check_hostname = False
    return ctx


def http_via_gateway(
    port: int,
    host: str,
    *,
    credential: Credential,
    ca_path: str,
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    source_ip: str = "127.0.0.1",
    gateway_ip: str = "127.0.0.1",
    sni: str | None = None,
    timeout: float = 5.0,
) -> HTTPResult:
    """One HTTP request with Host `host`, over mTLS to the gateway.

    The mTLS SNI is `sni`, by default the host (as the sidecar sends it)."""
    ctx = mtls_context(credential, ca_path)
    raw = socket.create_connection(
        (gateway_ip, port), timeout=timeout, source_address=(source_ip, 0)
    )
    try:
        tls = ctx.wrap_socket(raw, server_hostname=sni if sni is not None else sni_for(host))
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPConnection(gateway_ip, port, timeout=timeout)
    conn.sock = tls  # an already-connected mTLS socket; HTTPConnection just speaks HTTP on it
    try:
        hdrs = {"Host": host, **(headers or {})}
        conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        body = resp.read()
        return HTTPResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def tls_via_sidecar(
    port: int,
    sni: str,
    *,
    ca_path: str,
    payload: bytes = b"ping\n",
    timeout: float = 5.0,
    sidecar_ip: str = "127.0.0.1",
) -> TLSResult:
    """The app's own TLS to `sni`, through the sidecar's listener.

    A closed connection is a result, not an error: it is what a denial looks
    like on this path."""
    ctx = ssl.create_default_context(cafile=ca_path)
    try:
        with (
            socket.create_connection((sidecar_ip, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            tls.sendall(payload)
            reply = b""
            while True:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return TLSResult(reply=reply or None)
    except (OSError, ssl.SSLError) as e:
        return TLSResult(reply=None, error=f"{type(e).__name__}: {e}")
