"""Reading what users hand the importer: files, directories, `kubectl get -o yaml` dumps.

Source files come from another system and are treated as hostile: each is
bounded in size before it is parsed, YAML is parsed safely, and `List`
dumps are flattened one level, as `kubectl get -o yaml` writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .common import ImportError_

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_FILES = 10_000
DOCUMENT_SUFFIXES = (".yaml", ".yml", ".json")

_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Document:
    origin: str  # file name, with the document index in multi-document files
    obj: Any


def files_under(paths: list[str], suffixes: tuple[str, ...] | None) -> list[Path]:
    """Every file named, and under every directory named (dot-names skipped)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ImportError_(f"{raw}: no such file or directory")
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and (suffixes is None or p.suffix in suffixes)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            out.extend(found)
        else:
            out.append(path)
        if len(out) > MAX_FILES:
            raise ImportError_(f"more than {MAX_FILES} files under {', '.join(paths)}")
    return out


def read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImportError_(f"{path}: {size} bytes, over the {MAX_FILE_BYTES} byte limit")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ImportError_(f"{path}: cannot read: {e}") from e


def documents(paths: list[str]) -> Iterator[Document]:
    """Every object in the YAML/JSON files under `paths`, List items flattened."""
    for path in files_under(paths, DOCUMENT_SUFFIXES):
        text = read_text(path)
        try:
            if path.suffix == ".json":
                docs: list[Any] = [json.loads(text)]
            else:
                docs = list(yaml.load_all(text, Loader=_SafeLoader))  # SafeLoader: safe
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ImportError_(f"{path}: not valid YAML/JSON: {str(e).splitlines()[0]}") from e
        for i, doc in enumerate(docs):
            origin = str(path) if len(docs) == 1 else f"{path}#{i}"
            if (isinstance(doc, dict) and doc.get("kind") == "List") or (
                isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List")
                and isinstance(doc.get("items"), list)
            ):
                for j, item in enumerate(doc.get("items") or []):
                    yield Document(f"{origin} items[{j}]", item)
            elif doc is not None:
                yield Document(origin, doc)
