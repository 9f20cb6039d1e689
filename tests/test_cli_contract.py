"""The CLI's contract from a new user's first hour: one exit-code table for every
command, usage errors with the command's own usage, `-o` wherever data is printed,
and a precise answer for each mistake people make (issue 13)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authz.cli import main
from authz.commands import exits, explain, traces

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = str(ROOT / "examples")
CART = "spiffe://cluster.local/ns/shop/sa/cart"
CONNECTOR = "spiffe://cluster.local/ns/shop/sa/connector"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def configmap(name: str, policy: str, label: str = '"true"') -> str:
    body = "\n".join("    " + line for line in policy.strip("\n").splitlines())
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: shop\n"
        f"  labels:\n    egress-authz.io/policy: {label}\ndata:\n  policy.yaml: |\n{body}\n"
    )


@pytest.fixture
def broken(tmp_path: Path) -> str:
    (tmp_path / "p.yaml").write_text(configmap("p", "rules: [{name: a, hosts: ['*']}]"))
    return str(tmp_path)


class TestExitCodes:
    """The README's table, command by command."""

    def test_check(self, capsys: pytest.CaptureFixture[str], broken: str, tmp_path: Path) -> None:
        """check: 0 allowed, 1 denied, 2 policy errors / missing path / bad value."""
        base = ["check", "--policies", EXAMPLES, "--principal", CONNECTOR]
        assert cli(capsys, *base, "--host", "api.kadath.io", "--labels", "function=api-connector")[0] == 0
        assert cli(capsys, *base, "--host", "api.leng.com")[0] == 1
        assert cli(capsys, "check", "--policies", broken, "--principal", CART, "--host", "a.io")[0] == 2
        assert cli(capsys, "check", "--policies", str(tmp_path / "nope"), "--principal", CART,
                   "--host", "a.io")[0] == 2  # fmt: skip
        assert cli(capsys, *base, "--host", "a.io", "--labels", "oops")[0] == 2
        assert cli(capsys, *base, "--host", "a.io", "--port", "70000")[0] == 2

    def test_lint(self, capsys: pytest.CaptureFixture[str], broken: str, tmp_path: Path) -> None:
        """lint: 0 clean, 1 nothing checked, 2 policy errors or a missing path."""
        assert cli(capsys, "lint", EXAMPLES)[0] == 0
        empty = tmp_path / "empty"
        empty.mkdir()
        assert cli(capsys, "lint", str(empty))[0] == 1
        assert cli(capsys, "lint", broken)[0] == 2
        assert cli(capsys, "lint", str(tmp_path / "nope"))[0] == 2

    def test_render(self, capsys: pytest.CaptureFixture[str], broken: str, tmp_path: Path) -> None:
        """render: 0 printed, 2 for policy errors and for a missing path (was 1 for both)."""
        assert cli(capsys, "render", "--policies", EXAMPLES)[0] == 0
        assert cli(capsys, "render", "--policies", broken)[0] == 2
        assert cli(capsys, "render", "--policies", str(tmp_path / "nope"))[0] == 2

    def test_traces(self, capsys: pytest.CaptureFixture[str]) -> None:
        """traces: 1 when the server cannot be reached, 2 for `--since banana` (was 1)."""
        assert cli(capsys, "traces", "--server", closed_port())[0] == 1
        code, _, err = cli(capsys, "traces", "--since", "banana")
        assert code == 2 and "bad duration 'banana'" in err

    def test_explain(self, capsys: pytest.CaptureFixture[str]) -> None:
        """explain: 2 for a malformed id (said so), 1 when the server cannot be reached."""
        code, _, err = cli(capsys, "explain", "bogus")
        assert code == 2 and "'bogus' is not a decision id" in err
        assert cli(capsys, "explain", "0123456789abcdef", "--server", closed_port())[0] == 1

    def test_suggest(self, capsys: pytest.CaptureFixture[str]) -> None:
        """suggest: 1 when the server cannot be reached, 2 without --namespace."""
        assert cli(capsys, "suggest", "-n", "shop", "--server", closed_port())[0] == 1
        assert cli(capsys, "suggest")[0] == 2

    def test_serve(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """serve: 2 for a policy path that does not exist (it used to serve deny-all)."""
        code, _, err = cli(capsys, "serve", "--policies", str(tmp_path / "nope"),
                           "--grpc-address", "127.0.0.1:0", "--admin-address", "")  # fmt: skip
        assert code == 2 and "no such file or directory" in err

    def test_demo(self, capsys: pytest.CaptureFixture[str]) -> None:
        """demo: 2 for a --port-base out of range (the run itself: tests/test_demo.py)."""
        assert cli(capsys, "demo", "--port-base", "80")[0] == 2

    def test_demo_without_its_extra(self) -> None:
        """Installed without the `demo` extra: exit 1 saying what to install, no traceback."""
        code = (
            "import sys; sys.modules['cryptography'] = None; "
            "from authz.cli import main; sys.exit(main(['demo']))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=False, timeout=60)  # fmt: skip
        assert done.returncode == 1, done
        assert 'pip install "egress-authz[demo]"' in done.stderr
        assert "Traceback" not in done.stderr

    def test_constants_match_the_readme(self) -> None:
        """The table in the README names the codes exits.py defines."""
        readme = (ROOT / "README.md").read_text()
        for code in (exits.OK, exits.NO, exits.USAGE, exits.INTERRUPTED):
            assert f"\n| {code} |" in readme


class TestUsage:
    def test_version(self) -> None:
        """`egress-authz --version` prints the installed version."""
        done = subprocess.run([sys.executable, "-m", "authz", "--version"], capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert done.returncode == 0 and done.stdout.startswith("egress-authz 0."), done

    def test_make_demo_passes_args(self) -> None:
        """`make demo ARGS=--keep-running` runs the demo with that argument."""
        done = subprocess.run(["make", "-n", "demo", "ARGS=--keep-running"], cwd=ROOT,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert ".venv/bin/egress-authz demo --keep-running" in done.stdout, done

    def test_unknown_flag_prints_the_subcommands_usage(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`check --bogus` shows `check`'s usage, not the top-level one."""
        code, _, err = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                           "--host", "a.io", "--bogus")  # fmt: skip
        assert code == 2
        assert err.startswith("usage: egress-authz check") and "unrecognized arguments: --bogus" in err

    def test_value_error_after_parsing_prints_the_subcommands_usage(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad --labels found in run() is reported like an argparse error."""
        code, _, err = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                           "--host", "a.io", "--labels", "oops")  # fmt: skip
        assert code == 2 and err.startswith("usage: egress-authz check")
        assert "--labels: 'oops' is not key=value" in err

    @pytest.mark.parametrize(
        "argv",
        [
            ["check", "--policies", EXAMPLES, "--principal", CART, "--host", "api.kadath.io"],
            ["lint", EXAMPLES],
            ["render", "--policies", EXAMPLES],
        ],
        ids=lambda a: a[0],
    )
    def test_output_json_everywhere(self, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
        """`-o json` (any case) works on every offline command that prints data."""
        code, out, _ = cli(capsys, *argv, "-o", "JSON")
        assert code in (0, 1) and isinstance(json.loads(out), dict)

    def test_output_flag_on_server_commands(self) -> None:
        """traces, explain and suggest take -o too."""
        from authz.cli import build_parser

        parser = build_parser()
        assert parser.parse_args(["traces", "-o", "json"]).output == "json"
        assert parser.parse_args(["explain", "abc", "-o", "json"]).output == "json"
        assert parser.parse_args(["suggest", "-n", "x", "-o", "json"]).output == "json"

    def test_protocol_in_any_case(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--protocol TLS`, as policies spell it, is accepted."""
        code, out, _ = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                           "--host", "api.kadath.io", "--protocol", "TLS")  # fmt: skip
        assert code == 1 and "(TLS)" in out


class TestCheckAnswers:
    def test_url_as_host(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A pasted URL gives the host (and its port, protocol and path), not a port error."""
        code, out, _ = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CONNECTOR,
                           "--labels", "function=api-connector", "--host",
                           "https://api.kadath.io/", "-o", "json")  # fmt: skip
        doc = json.loads(out)
        assert code == 0 and doc["host"] == "api.kadath.io"
        code, out, _ = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                           "--host", "http://api.kadath.io:8080/v1?x=1")  # fmt: skip
        assert code == 1 and out.startswith("DENY  shop/cart -> api.kadath.io:8080 (HTTP)")

    def test_not_a_host_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`api.kadath.io/v1` or `//api...` is said to be a path, never 'port is not a number'."""
        for bad in ("api.kadath.io/v1", "//api.kadath.io", "ftp://api.kadath.io"):
            code, _, err = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                               "--host", bad)  # fmt: skip
            assert code == 2 and "not a number" not in err, (bad, err)

    def test_missing_labels_are_named(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --labels, the rules that needed them are named, and how to give them."""
        code, out, _ = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                           "--host", "api.kadath.io")  # fmt: skip
        assert code == 1
        assert "labels not given: rule shop/egress-policy/kadath-api selects by label" in out
        assert "--labels" in out
        _, out, _ = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                        "--host", "api.kadath.io", "--labels", "a=b")  # fmt: skip
        assert "labels not given" not in out

    def test_explanations_read_as_labels_not_python(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`function=finance`, never `{'function': 'finance'}`."""
        _, out, _ = cli(capsys, "check", "--policies", EXAMPLES, "--principal", CART,
                        "--host", "api.kadath.io", "--labels", "function=finance")  # fmt: skip
        assert "workload labels function=finance do not match matchLabels function=api-connector" in out
        assert "{'" not in out


class TestLintAnswers:
    def test_boolean_label_is_named_and_fails(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """`egress-authz.io/policy: true` (a YAML boolean): the label is there but must be
        the string "true"; the lint does not pass (it used to print OK and exit 0)."""
        (tmp_path / "p.yaml").write_text(configmap("p", "rules: []", label="true"))
        code, out, err = cli(capsys, "lint", str(tmp_path))
        assert code == 1 and "OK" not in out
        assert 'as the YAML boolean true: it must be the string "true" (quote it' in err
        assert "0 policy ConfigMap(s), 0 rule(s): 1 ConfigMap(s) ignored for their label" in err

    def test_nothing_checked_fails(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A directory without a policy ConfigMap is not a passing lint."""
        (tmp_path / "other.yaml").write_text("kind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n")
        code, _, err = cli(capsys, "lint", str(tmp_path))
        assert code == 1 and "nothing checked" in err

    def test_yaml_error_in_policy_yaml_names_the_file_line(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """A YAML error inside the embedded policy.yaml points at the file's line and column."""
        text = configmap("p", "rules:\n  - name: a\n    hosts: [a.io\n  - name: b\n")
        (tmp_path / "p.yaml").write_text(text)
        code, _, err = cli(capsys, "lint", str(tmp_path))
        line = text.splitlines().index("      - name: b") + 1
        assert code == 2
        assert f"{tmp_path / 'p.yaml'}:{line}:13: shop/p policy.yaml: bad YAML:" in err, err

    def test_invalid_rule_name(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A name that breaks the rules is 'invalid name', not 'every rule needs a name'."""
        (tmp_path / "p.yaml").write_text(configmap("p", "rules: [{name: 'bad name!', hosts: [a.io]}]"))
        _, _, err = cli(capsys, "lint", str(tmp_path))
        assert "rules[0].name: invalid name 'bad name!'" in err and "needs a name" not in err

    def test_expired_rule_warns(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """An `expires` in the past: warned 'already expired'; exit 0, or 1 with --strict."""
        (tmp_path / "p.yaml").write_text(
            configmap("p", "rules: [{name: old, hosts: [a.io], expires: '2020-01-01'}]")
        )
        code, out, err = cli(capsys, "lint", str(tmp_path))
        assert code == 0 and "OK, 1 warning(s)" in out
        assert 'shop/p rules[0] "old" expires: 2020-01-01 is already expired' in err
        assert cli(capsys, "lint", str(tmp_path), "--strict")[0] == 1

    def test_ok_summary_on_stdout(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The good news goes to stdout (`lint | tee`), nothing to stderr."""
        code, out, err = cli(capsys, "lint", EXAMPLES)
        assert (code, err) == (0, "") and "OK" in out

    def test_explain_mentions_the_cluster_deny(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--explain of a host the cluster denies says so, naming the deny entry."""
        _, out, _ = cli(capsys, "lint", EXAMPLES, "--explain", "https://x.stealyourmoney.com/")
        assert "x.stealyourmoney.com is denied by the cluster policy" in out
        assert "'*.stealyourmoney.com'" in out

    def test_explain_url_or_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--explain takes a URL; a path-like value is a usage error, not a port error."""
        _, out, _ = cli(capsys, "lint", EXAMPLES, "--explain", "https://api.kadath.io/")
        assert "rules naming api.kadath.io:" in out
        code, _, err = cli(capsys, "lint", EXAMPLES, "--explain", "//api.kadath.io")
        assert code == 2 and "not a number" not in err and "not a path" in err


class TestTracesAndExplainViews:
    DENY: dict[str, Any] = {
        "time": "2026-11-30T05:00:00Z", "namespace": "shop", "service_account": "cart",
        "host": "api.leng.com", "port": 443, "verdict": "deny", "reason": "host-not-allowed",
        "rule": "shop/egress-policy/leng-payments", "latency_us": 300,
    }  # fmt: skip

    def test_a_denials_rule_is_marked_nearest(self) -> None:
        """RULE of a deny says it is the nearest rule; an allow's rule is plain."""
        assert traces.row_of(self.DENY)[5] == "nearest: shop/egress-policy/leng-payments"
        allow = {**self.DENY, "verdict": "allow", "reason": "allowed"}
        assert traces.row_of(allow)[5] == "shop/egress-policy/leng-payments"

    def test_long_names_keep_the_columns(self) -> None:
        """A 150-character rule shortens in the middle; every row's LATENCY stays aligned."""
        long = {**self.DENY, "rule": "shop/" + "x" * 70 + "/" + "y" * 70}
        table = traces.render_table([self.DENY, long]).splitlines()
        starts = {line.rindex("µs") for line in table[1:]}
        assert len(starts) == 1 and "…" in table[2]
        follow = [traces._line(traces.row_of(d), traces._FOLLOW_WIDTHS) for d in (self.DENY, long)]
        assert len({line.rindex("µs") for line in follow}) == 1

    def test_explain_shows_the_host_asked_for_an_identity_mismatch(self) -> None:
        """Denied before the host was judged: the host asked for is shown, marked."""
        d = {**self.DENY, "reason": "identity-mismatch", "host": "", "sni": "api.kadath.io",
             "rule": None}  # fmt: skip
        text = explain.render(d)
        assert "host             api.kadath.io (not evaluated)" in text
