"""A loopback egress path: CA, gateway Envoy, sidecars and fake external hosts.

    app ──TLS──▶ sidecar Envoy ──mTLS──▶ gateway Envoy ──▶ TLSUpstream
    client ──────────────mTLS+HTTP──────▶ gateway Envoy ──▶ HTTPUpstream
                                              │ Check
                                              ▼
                                   ext_authz server on authz_port

Everything binds 127.0.0.x. The ext_authz server is not part of the mesh:
the caller runs it (egress-authz serve, or the floor server) on
`authz_port`, and may stop and restart it while the mesh keeps running.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .clients import HTTPResult, TLSResult, http_via_gateway, tls_via_sidecar
from .envoy import Envoy, EnvoyError, free_port
from .pki import Credential, TestCA
from .upstreams import HTTPUpstream, TLSUpstream

GATEWAY_NAMESPACE = "istio-system"
GATEWAY_SERVICE_ACCOUNT = "istio-egressgateway-service-account"

# The external names the TLS upstream can present a certificate for.
DEFAULT_EXTERNAL_NAMES = ("*.kadath.io", "kadath.io", "*.example.com", "denied.example")


class LoopbackMesh:
    def __init__(
        self,
        authz_port: int,
        *,
        workdir: Path | None = None,
        external_names: tuple[str, ...] = DEFAULT_EXTERNAL_NAMES,
        trust_domain: str = "cluster.local",
        envoy_log_level: str = "info",
    ) -> None:
        self.authz_port = authz_port
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="egress-authz-mesh-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(self.workdir / "pki", trust_domain=trust_domain)
        self.gateway_identity = self.ca.workload(GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
        self.external_cert = self.ca.server(*external_names)
        self.http_upstream = HTTPUpstream()
        self.tls_upstream = TLSUpstream(self.external_cert)
        self.access_log = self.workdir / "gateway-access.log"
        self.envoy_log_level = envoy_log_level
        self.gateway = self._new_gateway()
        self._identities: dict[tuple[str, str], Credential] = {}
        self._sidecars: dict[tuple[str, str, str, str], Envoy] = {}

    def _new_gateway(self) -> Envoy:
        """A gateway on fresh listener ports (http_port, tls_port)."""
        self.http_port = free_port()
        self.tls_port = free_port()
        return Envoy(
            "gateway.yaml",
            {
                "HTTP_PORT": self.http_port,
                "TLS_PORT": self.tls_port,
                "AUTHZ_PORT": self.authz_port,
                "HTTP_UPSTREAM_PORT": self.http_upstream.port,
                "TLS_UPSTREAM_PORT": self.tls_upstream.port,
                "GATEWAY_CERT": self.gateway_identity.cert_path,
                "GATEWAY_KEY": self.gateway_identity.key_path,
                "CA_CERT": self.ca.ca_path,
                "ACCESS_LOG": self.access_log,
            },
            name="gateway",
            workdir=self.workdir,
            log_level=self.envoy_log_level,
        )

    @property
    def ca_path(self) -> str:
        return str(self.ca.ca_path)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> LoopbackMesh:
        """Start upstreams and gateway. Read http_port/tls_port after this:
        a port taken between free_port() and Envoy's bind gets new ones."""
        self.http_upstream.start()
        self.tls_upstream.start()
        try:
            _start_retrying_ports(self.gateway, self._new_gateway, lambda g: self._set_gateway(g))
        except BaseException:
            self.stop()
            raise
        return self

    def _set_gateway(self, gateway: Envoy) -> None:
        self.gateway = gateway

    def stop(self) -> None:
        for sidecar in self._sidecars.values():
            sidecar.stop()
        self._sidecars.clear()
        self.gateway.stop()
        self.http_upstream.stop()
        self.tls_upstream.stop()

    def __enter__(self) -> LoopbackMesh:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._own_dir and e is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------ workloads

    def identity(self, namespace: str, service_account: str) -> Credential:
        key = (namespace, service_account)
        if key not in self._identities:
            self._identities[key] = self.ca.workload(namespace, service_account)
        return self._identities[key]

    def sidecar(
        self, namespace: str, service_account: str, pod_ip: str, kind: str = "tls"
    ) -> Envoy:
        """The sidecar of one pod (started on first use, then reused).

        kind "tls": the app's TLS goes through untouched (sidecar-tls.yaml);
        kind "http": the app speaks plain HTTP to it (sidecar-http.yaml), e.g.
        `curl -H 'Host: api.kadath.io' http://127.0.0.1:<LISTEN_PORT>/`.
        """
        if kind not in ("tls", "http"):
            raise ValueError(f"sidecar kind must be tls or http, not {kind!r}")
        key = (namespace, service_account, pod_ip, kind)
        if key not in self._sidecars:
            cred = self.identity(namespace, service_account)
            sidecar = Envoy(
                f"sidecar-{kind}.yaml",
                {
                    "LISTEN_PORT": free_port(),
                    "GATEWAY_TLS_PORT" if kind == "tls" else "GATEWAY_HTTP_PORT": (
                        self.tls_port if kind == "tls" else self.http_port
                    ),
                    "POD_IP": pod_ip,
                    "WORKLOAD_CERT": cred.cert_path,
                    "WORKLOAD_KEY": cred.key_path,
                    "CA_CERT": self.ca.ca_path,
                    "GATEWAY_SAN": self.gateway_identity.uri,
                },
                name=f"sidecar-{kind}-{namespace}-{service_account}-{pod_ip}",
                workdir=self.workdir,
                log_level=self.envoy_log_level,
            )

            def again(old: Envoy = sidecar) -> Envoy:
                return Envoy(
                    old.config_template,
                    {**old.values, "LISTEN_PORT": free_port(), "ADMIN_PORT": free_port()},
                    name=old.name,
                    workdir=self.workdir,
                    log_level=self.envoy_log_level,
                )

            self._sidecars[key] = _start_retrying_ports(sidecar, again)
        return self._sidecars[key]

    @staticmethod
    def listen_port(sidecar: Envoy) -> int:
        return int(str(sidecar.values["LISTEN_PORT"]))

    # -------------------------------------------------------------- traffic

    def http(
        self,
        host: str,
        *,
        namespace: str,
        service_account: str,
        source_ip: str = "127.0.0.1",
        path: str = "/",
        method: str = "GET",
        headers: dict[str, str] | None = None,
        sni: str | None = None,
        timeout: float = 5.0,
    ) -> HTTPResult:
        """An HTTP request for `host` from that workload, over mTLS to the gateway
        (SNI: `sni`, by default the host, as the sidecar sends it)."""
        return http_via_gateway(
            self.http_port,
            host,
            credential=self.identity(namespace, service_account),
            ca_path=self.ca_path,
            path=path,
            method=method,
            headers=headers,
            source_ip=source_ip,
            sni=sni,
            timeout=timeout,
        )

    def tls(
        self,
        host: str,
        *,
        namespace: str,
        service_account: str,
        pod_ip: str,
        payload: bytes = b"ping\n",
        timeout: float = 5.0,
    ) -> TLSResult:
        """The app's own TLS connection to `host`, through its sidecar."""
        sidecar = self.sidecar(namespace, service_account, pod_ip)
        return tls_via_sidecar(
            self.listen_port(sidecar),
            host,
            ca_path=self.ca_path,
            payload=payload,
            timeout=timeout,
        )


def _start_retrying_ports(
    envoy: Envoy,
    rebuild: Callable[[], Envoy],
    on_rebuild: Callable[[Envoy], None] | None = None,
    attempts: int = 3,
) -> Envoy:
    """Start `envoy`; if a port picked by free_port() was taken meanwhile (by
    another test session on this machine), rebuild it on new ports and retry."""
    for attempt in range(attempts):
        try:
            return envoy.start()
        except EnvoyError as e:
            if "Address already in use" not in str(e) or attempt == attempts - 1:
                raise
            envoy = rebuild()
            if on_rebuild is not None:
                on_rebuild(envoy)
    raise AssertionError("unreachable")
