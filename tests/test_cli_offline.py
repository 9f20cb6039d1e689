"""`egress-authz check` and `lint`: the offline CLI contract (exit codes, JSON fields)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from authz.cli import main
from authz.loader import load_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


class TestCheck:
    BASE = ("check", "--policies", str(EXAMPLES))

    def test_allowed_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Allowed: exit 0 and the contract's JSON fields."""
        code, out, _ = run(
            *self.BASE,
            "--principal",
            "spiffe://cluster.local/ns/shop/sa/connector",
            "--host",
            "api.kadath.io",
            "--labels",
            "function=api-connector",
            "--output",
            "json",
            capsys=capsys,
        )
        doc = json.loads(out)
        assert code == 0
        assert doc["allowed"] is True and doc["verdict"] == "allow" and doc["reason"] == "allowed"
        assert doc["rule"] == "shop/egress-policy/kadath-api" and len(doc["decision_id"]) >= 8

    def test_denied_text(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Denied: exit 1, the reason, the rules considered, the ConfigMap to edit."""
        code, out, _ = run(
            *self.BASE,
            "--principal",
            "spiffe://cluster.local/ns/shop/sa/cart",
            "--host",
            "api.kadath.io",
            "--labels",
            "function=finance",
            capsys=capsys,
        )
        assert code == 1
        assert out.startswith("DENY  shop/cart -> api.kadath.io:443 (TLS)")
        assert "reason:   host-not-allowed" in out
        assert "do not match matchLabels" in out and "edit: shop/egress-policy" in out

    def test_cluster_deny_and_audit(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The examples' cluster deny is enforced; marketing's audit mode allows with audit."""
        code, out, _ = run(
            *self.BASE,
            "--principal",
            "spiffe://cluster.local/ns/shop/sa/cart",
            "--host",
            "api.stealyourmoney.com",
            "--output",
            "json",
            capsys=capsys,
        )
        assert code == 1 and json.loads(out)["reason"] == "cluster-denied"
        code, out, _ = run(
            *self.BASE,
            "--principal",
            "spiffe://cluster.local/ns/marketing/sa/analytics",
            "--host",
            "api.leng.com",
            "--output",
            "json",
            capsys=capsys,
        )
        assert code == 0 and json.loads(out)["verdict"] == "audit"

    def test_http_and_sni_mismatch(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--protocol http with a different --sni is domain fronting."""
        code, out, _ = run(
            *self.BASE,
            "--principal",
            "spiffe://cluster.local/ns/shop/sa/cart",
            "--host",
            "api.leng.com",
            "--sni",
            "api.kadath.io",
            "--protocol",
            "http",
            "--labels",
            "function=finance",
            "--output",
            "json",
            capsys=capsys,
        )
        assert code == 1 and json.loads(out)["reason"] == "sni-host-mismatch"

    def test_policy_errors_exit_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Broken policy files: exit 2 and every error on stderr."""
        (tmp_path / "p.yaml").write_text(
            "kind: ConfigMap\nmetadata: {name: p, namespace: shop, labels: "
            "{egress-authz.io/policy: 'true'}}\ndata: {policy.yaml: 'rules: [{name: a, hosts: "
            '["*.*.io"]}]\'}\n'
        )
        code, _, err = run(
            "check",
            "--policies",
            str(tmp_path),
            "--principal",
            "spiffe://cluster.local/ns/shop/sa/a",
            "--host",
            "x.io",
            capsys=capsys,
        )
        assert code == 2 and "whole leftmost label" in err

    def test_bad_labels_exit_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A malformed --labels is a usage error."""
        code, _, err = run(
            *self.BASE,
            "--principal",
            "spiffe://cluster.local/ns/shop/sa/cart",
            "--host",
            "x.io",
            "--labels",
            "novalue",
            capsys=capsys,
        )
        assert code == 2 and "not key=value" in err

    def test_usage_error_exit_2(self) -> None:
        """Missing required flags exit 2 via the console script."""
        proc = subprocess.run(
            [sys.executable, "-m", "authz", "check", "--host", "x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and "--policies" in proc.stderr


class TestLint:
    def test_examples_are_valid(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The shipped examples lint clean."""
        code, out, _ = run("lint", str(EXAMPLES), capsys=capsys)
        assert code == 0 and out.endswith("3 policy ConfigMap(s), 3 rule(s): OK\n")

    def test_errors_listed_with_locations(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every error is printed with file, ConfigMap, rule and field; exit non-zero."""
        (tmp_path / "a.yaml").write_text("""
apiVersion: v1
kind: List
items:
- kind: ConfigMap
  metadata: {name: good, namespace: shop, labels: {egress-authz.io/policy: "true"}}
  data: {policy.yaml: "rules: [{name: ok, hosts: [a.io]}]"}
- kind: ConfigMap
  metadata: {name: bad, namespace: shop, labels: {egress-authz.io/policy: "true"}}
  data:
    policy.yaml: |
      rules:
        - name: payments
          hosts: ["*"]
          ports: [70000]
- kind: ConfigMap
  metadata: {name: unlabelled, namespace: shop}
  data: {policy.yaml: "rules: []"}
""")
        (tmp_path / "b.yaml").write_text("kind: ConfigMap\nmetadata: {name: x\n")
        code, _, out = run("lint", str(tmp_path), capsys=capsys)
        assert code == 2  # policy errors
        assert f'{tmp_path / "a.yaml"}: shop/bad rules[0] "payments" hosts[0]: "*"' in out
        assert 'shop/bad rules[0] "payments" ports[0]: 70000 is out of range' in out
        assert f"{tmp_path / 'b.yaml'}:" in out and "bad YAML" in out
        assert "shop/unlabelled has a policy.yaml key but not the label" in out

    def test_explain(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--explain lists the rules naming a host, wildcards included."""
        code, out, _ = run("lint", str(EXAMPLES), "--explain", "API.Kadath.io", capsys=capsys)
        assert code == 0
        assert "shop/egress-policy/kadath-api  (via api.kadath.io)" in out
        assert "marketing/egress-policy/analytics  (via *.kadath.io)" in out
        code, out, _ = run("lint", str(EXAMPLES), "--explain", "nothing.io", capsys=capsys)
        assert "no rule names nothing.io" in out

    def test_json_and_missing_path(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """JSON output for scripts; a missing path exits 2."""
        code, out, _ = run("lint", str(EXAMPLES), "--output", "json", capsys=capsys)
        doc = json.loads(out)
        assert code == 0 and doc["valid"] and doc["configmaps"] == 3
        code, _, _ = run("lint", str(tmp_path / "nope"), capsys=capsys)
        assert code == 2


class TestLoader:
    def test_duplicate_configmaps_across_files(self, tmp_path: Path) -> None:
        """One ConfigMap defined in two files is an error, not a silent override."""
        doc = (
            "kind: ConfigMap\nmetadata: {name: p, namespace: shop, labels: "
            "{egress-authz.io/policy: 'true'}}\ndata: {policy.yaml: ''}\n"
        )
        (tmp_path / "1.yaml").write_text(doc)
        (tmp_path / "2.yml").write_text("---\n" + doc)
        result = load_path(tmp_path)
        assert len(result.policies) == 1 and "defined more than once" in result.problems[0]

    def test_mounted_configmap_volume_read_once(self, tmp_path: Path) -> None:
        """A ConfigMap volume's `..data` and `..<timestamp>` copies are not read again."""
        doc = ("kind: ConfigMap\nmetadata: {name: p, namespace: shop, labels: "
               "{egress-authz.io/policy: 'true'}}\ndata: {policy.yaml: ''}\n")
        stamp = tmp_path / "..2026_11_27_04_00_00.1"
        stamp.mkdir()
        (stamp / "policy.yaml").write_text(doc)
        (tmp_path / "..data").symlink_to(stamp.name)
        (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
        result = load_path(tmp_path)
        assert result.problems == [] and len(result.policies) == 1

    def test_broken_configmap_does_not_hide_others(self, tmp_path: Path) -> None:
        """Each ConfigMap is validated alone: the good ones still load."""
        (tmp_path / "p.yaml").write_text(
            "kind: ConfigMap\nmetadata: {name: good, namespace: a, labels: "
            "{egress-authz.io/policy: 'true'}}\ndata: {policy.yaml: ''}\n---\n"
            "kind: ConfigMap\nmetadata: {name: bad, namespace: a, labels: "
            "{egress-authz.io/policy: 'true'}}\ndata: {policy.yaml: 'mode: x'}\n"
        )
        result = load_path(tmp_path)
        assert [str(p.source) for p in result.policies] == ["a/good"]
        assert len(result.problems) == 1
