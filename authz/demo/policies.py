"""The demo's policy directory: istio/examples/ plus the demo's audit namespace.

The files are copied, not referenced, so that a user can edit them while the
demo runs (`serve` reloads the directory) without touching the repository.
One change is made on the way: the loopback gateway cannot listen on ports
443 and 80 without root, so each rule's `ports` gets the gateway's real
listener ports next to 443 and 80; the service judges the port the gateway
listened on, exactly as it would judge 443 in a mesh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..yamlload import FILE_LIMITS, POLICY_LIMITS, YamlError, load_all, load_one

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO / "istio" / "examples"
DEMO_POLICY_DIR = Path(__file__).resolve().parent / "policies"
DEFAULT_RULE_PORTS = (443,)  # the README's default for `rules[].ports`


class PolicyCopyError(RuntimeError):
    pass


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings (the ConfigMap's policy.yaml) as `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str)


def source_files() -> list[Path]:
    files = sorted(EXAMPLES_DIR.glob("*.yaml")) + sorted(DEMO_POLICY_DIR.glob("*.yaml"))
    if not files:
        raise PolicyCopyError(f"no example policies under {EXAMPLES_DIR}")
    return files


def policy_sources() -> list[Path]:
    """The policy files, relative to the repository, for people to read."""
    return [_shown(f) for f in source_files()]


def _shown(path: Path) -> Path:
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def write_policies(target: Path, port_aliases: dict[int, int]) -> list[Path]:
    """Copy every policy file into `target`; `port_aliases` maps a mesh port
    (443) to the loopback port that stands for it. Returns the files written."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in source_files():
        text = src.read_text()
        docs = [d for d in load_all(text, FILE_LIMITS) if d is not None]
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


def _alias_ports(doc: Any, aliases: dict[int, int], src: Path) -> None:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("policy.yaml"), str):
        return
    try:
        policy = load_one(data["policy.yaml"], POLICY_LIMITS)
    except YamlError as e:
        raise PolicyCopyError(f"{src}: policy.yaml is not YAML: {e}") from e
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
