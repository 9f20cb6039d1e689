"""The demo's policy directory: the package's copies of istio/examples/ plus
the demo's audit namespace (authz/demo/policies/, package data, so that the
demo runs from an installed wheel; a test keeps the copies equal to
istio/examples/).

The files are copied, not referenced, so that a user can edit them while the
demo runs (`serve` reloads the directory) without touching the package.
They are copied unchanged: the loopback gateway listens on unprivileged ports,
as istioctl's egress gateway does (8443 behind Service port 443), and `serve
--gateway-port-map` turns the listener ports back into 443 and 80, so rules,
traces and suggestions name the ports an application dials.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

POLICY_PACKAGE_DIR = "policies"  # under authz/demo


class PolicyCopyError(RuntimeError):
    pass


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


def write_policies(target: Path) -> list[Path]:
    """Copy every policy file into `target`. Returns the files written."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in source_files():
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        comments = len(_leading_comments(lines))
        note = ["#\n", f"# Copied from {_shown(src)} by `egress-authz demo`; edit it and the\n",
                "# service reloads it.\n"]
        out = target / src.name
        out.write_text("".join([*lines[:comments], *note, *lines[comments:]]))
        written.append(out)
    return written


def _leading_comments(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        out.append(line)
    return out
