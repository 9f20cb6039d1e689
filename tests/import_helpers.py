"""Shared by the importer tests: run an import, judge a request with our engine, lint the output."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from hypothesis import strategies as st

from authz.cli import main as cli_main
from authz.engine import compile_policy, decide
from authz.importers import Options, translate
from authz.importers.emit import ImportResult, build
from authz.loader import build_policy_set
from authz.model import Destination, Identity, Protocol, Verdict, Workload
from authz.policy import parse_configmap

CLUSTER_NS = "egress-authz"

# A small world, so that generated policies and requests collide often.
SUFFIXES = ("kadath.io", "leng.com")
LABELS = ("a", "api", "b-2")
hostnames = st.builds(
    lambda prefix, suffix: ".".join([*prefix, suffix]),
    st.lists(st.sampled_from(LABELS), min_size=0, max_size=3),
    st.sampled_from(SUFFIXES),
)
ports = st.sampled_from((80, 443, 8080, 8443))


def import_objects(
    source: str, files: dict[str, str], *, namespace: str | None = None
) -> ImportResult:
    """Write `files` (name -> text) to a temporary directory and import them."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        translation = translate(
            source, [tmp], Options(namespace=namespace, cluster_namespace=CLUSTER_NS)
        )
        return build(translation, source=source, origin="test", cluster_namespace=CLUSTER_NS)


def dump(*objects: Any) -> str:
    return yaml.safe_dump_all(list(objects))


class Judge:
    """Our engine over the imported ConfigMaps."""

    def __init__(self, result: ImportResult) -> None:
        policies = [parse_configmap(cm, cluster_namespace=CLUSTER_NS) for cm in result.configmaps]
        self.snapshot = compile_policy(build_policy_set(policies))

    def allows(
        self,
        host: str,
        port: int,
        protocol: str = "TLS",
        *,
        namespace: str = "shop",
        labels: dict[str, str] | None = None,
        account: str = "default",
        method: str = "GET",
    ) -> bool:
        workload = Workload(namespace, account, MappingProxyType(labels or {}), "pod", "10.0.0.9")
        who = Identity(f"spiffe://cluster.local/ns/{namespace}/sa/{account}", "10.0.0.9", workload)
        if protocol == "TLS":
            where = Destination(port, Protocol.TLS, sni=host)
        else:
            where = Destination(
                port, Protocol.HTTP, http_host=f"{host}:{port}", method=method, path="/"
            )
        return decide(self.snapshot, who, where).verdict is Verdict.ALLOW


def lint_output(result: ImportResult, tmp_path: Path, capsys: Any) -> dict[str, Any]:
    """Run `egress-authz lint` on what the import printed; return its JSON."""
    out = tmp_path / "imported.yaml"
    out.write_text("---\n".join(yaml.safe_dump(cm) for cm in result.configmaps))
    capsys.readouterr()
    code = cli_main(["lint", str(out), "--output", "json"])
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 0, report
    return report


def outcomes(result: ImportResult) -> dict[str, str]:
    """element -> outcome, for table tests."""
    return {n.element: n.outcome.value for n in result.notes}


def outcome_of(result: ImportResult, fragment: str) -> str:
    found = [n.outcome.value for n in result.notes if fragment in n.element]
    assert len(found) == 1, (fragment, outcomes(result))
    return found[0]


def near(values: list[str]) -> st.SearchStrategy[str]:
    """Host names close to the ones a source names: each value (without its `*.` or `.`),
    a name one or two labels below it, or any name of the small world."""
    bases = sorted({v.lstrip("*").lstrip(".").lower() for v in values if v.strip("*.")})
    if not bases:
        return hostnames
    return st.one_of(
        hostnames,
        st.sampled_from(bases),
        st.builds(lambda p, b: f"{p}.{b}", st.sampled_from(LABELS), st.sampled_from(bases)),
        st.builds(lambda p, b: f"a.{p}.{b}", st.sampled_from(LABELS), st.sampled_from(bases)),
    )
