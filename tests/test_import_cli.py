"""`egress-authz import`: output, report, exit status, and hostile input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.cli import main
from authz.importers import SOURCES
from tests.import_helpers import import_objects

EXACT = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: shop-egress, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: cart}}
  egress:
  - toFQDNs: [{matchName: api.kadath.io}, {matchPattern: "**.leng.com"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""
LOSSY = EXACT.replace('{matchPattern: "**.leng.com"}', '{matchPattern: "*.leng.com"}')


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["import", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


class TestCommand:
    def test_exact_import_exits_0_and_lint_accepts_the_output(self, tmp_path, capsys) -> None:
        """Everything exact: exit 0, ConfigMaps on stdout that `lint` accepts, report on stderr."""
        src = tmp_path / "cnp.yaml"
        src.write_text(EXACT)
        code, out, err = run(capsys, "--from", "cilium", str(src))
        assert code == 0, err
        assert "2 exact, 0 narrower, 0 not translatable; 1 ConfigMap(s)" in err
        (tmp_path / "out.yaml").write_text(out)
        assert main(["lint", str(tmp_path / "out.yaml")]) == 0
        docs = [d for d in yaml.safe_load_all(out) if d]
        assert docs[0]["metadata"]["namespace"] == "shop"
        policy = docs[0]["data"]["policy.yaml"]
        assert "# exact: shop/shop-egress egress[0] toFQDNs[0]" in policy

    def test_anything_dropped_exits_1_and_is_commented(self, tmp_path, capsys) -> None:
        """A dropped element: exit 1, listed on stderr and as a comment in the policy."""
        src = tmp_path / "cnp.yaml"
        src.write_text(LOSSY)
        code, out, err = run(capsys, "--from", "cilium", str(src))
        assert code == 1
        assert 'not-translatable  shop/shop-egress egress[0] toFQDNs[1] matchPattern "*.leng.com"' in err
        assert "# not-translatable: shop/shop-egress egress[0] toFQDNs[1]" in out

    def test_json_output_and_audit_mode(self, tmp_path, capsys) -> None:
        """-o json (any case) prints a List; --mode audit writes the mode into namespace policies."""
        src = tmp_path / "cnp.yaml"
        src.write_text(EXACT)
        code, out, _ = run(capsys, "--from", "CILIUM", str(src), "-o", "JSON",
                           "--mode", "audit")
        assert code == 0
        listed = json.loads(out)
        assert listed["kind"] == "List"
        assert "mode: audit" in listed["items"][0]["data"]["policy.yaml"]

    def test_unreadable_input_exits_2(self, tmp_path, capsys) -> None:
        """A missing path or broken YAML: exit 2 and one clear line, no traceback."""
        code, out, err = run(capsys, "--from", "gke", str(tmp_path / "missing.yaml"))
        assert code == 2 and not out and "no such file" in err
        bad = tmp_path / "bad.yaml"
        bad.write_text("kind: [unclosed\n")
        code, out, err = run(capsys, "--from", "gke", str(bad))
        assert code == 2 and "not valid YAML" in err

    def test_oversized_file_is_refused_before_parsing(self, tmp_path, capsys, monkeypatch) -> None:
        """A file over the size limit is refused without being read."""
        import authz.importers.inputs as inputs

        monkeypatch.setattr(inputs, "MAX_FILE_BYTES", 100)
        big = tmp_path / "big.yaml"
        big.write_text("# " + "x" * 200 + "\n")
        code, _, err = run(capsys, "--from", "cilium", str(big))
        assert code == 2 and "byte limit" in err

    def test_directories_and_list_dumps(self, tmp_path, capsys) -> None:
        """A directory of files and a `kubectl get -o yaml` List are both read."""
        (tmp_path / "d").mkdir()
        item = yaml.safe_load(EXACT)
        (tmp_path / "d" / "list.yaml").write_text(
            yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [item]}))
        code, out, _ = run(capsys, "--from", "cilium", str(tmp_path / "d"))
        assert code == 0 and "import-cilium-shop-egress" in out


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from([
        "kind", "spec", "metadata", "egress", "toFQDNs", "matchName", "matchPattern", "toPorts",
        "ports", "port", "endPort", "protocol", "podSelector", "matches", "name", "pattern",
        "subject", "namespaces", "priority", "action", "to", "domainNames", "hosts", "exportTo",
        "RulesSourceList", "Targets", "TargetTypes", "GeneratedRulesType", "matchLabels",
        "endpointSelector", "portNumber", "portRange", "start", "end", "number", "fqdns"]),
        children, max_size=5),
    max_leaves=25,
)
kinds = st.sampled_from(["CiliumNetworkPolicy", "FQDNNetworkPolicy", "AdminNetworkPolicy",
                         "ServiceEntry", "Namespace", None])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SOURCES)), kinds, junk)
def test_hostile_objects_never_crash_and_always_lint(source, kind, body) -> None:
    """Any shape of source object yields a report and policies that validate, never a crash."""
    obj = {"kind": kind, "metadata": {"name": "x", "namespace": "shop"}, "spec": body} \
        if kind else body
    if source == "squid":
        files = {"squid.conf": f"acl a dstdomain {json.dumps(body)[:200]}\nhttp_access allow a\n"}
    elif source == "aws-nfw":
        files = {"g.json": json.dumps({"RulesSourceList": body})}
    else:
        files = {"o.yaml": yaml.safe_dump(obj)}
    result = import_objects(source, files, namespace="shop")  # build() validates what it writes
    assert all(cm["kind"] == "ConfigMap" for cm in result.configmaps)


def test_every_source_is_a_choice_of_the_command(capsys) -> None:
    """`--from` offers exactly the importers that exist."""
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    help_text = capsys.readouterr().out
    for source in SOURCES:
        assert source in help_text
        assert Path(__file__).parent.parent.joinpath(
            "authz", "importers", f"{SOURCES[source]}.py").exists()


def test_non_string_label_keys_are_refused_not_crashed() -> None:
    """Numbers as label keys or values in a selector are reported, never a traceback."""
    text = EXACT.replace("{app: cart}", "{1: 2, app: {x: y}}")
    result = import_objects("cilium", {"p.yaml": text})
    assert not result.configmaps
    assert {n.outcome.value for n in result.notes} == {"not-translatable"}


def test_names_from_the_source_become_valid_kubernetes_names() -> None:
    """Odd policy names give valid ConfigMap names; an invalid namespace drops its rules."""
    text = EXACT.replace("name: shop-egress", "name: Shop..Egress_v2.-x").replace(
        "namespace: shop", "namespace: shop")
    result = import_objects("cilium", {"p.yaml": text})
    (cm,) = result.configmaps
    assert cm["metadata"]["name"] == "import-cilium-shop-egress-v2-x"
    odd = import_objects("cilium", {"p.yaml": EXACT.replace("namespace: shop", "namespace: Shop_1")})
    assert not odd.configmaps
    assert all("is not a valid name" in n.reason for n in odd.notes)
