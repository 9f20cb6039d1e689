"""The gateway port map of `serve --kube`, learnt from the egress gateway's Service.

The Service says which listener port (targetPort) each port the apps dial
(port) lands on; a watch keeps authz.gateway_ports.GatewayPorts equal to it, so
editing the Service changes the verdicts without a restart. Until the Service
has been read, and while it does not exist, the map is empty: every Check is
denied (fail closed) and the log says why.

Only numeric targetPorts are read. Istio resolves a named one from the gateway
pod's container ports (pilot/pkg/serviceregistry/kube/controller/controller.go,
FindPort); we do not watch those, so a named targetPort's listener stays
unmapped (denied) and is reported (docs/install.md, "Gateway ports").
"""

from __future__ import annotations

import logging

from ..gateway_ports import GatewayPorts, map_from_service
from .client import KubeApi, Obj
from .watch import ApiHealth, Backoff, Reflector

log = logging.getLogger(__name__)

DEFAULT_GATEWAY_SERVICE = "istio-egressgateway"  # the chart's gateway (values.yaml)


class GatewayServiceWatch:
    """list+watch of one Service (by name, in the gateway namespace) into GatewayPorts."""

    def __init__(self, api: KubeApi, ports: GatewayPorts, *, namespace: str,
                 name: str = DEFAULT_GATEWAY_SERVICE, health: ApiHealth | None = None,
                 watch_timeout: int = 300, backoff_cap: float = 10.0) -> None:
        self.ports, self.namespace, self.name = ports, namespace, name
        self.problems: tuple[str, ...] = ()
        self.reflector = Reflector(
            api, "Service", on_sync=self._synced, on_event=self._event, health=health,
            watch_timeout=watch_timeout, backoff=Backoff(cap=backoff_cap),
            name="gateway-service", namespace=namespace,
            field_selector=f"metadata.name={name}")

    def start(self) -> None:
        self.reflector.start()

    def stop(self) -> None:
        self.reflector.stop()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first list (found or not); False, and a log line, after `timeout`."""
        if self.reflector.synced.wait(timeout):
            return True
        log.warning("gateway port map: Service %s/%s not listed after %.0fs; every Check is "
                    "denied until it is", self.namespace, self.name, timeout)
        return False

    def _synced(self, items: list[Obj]) -> None:
        mine = [o for o in items if (o.get("metadata") or {}).get("name") == self.name]
        self._apply(mine[0] if mine else None)

    def _event(self, type_: str, obj: Obj) -> None:
        if (obj.get("metadata") or {}).get("name") != self.name:
            return  # the field selector already keeps others out; never trust it alone
        self._apply(None if type_ == "DELETED" else obj)

    def _apply(self, service: Obj | None) -> None:
        where = f"Service {self.namespace}/{self.name}"
        if service is None:
            self.problems = (f"{where} not found",)
            log.error("gateway port map: %s; every Check is denied until it exists "
                      "(--gateway-service, or --gateway-port-map)", where)
            self.ports.replace({})
            return
        found = map_from_service(service)
        if found.problems != self.problems:
            for problem in found.problems:
                log.warning("gateway port map from %s: %s", where, problem)
        self.problems = found.problems
        self.ports.replace(found.mapping)  # logs the map when it changes
