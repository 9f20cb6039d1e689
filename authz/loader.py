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

from .echo import shown
from .model import POLICY_DATA_KEY, ConfigMapRef, NamespacePolicy, PolicySet
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


def load_objects(
    objects: Iterable[Any], origin: str, result: LoadResult, *, cluster_namespace: str
) -> None:
    """Validate ConfigMap dicts into `result`; `origin` names where they came from."""
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
            data = obj.get("data")
            if isinstance(data, dict) and POLICY_DATA_KEY in data:
                result.warnings.append(
                    f"{origin}: {ref} has a {POLICY_DATA_KEY} key but not the label "
                    f'egress-authz.io/policy: "true"; it is ignored'
                )
            continue
        if ref in result.by_ref:
            result.problems.append(f"{origin}: {ref} is defined more than once")
            continue
        try:
            policy = parse_configmap(obj, cluster_namespace=cluster_namespace)
        except PolicyError as e:
            result.by_ref[ref] = e
            result.problems.extend(f"{origin}: {line}" for line in e.problems)
            continue
        result.by_ref[ref] = policy
        result.policies.append(policy)


def load_path(
    path: str | Path, *, cluster_namespace: str = DEFAULT_CLUSTER_NAMESPACE
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
            docs = list(_documents(raw.decode("utf-8")))
            result.documents += len(docs)
        except (OSError, UnicodeDecodeError) as e:
            result.problems.append(f"{file}: cannot read: {shown(str(e), quote=False)}")
            continue
        except YamlError as e:
            at = f":{e.line}:{e.column}" if e.line is not None else ""
            result.problems.append(f"{file}{at}: bad YAML: {e.problem}")
            continue
        load_objects(docs, str(file), result, cluster_namespace=cluster_namespace)
    return result


def build_policy_set(policies: Iterable[NamespacePolicy], revision: int = 0) -> PolicySet:
    ordered = sorted(policies, key=lambda p: (p.tier.value, p.source.namespace, p.source.name))
    return PolicySet(tuple(ordered), revision=revision)
