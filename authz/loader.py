"""Policy ConfigMaps from files: a file, or a directory of YAML files.

Accepts what people have at hand: single ConfigMaps, multi-document files,
and `kind: List` dumps from `kubectl get configmaps -o yaml`. Each ConfigMap
is validated on its own, so one broken ConfigMap never hides the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .echo import shown
from .hosts import DEFAULT_CLUSTER_DOMAIN
from .model import POLICY_DATA_KEY, POLICY_LABEL, ConfigMapRef, NamespacePolicy, PolicySet
from .policy import PolicyError, configmap_ref, is_policy_configmap, parse_configmap
from .yamlload import FILE_LIMITS, YamlError, load_all

YAML_SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_CLUSTER_NAMESPACE = "egress-authz"


@dataclass
class LoadResult:
    policies: list[NamespacePolicy] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # errors: each names file and location
    warnings: list[str] = field(default_factory=list)
    # Per-ConfigMap outcome, for sources that keep the last good version:
    # ref -> the policy, or the PolicyError that rejected it.
    by_ref: dict[ConfigMapRef, NamespacePolicy | PolicyError] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    documents: int = 0  # YAML documents read, of any kind: 0 means empty files
    # ConfigMaps that look meant as policies but are not read (their label is
    # wrong): `lint` must not call a directory of them clean.
    ignored: list[ConfigMapRef] = field(default_factory=list)


def is_policy_file_name(name: str) -> bool:
    """Whether a directory entry is a file to read: YAML or JSON by suffix, and none of
    what editors and the kubelet leave beside real files. Hidden names cover vim's
    `.x.swp` and emacs' `.#x`, and a mounted ConfigMap's `..data/` and
    `..<timestamp>/` (each key is read once, through its top-level link)."""
    return (
        name.endswith(YAML_SUFFIXES)
        and not name.startswith((".", "#"))
        and not name.endswith("~")
    )


def policy_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and is_policy_file_name(p.name)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    return [path]


def _documents(text: str) -> Iterator[Any]:
    for doc in load_all(text, FILE_LIMITS):
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items") or []
            yield from items if isinstance(items, list) else [items]
        elif doc is not None:
            yield doc


def _why_ignored(obj: dict[str, Any]) -> str | None:
    """Why a ConfigMap that looks meant as a policy is not read, or None."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    label = labels.get(POLICY_LABEL) if isinstance(labels, dict) else None
    if label is True:
        return (
            f"has the label {POLICY_LABEL}, but as the YAML boolean true: it must be "
            f'the string "true" (quote it: {POLICY_LABEL}: "true")'
        )
    if label is not None:
        return f'has the label {POLICY_LABEL}: {shown(label, limit=40)}, which must be "true"'
    data = obj.get("data")
    if isinstance(data, dict) and POLICY_DATA_KEY in data:
        return f'has a {POLICY_DATA_KEY} key but not the label {POLICY_LABEL}: "true"'
    return None


def _file_position(
    text: str, ref: ConfigMapRef, mark: tuple[int, int, str]
) -> tuple[int, int] | None:
    """1-based (line, column) in the file of a position inside the policy.yaml
    block of ConfigMap `ref`; None unless it is a literal block (`|`), the only
    style whose lines are the file's lines."""
    try:
        docs = list(yaml.compose_all(text))
    except yaml.YAMLError:
        return None
    for doc in docs:
        for cm in _configmap_nodes(doc):
            meta, data = _child(cm, "metadata"), _child(cm, "data")
            names = (_scalar(_child(meta, "namespace")) or "default", _scalar(_child(meta, "name")))
            block = _child(data, POLICY_DATA_KEY)
            if names != (ref.namespace, ref.name) or not isinstance(block, yaml.ScalarNode):
                continue
            if block.style != "|":
                return None
            first = block.start_mark.line + 1  # content starts below the `|` line
            lines = text.splitlines()
            indent = next(
                (len(ln) - len(ln.lstrip(" ")) for ln in lines[first:] if ln.strip()), 0
            )
            return first + mark[0] + 1, indent + mark[1] + 1
    return None


