"""The one YAML loader: every policy document, policy file and Pod file goes through here.

YAML written by namespace owners is hostile input. Before anything is built,
the event stream is checked against limits (size, nesting depth, number of
values), with aliases counted as the subtrees they repeat: an alias repeats a
subtree by reference, so a few hundred bytes can stand for billions of values
(the "billion laughs" bomb). Anchors themselves stay allowed, because YAML
dumpers emit them for shared values (PyYAML's `&id001`). Only then is the
document constructed, with two policy-friendly changes to safe YAML:
timestamps stay strings, and a key given twice in one map is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .echo import shown

# libyaml's parser is ~10x faster than PyYAML's pure-Python one: 1,000
# namespaces of policy load in a second rather than ten.
_SafeBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class YamlLimits:
    """Bounds checked before a YAML stream is turned into Python values."""

    max_bytes: int
    """Largest accepted text, in UTF-8 bytes."""
    max_depth: int
    """Deepest nesting of lists and maps."""
    max_nodes: int
    """Most values (scalars, lists, maps) in the whole stream."""


# One policy.yaml. The API server caps a whole ConfigMap at 1 MiB; a real
# policy is a few KiB and nests 7 levels deep (rules[].workloads
# .matchExpressions[].values[]).
POLICY_LIMITS = YamlLimits(max_bytes=1 << 20, max_depth=32, max_nodes=100_000)
# A file of manifests on disk: a ConfigMap, a `kubectl get configmaps -o yaml`
# List, or a `kubectl get pods -o yaml` dump for --workloads (Pods with
# managedFields nest ~20 deep and hold a few hundred values each).
FILE_LIMITS = YamlLimits(max_bytes=64 << 20, max_depth=64, max_nodes=2_000_000)


class YamlError(ValueError):
    """YAML that is malformed or over a limit; `problem` is one sentence."""

    def __init__(self, problem: str, line: int | None = None, column: int | None = None) -> None:
        self.problem = problem
        self.line = line  # 1-based, when known
        self.column = column
        super().__init__(f"{problem}{self.where}")

    @property
    def where(self) -> str:
        """' at line L, column C', or '' when the position is unknown."""
        if self.line is None:
            return ""
        return f" at line {self.line}, column {self.column}"


class _Loader(_SafeBase):  # type: ignore[valid-type,misc]
    """Safe YAML; timestamps stay strings (we parse `expires` ourselves, with a clear
    error) and a duplicated key is an error instead of the last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):  # compare the key as written
                key = key_node.value
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice in one map",
                        key_node.start_mark,
                    )
                seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


# The longest integer literal converted. Ports and counts need a few digits; a
# long literal is an attack: YAML 1.1's base-60 form (`1:30:30...`) costs
# quadratic big-integer work holding the GIL (32 s for one 1 MiB value), and hex,
# octal and binary escape Python's 4,300-digit guard, then break every str().
MAX_INT_CHARS = 100


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> Any:
    text = node.value
    if isinstance(text, str) and len(text) > MAX_INT_CHARS:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(text)} characters, over the limit of "
            f"{MAX_INT_CHARS}", node.start_mark,
        )
    return _SafeBase.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)

_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _SafeBase.yaml_implicit_resolvers.items()
}

_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def _mark_error(problem: str, mark: Any) -> YamlError:
    if mark is None:
        return YamlError(problem)
    return YamlError(problem, mark.line + 1, mark.column + 1)


def _check(text: str, limits: YamlLimits) -> None:
    """Walk the event stream once; raise YamlError at the first limit crossed.

    Aliases are counted as what they stand for: each anchor remembers the
    size and height of its subtree, and an alias adds them, so the limits
    hold for the document as expanded while nothing is built (the "billion
    laughs" bomb is refused at the first alias that crosses the value limit).
    Streaming keeps this bounded: it stops at the first offence.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise YamlError(f"document is {size} bytes, over the limit of {limits.max_bytes}")
    loader = _Loader(text)
    # Open collections: [anchor, values before it, its depth, deepest depth inside].
    frames: list[list[Any]] = []
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, height)
    depth = nodes = 0

    def deeper(reached: int, mark: Any) -> None:
        if reached > limits.max_depth:
            raise _mark_error(f"nesting is deeper than {limits.max_depth} levels"
                              + (" once aliases are expanded" if anchors else ""), mark)
        if frames and reached > frames[-1][3]:
            frames[-1][3] = reached

    try:
        while loader.check_event():
            event = loader.get_event()
            mark = event.start_mark
            if isinstance(event, yaml.AliasEvent):
                if event.anchor not in anchors:
                    raise _mark_error(f"alias *{shown(event.anchor, quote=False)} has no "
                                      "anchor before it", mark)
                values, height = anchors[event.anchor]
                nodes += values
                deeper(depth + height, mark)
            elif isinstance(event, _OPEN):
                nodes += 1
                depth += 1
                frames.append([event.anchor, nodes, depth, depth])
                deeper(depth, mark)
            elif isinstance(event, _CLOSE):
                anchor, before, opened, deepest = frames.pop()
                if anchor is not None:
                    anchors[anchor] = (nodes - before + 1, deepest - opened + 1)
                if frames and deepest > frames[-1][3]:
                    frames[-1][3] = deepest
                depth -= 1
                continue
            elif isinstance(event, yaml.ScalarEvent):
                nodes += 1
                if event.anchor is not None:
                    anchors[event.anchor] = (1, 0)
            else:
                continue  # stream and document boundaries
            if nodes > limits.max_nodes:
                raise _mark_error(
                    f"document holds more than {limits.max_nodes} values"
                    + (" once its aliases are expanded" if anchors else ""), mark)
    except yaml.YAMLError as e:
        raise _yaml_error(e) from e
    finally:
        loader.dispose()


def _yaml_error(e: yaml.YAMLError) -> YamlError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return _mark_error(shown(problem, limit=200, quote=False), mark)


def load_all(text: str, limits: YamlLimits) -> list[Any]:
    """Every document of a YAML stream (empty ones included, as None); raises YamlError."""
    _check(text, limits)
    loader = _Loader(text)
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as e:
        raise _yaml_error(e) from e
    except (ValueError, OverflowError) as e:  # e.g. an integer of 5,000 digits
        raise YamlError(f"a value cannot be read: {shown(str(e), limit=120, quote=False)}") from e
    finally:
        loader.dispose()


def load_one(text: str, limits: YamlLimits) -> Any:
    """The single document of `text` (None when empty); raises YamlError."""
    docs = load_all(text, limits)
    if len(docs) > 1:
        raise YamlError(f"expected one YAML document, found {len(docs)} (remove the '---')")
    return docs[0] if docs else None
