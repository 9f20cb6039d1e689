"""Gateway listener port -> the port the app dialled: the gateway port map.

Envoy's CheckRequest carries the port of the gateway pod's listener
(`attributes.destination.address`). An unprivileged egress gateway listens on
8443/8080 behind Service ports 443/80, so the listener port is not the port a
policy rule names. The map translates it back: from `serve --gateway-port-map`
(file mode) or from the gateway's Service (port -> targetPort, `serve --kube`).

Read on every Check: `translate` is one dict lookup on a dict replaced whole
when the map changes, never mutated, so readers need no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

UNMAPPED = 0
"""The port judged for a listener port the map does not know: no rule names port 0
(policies accept 1-65535), so such a Check is denied (fail closed)."""

MAX_ENTRIES = 1024  # a Service has at most a few dozen ports; anything more is not a map


class PortMapError(ValueError):
    """A --gateway-port-map that cannot be read; the message says where."""


def _show(value: object) -> str:
    """A value for a message: scalars clipped, anything else by its type only."""
    if isinstance(value, str | int | float) or value is None:
        text = repr(value)
        return text if len(text) <= 20 else text[:20] + "..."
    return f"a {type(value).__name__}"


def _port(text: str, what: str, entry: str) -> int:
    text, shown = text.strip(), _show(entry)
    if not text.isascii() or not text.isdigit():
        raise PortMapError(f"{shown}: {what} {_show(text)} is not a port number")
    if len(text) > 5 or not 1 <= int(text) <= 65535:  # length first: int() of 10^6 digits
        number = text if len(text) <= 5 else _show(text)
        raise PortMapError(f"{shown}: {what} {number} is out of range 1-65535")
    return int(text)


def parse_port_map(text: str) -> dict[int, int]:
    """`LISTEN:PORT,...` (e.g. `8443:443,8080:80`) -> {listener port: Service port}.

    Every listener port at most once: a listener reached through two Service
    ports would leave the dialled port ambiguous.
    """
    if not text.strip():
        raise PortMapError("empty: give LISTEN:PORT pairs, e.g. 8443:443,8080:80")
    entries = text.split(",")
    if len(entries) > MAX_ENTRIES:
        raise PortMapError(f"{len(entries)} entries exceed {MAX_ENTRIES}")
    out: dict[int, int] = {}
    for raw in entries:
        entry = raw.strip()
        listen, sep, port = entry.partition(":")
        if not sep or ":" in port:
            raise PortMapError(f"{_show(entry)} is not LISTEN:PORT (e.g. 8443:443)")
        lp, sp = _port(listen, "listener port", entry), _port(port, "port", entry)
        if lp in out:
            raise PortMapError(f"listener port {lp} is mapped twice ({out[lp]} and {sp})")
        out[lp] = sp
    return out


def format_port_map(mapping: Mapping[int, int]) -> str:
    return ",".join(f"{lp}:{sp}" for lp, sp in sorted(mapping.items()))


@dataclass(frozen=True)
class ServicePorts:
    """What one Service says about the gateway's listeners."""

    mapping: Mapping[int, int]  # targetPort -> port
    problems: tuple[str, ...]  # ports left out, and why


def map_from_service(service: Mapping[str, Any]) -> ServicePorts:
    """A Service manifest (as the API returns it) -> {targetPort: port}.

    Only TCP ports count. A missing targetPort means the port itself. A named
    targetPort (e.g. `https`) names a container port of the gateway pods, which
    the Service does not resolve: it is left out (unmapped, so denied) and
    reported. A listener port reached through two Service ports is left out too.
    """
    spec = service.get("spec") if isinstance(service, Mapping) else None
    ports = spec.get("ports") if isinstance(spec, Mapping) else None
    if not isinstance(ports, list):
        return ServicePorts(MappingProxyType({}), ("the Service has no spec.ports",))
    mapping: dict[int, int] = {}
    ambiguous: set[int] = set()
    problems: list[str] = []
    for p in ports[:MAX_ENTRIES]:
        if not isinstance(p, Mapping) or (p.get("protocol") or "TCP") != "TCP":
            continue
        port = p.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems.append(f"port {_show(port)} is not a port number")
            continue
        target = p.get("targetPort", port)
        if target is None:
            target = port
        if isinstance(target, str) and target.isascii() and target.isdigit():
            target = int(target) if len(target) <= 5 else 0  # 0: reported as not a port
        if isinstance(target, str):
            problems.append(
                f"port {port}: named targetPort {_show(target)} cannot be resolved from the "
                "Service; its listener is unmapped (use a numeric targetPort, or "
                "--gateway-port-map)"
            )
            continue
        if not isinstance(target, int) or isinstance(target, bool) or not 1 <= target <= 65535:
            problems.append(f"port {port}: targetPort {_show(target)} is not a port number")
            continue
        if target in mapping and mapping[target] != port:
            ambiguous.add(target)
        mapping[target] = port
    for target in sorted(ambiguous):
        del mapping[target]
        problems.append(
            f"listener port {target} is the targetPort of several Service ports: the port "
            "the app dialled is ambiguous, so it is unmapped"
        )
    return ServicePorts(MappingProxyType(mapping), tuple(problems))


class GatewayPorts:
    """The map in force, shared by its source (flag or Service watch) and Check.

    `None` (the default, no map configured) judges the listener port as is: a
    gateway listening on the ports its Service exposes (80, 443) needs no map.
    """

    def __init__(self, mapping: Mapping[int, int] | None = None) -> None:
        self.current: Mapping[int, int] | None = (
            None if mapping is None else MappingProxyType(dict(mapping))
        )

    def translate(self, listener_port: int) -> int:
        """The port judged for a Check that arrived on `listener_port`."""
        current = self.current  # read once: one map per Check
        if current is None:
            return listener_port
        return current.get(listener_port, UNMAPPED)

    def replace(self, mapping: Mapping[int, int] | None) -> None:
        """Install a new map, whole; readers see the old one or the new one."""
        new = None if mapping is None else MappingProxyType(dict(mapping))
        if new == self.current:
            return
        self.current = new
        log.info("gateway port map: %s",
                 "none (listener ports judged as is)" if new is None
                 else (format_port_map(new) or "empty (every Check denied)"))
