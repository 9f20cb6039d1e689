"""The demo's policy directory: the package's copies of istio/examples/ plus
the demo's audit namespace (authz/demo/policies/, package data, so that the
demo runs from an installed wheel; a test keeps the copies equal to
istio/examples/).

The files are copied, not referenced, so that a user can edit them while the
demo runs (`serve` reloads the directory) without touching the package.
One change is made on the way: the loopback gateway cannot listen on ports
443 and 80 without root, so each rule's `ports` gets the gateway's real
listener ports next to 443 and 80; the service judges the port the gateway
listened on, exactly as it would judge 443 in a mesh.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

POLICY_PACKAGE_DIR = "policies"  # under authz/demo
DEFAULT_RULE_PORTS = (443,)  # the README's default for `rules[].ports`


class PolicyCopyError(RuntimeError):
    pass


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings (the ConfigMap's policy.yaml) as `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str)


def source_files() -> list[Traversable]:
    found = sorted(
        (f for f in files("authz.demo").joinpath(POLICY_PACKAGE_DIR).iterdir()
         if f.name.endswith(".yaml")),
        key=lambda f: f.name,
    )
    if not found:
        raise PolicyCopyError("no demo policies in the package (authz/demo/policies)")
    return found


def policy_sources() -> list[str]:
    """The policy files, as people can find them, for the demo's narration."""
    return [_shown(f) for f in source_files()]


def _shown(source: Traversable) -> str:
    return f"authz/demo/{POLICY_PACKAGE_DIR}/{source.name}"


def write_policies(target: Path, port_aliases: dict[int, int]) -> list[Path]:
    """Copy every policy file into `target`; `port_aliases` maps a mesh port
    (443) to the loopback port that stands for it. Returns the files written."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in source_files():
        text = src.read_text(encoding="utf-8")
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        for doc in docs:
            _alias_ports(doc, port_aliases, src)
        header = _leading_comments(text)
        aliases = ", ".join(f"{mesh} -> {real}" for mesh, real in port_aliases.items())
        header += [
            "#",
            f"# Copied from {_shown(src)} by `egress-authz demo`; edit it and the",
            "# service reloads it. The loopback gateway listens on unprivileged ports, so",
            f"# rules list them next to the mesh ports they stand for ({aliases}):",
            "# a rule you add needs them too.",
        ]
        body = yaml.dump_all(docs, Dumper=_LiteralDumper, sort_keys=False)
        out = target / src.name
        out.write_text("\n".join(header) + "\n" + body)
        written.append(out)
    return written


def _leading_comments(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def _alias_ports(doc: Any, aliases: dict[int, int], src: Traversable) -> None:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("policy.yaml"), str):
        return
    try:
        policy = yaml.safe_load(data["policy.yaml"])
    except yaml.YAMLError as e:
        raise PolicyCopyError(f"{_shown(src)}: policy.yaml is not YAML: {e}") from e
    if not isinstance(policy, dict):
        return
    # Rules are validated by the service; here only the ports are touched,
    # and only when they have the shape the service accepts.
    for rule in policy.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        ports = rule.get("ports", list(DEFAULT_RULE_PORTS))
        if not isinstance(ports, list):
            continue
        extra = [aliases[p] for p in ports if p in aliases and aliases[p] not in ports]
        rule["ports"] = [*ports, *extra]
    data["policy.yaml"] = yaml.dump(
        policy, Dumper=_LiteralDumper, sort_keys=False, default_flow_style=None
    )