def _configmap_nodes(doc: Any) -> list[yaml.MappingNode]:
    if not isinstance(doc, yaml.MappingNode):
        return []
    if _scalar(_child(doc, "kind")) == "List":
        items = _child(doc, "items")
        return [n for n in items.value if isinstance(n, yaml.MappingNode)] if isinstance(
            items, yaml.SequenceNode
        ) else []
    return [doc]


def _child(node: Any, key: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _scalar(node: Any) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def load_objects(
    objects: Iterable[Any],
    origin: str,
    result: LoadResult,
    *,
    cluster_namespace: str,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    text: str | None = None,
) -> None:
    """Validate ConfigMap dicts into `result`; `origin` names where they came
    from, `text` (the file, when there is one) lets YAML errors name its lines."""
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("kind") != "ConfigMap":
            continue
        ref = configmap_ref(obj)
        if not isinstance(obj.get("metadata"), dict):
            result.problems.append(
                f"{origin}: a ConfigMap's metadata must be a map with name, namespace and "
                f"labels, not {shown(obj.get('metadata'))}"
            )
            continue
        if not is_policy_configmap(obj):
            if (why := _why_ignored(obj)) is not None:
                result.warnings.append(f"{origin}: {ref} {why}; it is ignored")
                result.ignored.append(ref)
            continue
        if ref in result.by_ref:
            result.problems.append(f"{origin}: {ref} is defined more than once")
            continue
        try:
            policy = parse_configmap(obj, cluster_namespace=cluster_namespace,
                                     cluster_domain=cluster_domain)
        except PolicyError as e:
            result.by_ref[ref] = e
            if e.yaml_mark is not None and text is not None and (
                at := _file_position(text, ref, e.yaml_mark)
            ):
                # Lines relative to the embedded block help nobody: name the file's.
                result.problems.append(
                    f"{origin}:{at[0]}:{at[1]}: {ref} {POLICY_DATA_KEY}: bad YAML: {e.yaml_mark[2]}"
                )
            else:
                result.problems.extend(f"{origin}: {line}" for line in e.problems)
            continue
        result.by_ref[ref] = policy
        result.policies.append(policy)


def load_path(
    path: str | Path, *, cluster_namespace: str = DEFAULT_CLUSTER_NAMESPACE,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
) -> LoadResult:
    """Every policy ConfigMap under `path`, with every problem found."""
    root = Path(path)
    result = LoadResult()
    if not root.exists():
        result.problems.append(f"{root}: no such file or directory")
        return result
    for file in policy_files(root):
        result.files.append(file)
        try:
            with file.open("rb") as stream:  # never read more than the limit
                raw = stream.read(FILE_LIMITS.max_bytes + 1)
            if len(raw) > FILE_LIMITS.max_bytes:
                raise YamlError(f"file is over the limit of {FILE_LIMITS.max_bytes} bytes")
            text = raw.decode("utf-8")
            docs = list(_documents(text))
            result.documents += len(docs)
        except (OSError, UnicodeDecodeError) as e:
            result.problems.append(f"{file}: cannot read: {shown(str(e), quote=False)}")
            continue
        except YamlError as e:
            at = f":{e.line}:{e.column}" if e.line is not None else ""
            result.problems.append(f"{file}{at}: bad YAML: {e.problem}")
            continue
        load_objects(docs, str(file), result, cluster_namespace=cluster_namespace,
                     cluster_domain=cluster_domain, text=text)
    return result


def build_policy_set(policies: Iterable[NamespacePolicy], revision: int = 0) -> PolicySet:
    ordered = sorted(policies, key=lambda p: (p.tier.value, p.source.namespace, p.source.name))
    return PolicySet(tuple(ordered), revision=revision)
