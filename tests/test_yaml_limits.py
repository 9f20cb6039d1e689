"""Hostile YAML from namespace owners: alias bombs, depth, size, rule counts, giant values.

The alias-bomb tests run the parser in a child process with a memory cap and a
time limit, so a regression fails the test instead of hanging or swapping CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.loader import load_path
from authz.policy import PolicyError, parse_configmap
from authz.sources import load_pod_file

CLUSTER_NS = "egress-authz"
CHILD_TIMEOUT = 30.0  # seconds: generous for a loaded CI machine; the fix needs well under 1
CHILD_MEMORY = 1 << 30  # bytes of address space for the child: the bomb wants many GiB


def bomb(depth: int = 9, at: str = "mode") -> str:
    """The issue's billion-laughs policy: 9 anchors, each a list of 9 aliases of the last."""
    lines = ['a: &a ["egress-egress","egress-egress","egress-egress","egress-egress",'
             '"egress-egress","egress-egress","egress-egress","egress-egress","egress-egress"]']
    prev = "a"
    for name in "bcdefghijklmnop"[: depth - 1]:
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    if at == "mode":
        lines.append(f"mode: *{prev}")
    else:  # inside a rule, where ports echo what they reject
        lines.append(f"rules: [{{name: r, hosts: [a.example], ports: *{prev}}}]")
    return "\n".join(lines) + "\n"


def configmap(body: str, *, namespace: str = "shop", name: str = "p") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"egress-authz.io/policy": "true"}},
            "data": {"policy.yaml": body}}


def yl() -> Any:
    """authz.yamlload, imported late so that the attack tests above run (and fail) on code
    that predates it."""
    import authz.yamlload

    return authz.yamlload


def problems(body: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_configmap(configmap(body), cluster_namespace=CLUSTER_NS)
    return info.value.problems


def run_bounded(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child with CHILD_MEMORY of address space and CHILD_TIMEOUT."""
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY}))
    """)
    try:
        return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the parser ran over {CHILD_TIMEOUT} s on the bomb")


class TestAliasBomb:
    @pytest.mark.parametrize("at", ["mode", "ports"])
    def test_policy_bomb_refused_fast_and_small(self, at: str) -> None:
        """A 9-deep alias bomb in policy.yaml is refused in well under a second of parsing,
        in bounded memory, with a message that names aliases and stays short."""
        text = bomb(at=at)
        assert len(text.encode()) < 600
        done = run_bounded(f"""
            import json, time
            from authz.policy import PolicyError, parse_configmap
            cm = {json.dumps(configmap(text))}
            start = time.monotonic()
            try:
                parse_configmap(cm, cluster_namespace="egress-authz")
            except PolicyError as e:
                print(json.dumps({{"problems": e.problems, "took": time.monotonic() - start}}))
            else:
                print(json.dumps({{"problems": [], "took": 0}}))
        """)
        assert done.returncode == 0, done.stderr[-2000:]
        out = json.loads(done.stdout)
        assert out["took"] < 1.0
        assert len(out["problems"]) == 1
        assert "alias" in out["problems"][0] and "shop/p" in out["problems"][0]
        assert len(out["problems"][0]) < 300

    def test_file_bomb_refused_by_lint(self, tmp_path: Path) -> None:
        """`egress-authz lint` on a file whose manifest (not policy.yaml) holds the bomb
        exits with its policy-error code quickly, with a located error, and keeps checking
        the file's neighbours."""
        (tmp_path / "a-bomb.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: shop}\n"
            + "\n".join(f"# {line}" for line in ["filler"]) + "\n"
            + "extra:\n" + textwrap.indent(bomb(), "  "))
        (tmp_path / "b-good.yaml").write_text(yaml.safe_dump(configmap(
            "rules: [{name: r, hosts: [a.example]}]", namespace="ok")))
        done = run_bounded(f"""
            import sys
            from authz.cli import main
            sys.exit(main(["lint", {str(tmp_path)!r}]))
        """)
        from authz.commands import exits

        assert done.returncode == exits.USAGE, done.stderr[-2000:]  # lint: policy errors
        assert "a-bomb.yaml" in done.stdout + done.stderr
        assert "alias" in done.stdout + done.stderr
        assert "2 file(s), 1 policy ConfigMap(s)" in done.stderr
        assert len(done.stdout + done.stderr) < 1500

    def test_lint_reads_every_file_through_the_limits(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every pass of `lint` over a file (the fence check reads Namespaces and
        NetworkPolicies too) goes through the limited loader: a hostile file is an
        error naming it, never a traceback or a long stall."""
        from authz.cli import main
        from authz.commands import exits

        # 50,000 levels: a RecursionError in a parser without the depth limit.
        (tmp_path / "hostile.yaml").write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
        (tmp_path / "good.yaml").write_text(yaml.safe_dump(configmap(
            "rules: [{name: r, hosts: [a.example]}]", namespace="ok")))
        assert main(["lint", str(tmp_path)]) == exits.USAGE
        err = capsys.readouterr()
        assert "hostile.yaml" in err.out + err.err
        assert "Traceback" not in err.out + err.err

    def test_workloads_bomb_refused(self, tmp_path: Path) -> None:
        """A --workloads Pod file with an alias bomb is refused, not expanded."""
        path = tmp_path / "pods.yaml"
        path.write_text("kind: Pod\nmetadata: {name: x}\nextra:\n" + textwrap.indent(bomb(), "  "))
        done = run_bounded(f"""
            from pathlib import Path
            from authz.sources import load_pod_file
            from authz.yamlload import YamlError
            try:
                load_pod_file(Path({str(path)!r}))
            except YamlError as e:
                print("refused:", e)
        """)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "refused:" in done.stdout and "alias" in done.stdout


class TestLimits:
    """The limits of the one YAML loader (authz.yamlload), and of the policy parser."""

    def test_anchors_from_yaml_dumpers_are_accepted(self) -> None:
        """PyYAML's dumper writes `&id001`/`*id001` for shared values; such a policy is
        read as written (aliases are counted, not refused)."""
        shared = [443, 8443]
        body = yaml.safe_dump({"rules": [{"name": n, "hosts": [f"{n}.example.com"],
                                          "ports": shared} for n in ("a", "b")]})
        assert "&id001" in body and "*id001" in body
        policy = parse_configmap(configmap(body), cluster_namespace=CLUSTER_NS)
        assert [r.ports for r in policy.rules] == [frozenset(shared)] * 2

    def test_aliases_count_towards_the_value_limit(self) -> None:
        """An alias counts as the values it repeats: 20 aliases of a 6,000-value list
        cross the 100,000-value limit although the text holds 6,000."""
        items = ",".join(["1"] * 6000)
        text = f"a: &a [{items}]\nb: [" + ",".join(["*a"] * 20) + "]\n"
        with pytest.raises(yl().YamlError, match="once its aliases are expanded"):
            yl().load_one(text, yl().POLICY_LIMITS)

    def test_aliases_count_towards_the_depth_limit(self) -> None:
        """An alias of a deep subtree nests it where the alias stands."""
        deep = "[" * 20 + "]" * 20
        with pytest.raises(yl().YamlError, match="deeper than 32"):
            yl().load_one(f"a: &a {deep}\nb: [[[[[[[[[[[[[[*a]]]]]]]]]]]]]]\n",
                          yl().POLICY_LIMITS)

    def test_undefined_alias(self) -> None:
        """An alias without its anchor is a located error."""
        with pytest.raises(yl().YamlError):
            yl().load_one("a: *nope\n", yl().POLICY_LIMITS)

    def test_depth(self) -> None:
        """Nesting deeper than the limit is refused before anything is built."""
        depth = yl().POLICY_LIMITS.max_depth + 1
        (msg,) = problems("rules: " + "[" * depth + "]" * depth)
        assert f"deeper than {yl().POLICY_LIMITS.max_depth}" in msg

    def test_very_deep_nesting_refused_without_recursion_error(self) -> None:
        """100,000 nested brackets give the same clear error, not a RecursionError."""
        (msg,) = problems("rules: " + "[" * 100_000 + "]" * 100_000)
        assert "nesting" in msg and "line 1" in msg

    def test_document_size(self) -> None:
        """A policy.yaml over the size limit is refused, without being parsed."""
        body = "# " + "x" * yl().POLICY_LIMITS.max_bytes + "\nrules: []\n"
        (msg,) = problems(body)
        assert f"over the limit of {yl().POLICY_LIMITS.max_bytes}" in msg

    def test_node_count(self) -> None:
        """A document with more values than the node limit is refused."""
        n = yl().POLICY_LIMITS.max_nodes + 1
        with pytest.raises(yl().YamlError) as info:
            yl().load_one("[" + ",".join(["1"] * n) + "]", yl().POLICY_LIMITS)
        assert f"more than {yl().POLICY_LIMITS.max_nodes} values" in str(info.value)

    def test_rule_count(self) -> None:
        """More rules than the limit in one ConfigMap: one clear error, no per-rule flood."""
        from authz.policy import MAX_RULES
        body = yaml.safe_dump({"rules": [{"name": f"r{i}", "hosts": ["a.example"]}
                                         for i in range(MAX_RULES + 1)]})
        msgs = problems(body)
        assert len(msgs) == 1
        assert f"{MAX_RULES + 1} rules, over the limit of {MAX_RULES}" in msgs[0]

    def test_hosts_per_rule(self) -> None:
        """More hosts than the limit in one rule is an error."""
        from authz.policy import MAX_HOSTS
        body = yaml.safe_dump({"rules": [{"name": "r", "hosts": [
            f"h{i}.example" for i in range(MAX_HOSTS + 1)]}]})
        (msg,) = problems(body)
        assert f"over the limit of {MAX_HOSTS}" in msg

    def test_giant_integer(self) -> None:
        """A 5,000-digit port is a clear error, not a ValueError escaping the parser."""
        msgs = problems("rules: [{name: r, hosts: [a.example], ports: [" + "9" * 5000 + "]}]")
        assert len(msgs) == 1 and len(msgs[0]) < 300

    @pytest.mark.parametrize("number", [
        "1" + ":30" * 60_000,  # YAML 1.1 base 60: quadratic big-integer work (32 s at 1 MiB)
        "0x" + "f" * 5_000,  # binary bases escape Python's 4,300-digit guard, then break str()
        "0b" + "1" * 20_000,
        "0" + "7" * 6_000,  # YAML 1.1 octal
        "1_0" * 3_000,
    ])
    def test_long_integers_refused_before_conversion(self, number: str) -> None:
        """An integer written with more characters than any real value needs is refused
        before it is converted (a namespace owner could otherwise hold the GIL for
        seconds per edit, or plant a value that breaks every message echoing it)."""
        with pytest.raises(yl().YamlError, match="integer of"):
            yl().load_one(f"ports: [{number}]\n", yl().POLICY_LIMITS)
        (msg,) = problems(f"rules: [{{name: r, hosts: [a.example], ports: [{number}]}}]")
        assert "integer of" in msg and len(msg) < 300

    def test_ordinary_integers_still_load(self) -> None:
        """Ports, sexagesimal-looking small values and underscores keep their YAML meaning."""
        assert yl().load_one("[443, 0x1bb, 1_000, 017, 1:30, 18446744073709551615]\n",
                             yl().POLICY_LIMITS) == [443, 443, 1000, 15, 90, 2**64 - 1]

    def test_file_limits_are_wider_than_policy_limits(self) -> None:
        """Manifest files (List dumps, Pod dumps) get room for real clusters' dumps."""
        assert yl().FILE_LIMITS.max_bytes > yl().POLICY_LIMITS.max_bytes
        assert yl().FILE_LIMITS.max_nodes > yl().POLICY_LIMITS.max_nodes

    def test_load_all_counts_nodes_across_documents(self) -> None:
        """The node limit covers a whole multi-document stream, not each document."""
        small = yl().POLICY_LIMITS.__class__(max_bytes=10_000, max_depth=8, max_nodes=10)
        with pytest.raises(yl().YamlError):
            yl().load_all("---\n".join(["[1, 2, 3, 4]\n"] * 3), small)
        assert yl().load_all("[1, 2]\n---\n[3]\n", small) == [[1, 2], [3]]

    def test_workloads_file_duplicate_key(self, tmp_path: Path) -> None:
        """The one loader also guards Pod files: a duplicated key is an error there too."""
        path = tmp_path / "pods.yaml"
        path.write_text("kind: Pod\nkind: Pod\n")
        with pytest.raises(yl().YamlError, match="given twice"):
            load_pod_file(path)


class TestEcho:
    @pytest.mark.parametrize("body", [
        "mode: " + "x" * 100_000,
        "mode: [" + ",".join(["[1,2,3]"] * 5000) + "]",
        "rules: [{name: r, hosts: [a.example], ports: ['" + "p" * 100_000 + "']}]",
        "rules: [{name: r, hosts: ['" + "h" * 100_000 + "']}]",
        "rules: [{name: r, hosts: [a.example], expires: '" + "2" * 100_000 + "'}]",
        "rules: [{name: r, hosts: [a.example], workloads: {matchLabels: {a: '"
        + "v" * 100_000 + "'}}}]",
        "rules: [{name: r, hosts: [a.example], http: {paths: ['/" + "q?" * 50_000 + "']}}]",
        "{" + "k" * 100_000 + ": 1}",
    ])
    def test_every_echoed_value_is_truncated(self, body: str) -> None:
        """Whatever field holds a giant value, the error quoting it stays short."""
        msgs = problems(body)
        assert msgs and all(len(m) < 400 for m in msgs), [len(m) for m in msgs]


def test_loader_keeps_other_configmaps_in_file(tmp_path: Path) -> None:
    """A bomb in one ConfigMap's policy.yaml rejects that ConfigMap only."""
    docs = [configmap(bomb(), name="bad"), configmap(
        "rules: [{name: r, hosts: [a.example]}]", name="good")]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = load_path(path)
    assert [str(p.source) for p in result.policies] == ["shop/good"]
    assert any("alias" in p for p in result.problems)
