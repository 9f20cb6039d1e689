"""The decision viewer without a browser: what the admin endpoint serves for the
page (files, headers, views) and `egress-authz ui`, locally and with --kube
through the API emulator's pods/portforward.
"""

from __future__ import annotations

import io
import json
import re
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from authz.cli import build_parser, main
from authz.commands import ui
from authz.commands.admin_client import AdminClient
from authz.model import Reason
from authz.ui.routes import CSP, STATIC
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import write_kubeconfig
from tests.ui_harness import Service, free_port, service, traffic

__all__ = ["service", "traffic"]  # fixtures

pytestmark = pytest.mark.timeout(180)


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestStaticFiles:
    @pytest.mark.parametrize("path, name", [("/", "index.html"), *((f"/ui/{n}", n) for n in STATIC)])
    def test_served_from_the_package_with_a_strict_csp(
        self, service: Service, path: str, name: str
    ) -> None:
        """Each file of the page is served from package data, with its type, the CSP
        (no inline script or style, nothing from elsewhere) and nosniff."""
        status, headers, body = get(service.admin_url + path)
        assert status == 200
        assert headers["Content-Type"] == STATIC[name]
        assert headers["Content-Security-Policy"] == CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert body == resources.files("authz.ui").joinpath("static", name).read_bytes()

    def test_csp_allows_only_this_origin(self) -> None:
        """The policy names no other origin and allows neither inline nor eval."""
        directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"
        assert directives["style-src"] == "'self'"
        assert "unsafe" not in CSP and "http" not in CSP and "*" not in CSP

    @pytest.mark.parametrize(
        "path", ["/ui/", "/ui/../admin.py", "/ui/%2e%2e/admin.py", "/ui/routes.py", "/ui/x.js",
                 "/ui/static/app.js", "/index.html"],
    )  # fmt: skip
    def test_nothing_else_is_served(self, service: Service, path: str) -> None:
        """Only the listed files: no path from a URL reaches the file system."""
        status, _, body = get(service.admin_url + path)
        assert status == 404, body

    def test_the_page_has_no_inline_script_or_style(self) -> None:
        """index.html loads one script and one stylesheet by URL and carries no inline
        script, style or event handler (the CSP would refuse them anyway)."""
        html = resources.files("authz.ui").joinpath("static", "index.html").read_text()
        found: list[tuple[str, dict[str, str | None]]] = []

        class Tags(HTMLParser):
            def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
                found.append((tag, dict(attrs)))

        Tags().feed(html)
        scripts = [a for t, a in found if t == "script"]
        assert scripts == [{"type": "module", "src": "/ui/app.js"}]
        assert re.search(r"<script[^>]*>\s*</script>", html)
        assert not [t for t, _ in found if t == "style"]
        assert not [(t, a) for t, a in found if "style" in a or any(k.startswith("on") for k in a)]
        for _, attrs in found:
            for key in ("src", "href"):
                value = attrs.get(key)
                assert value is None or value.startswith(("/ui/", "?")), value

    def test_the_script_never_builds_markup_from_strings(self) -> None:
        """app.js puts data on the page as text nodes only: no innerHTML and kin, no
        eval, no string handlers (hosts, paths and labels are attacker-controlled)."""
        js = resources.files("authz.ui").joinpath("static", "app.js").read_text()
        code = re.sub(r"//[^\n]*", "", js)  # comments may name what is banned
        for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                       "eval(", "new Function", "setAttribute(\"on", ".onerror", "srcdoc",
                       "javascript:", "DOMParser", "createContextualFragment"):  # fmt: skip
            assert banned not in code, banned
        assert "http://" not in code.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in code


class TestViews:
    def test_explanation_is_the_cli_explain(
        self, service: Service, traffic: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """/v1/explanations/{id} carries the text `explain` prints and the same content
        as data: the reason, each rule considered, the ConfigMap and the fix."""
        for key in ("deny", "port", "cluster", "audit", "allow"):
            status, _, body = get(f"{service.admin_url}/v1/explanations/{traffic[key]}")
            assert status == 200
            doc = json.loads(body)
            code, out, _ = cli(capsys, "explain", traffic[key], "--server", service.admin_url)
            assert code == 0
            assert doc["text"] == out
            e = doc["explanation"]
            assert f"{e['verdict'].upper()} ({e['reason']})" in out
            for c in e["rules"]:
                assert f"{c['rule']}: {c['why']}" in out
            for item in e["fix"]:
                for line in item["text"].splitlines():
                    assert line in out
        deny = json.loads(get(f"{service.admin_url}/v1/explanations/{traffic['deny']}")[2])
        fix = deny["explanation"]["fix"]
        assert {"kind": "command", "text": "kubectl -n shop edit configmap egress-policy"} in fix
        assert any(i["kind"] == "code" and "api.leng.com" in i["text"] for i in fix)

    def test_unknown_decision_is_404(self, service: Service) -> None:
        """An id not in the buffer is a 404 saying so."""
        status, _, body = get(f"{service.admin_url}/v1/explanations/00000000000000ff")
        assert status == 404
        assert "not in the buffer" in json.loads(body)["error"]

    def test_suggestion_is_the_cli_suggest(
        self, service: Service, traffic: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """/v1/namespaces/{ns}/suggest is the ConfigMap `suggest` prints, with or
        without --wildcards."""
        for wildcards in (False, True):
            q = "since=1h" + ("&wildcards=true" if wildcards else "")
            doc = json.loads(get(f"{service.admin_url}/v1/namespaces/shop/suggest?{q}")[2])
            argv = ["suggest", "-n", "shop", "--since", "1h", "--server", service.admin_url]
            code, out, _ = cli(capsys, *argv, *(["--wildcards"] if wildcards else []))
            assert code == 0
            assert doc["policy"] == out
            assert doc["command"] == "egress-authz suggest --namespace shop --since 1h" + (
                " --wildcards" if wildcards else ""
            )
        empty = json.loads(get(f"{service.admin_url}/v1/namespaces/nobody/suggest")[2])
        assert empty["policy"] is None and empty["decisions"] == 0

    def test_namespace_summary_counts_what_the_api_lists(
        self, service: Service, traffic: dict[str, str]
    ) -> None:
        """The namespace view's totals, groups and chart series add up to the
        decisions `/v1/decisions` lists for that namespace."""
        doc = json.loads(get(f"{service.admin_url}/v1/namespaces/shop?since=1h")[2])
        listed = AdminClient(service.admin_url).decisions(namespace="shop", limit=10_000)
        for verdict in ("allow", "deny", "audit"):
            n = sum(1 for d in listed if d["verdict"] == verdict)
            assert doc["totals"][verdict] == n
            assert sum(b[verdict] for b in doc["series"]["counts"]) == n
            assert sum(g["verdicts"].get(verdict, 0) for g in doc["groups"]) == (
                0 if verdict == "allow" else n
            )
        leng = next(g for g in doc["groups"] if g["host"] == "api.leng.com")
        assert leng["workload"] == "shop/cart" and leng["port"] == 443
        assert leng["reasons"] == {"host-not-allowed": 1}
        assert leng["last_decision_id"] == traffic["deny"]
        names = json.loads(get(f"{service.admin_url}/v1/namespaces")[2])["namespaces"]
        assert {"shop", "marketing"} <= set(names)

    def test_bad_window_is_400_and_reasons_are_the_enum(self, service: Service) -> None:
        """A bad `since` is a 400 saying what is wrong; /v1/reasons lists every code."""
        status, _, body = get(f"{service.admin_url}/v1/namespaces/shop?since=banana")
        assert status == 400 and "bad duration" in json.loads(body)["error"]
        doc = json.loads(get(f"{service.admin_url}/v1/reasons")[2])
        assert doc["reasons"] == [r.value for r in Reason]


class TestUiCommand:
    def test_prints_the_url_of_a_running_server(
        self, service: Service, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`ui` checks the endpoint answers and prints the page's URL (exit 0)."""
        code, out, _ = cli(capsys, "ui", "--server", service.admin_url)
        assert code == 0
        assert out == service.admin_url + "/\n"

    def test_unreachable_server_says_what_to_do(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing listening: exit 1 and a hint (--server, --kube), no URL printed."""
        code, out, err = cli(capsys, "ui", "--server", f"127.0.0.1:{free_port()}")
        assert code == 1 and out == ""
        assert "cannot reach the admin endpoint" in err and "--kube" in err

    def test_help_lists_ui(self) -> None:
        """`ui` is a command of the CLI."""
        args = build_parser().parse_args(["ui", "--kube", "-n", "x", "--local-port", "0"])
        assert args.kube and args.namespace == "x"


def _pod(name: str, *, ready: bool, created: str, phase: str = "Running",
         deleting: bool = False) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {
        "name": name, "namespace": "egress-authz", "creationTimestamp": created,
        "labels": {"app.kubernetes.io/name": "egress-authz"},
    }  # fmt: skip
    if deleting:
        meta["deletionTimestamp"] = created
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"containers": [{"name": "authz", "image": "x"}]},
        "status": {"phase": phase, "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


class TestUiKube:
    def test_port_forwards_to_a_ready_replica(
        self, service: Service, traffic: dict[str, str], tmp_path: Path
    ) -> None:
        """`ui --kube` lists the service's pods, picks a ready one (not starting, pending or
        terminating), and serves
        the page on 127.0.0.1 through the API's pods/portforward (the official client's
        WebSocket stream, answered by the emulator with that replica's admin port)."""
        admin_port = int(service.admin_url.rsplit(":", 1)[1])
        with KubeEmulator() as emu:
            emu.seed(
                _pod("authz-a-starting", ready=False, created="2026-11-03T00:00:00Z"),
                _pod("authz-b", ready=True, created="2026-11-02T00:00:00Z"),
                _pod("authz-c-leaving", ready=True, created="2026-11-04T00:00:00Z", deleting=True),
                _pod("authz-d-pending", ready=False, created="2026-11-04T00:00:00Z",
                     phase="Pending"),
            )  # fmt: skip
            emu.port_forwards[("egress-authz", "authz-b", 9090)] = ("127.0.0.1", admin_port)
            kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
            args = build_parser().parse_args(["ui", "--kube", "--kubeconfig", str(kubeconfig)])
            out = io.StringIO()
            stop = threading.Event()
            codes: list[int] = []
            runner = threading.Thread(
                target=lambda: codes.append(ui.run(args, out, stop=stop)), daemon=True
            )
            runner.start()
            try:
                emu.wait_for(lambda: out.getvalue(), timeout=30)
                url = out.getvalue().splitlines()[0]
                assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
                assert "pod egress-authz/authz-b port 9090" in out.getvalue()
                status, headers, body = get(url)
                assert status == 200 and b'src="/ui/app.js"' in body
                assert headers["Content-Security-Policy"] == CSP
                status, _, body = get(url + f"v1/explanations/{traffic['deny']}")
                assert status == 200 and json.loads(body)["decision"]["host"] == "api.leng.com"
            finally:
                stop.set()
                runner.join(10)
            assert codes == [0]
            forwards = [r for r in emu.requests if r.path.endswith("/portforward")]
            assert forwards and all(r.status == 101 for r in forwards)
            assert {r.path for r in forwards} == {
                "/api/v1/namespaces/egress-authz/pods/authz-b/portforward"
            }

    def test_no_ready_replica_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No ready pod matches: exit 1 saying how many were found, nothing forwarded."""
        with KubeEmulator() as emu:
            emu.seed(_pod("authz-starting", ready=False, created="2026-11-03T00:00:00Z"))
            kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
            code, out, err = cli(capsys, "ui", "--kube", "--kubeconfig", str(kubeconfig))
        assert code == 1 and out == ""
        assert "no ready pod in namespace egress-authz" in err and "(of 1 found)" in err


class TestBrowserAvailability:
    def test_no_chromium_skips_saying_why_and_fails_in_ci(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a Chromium the browser tests skip with a message naming the package
        to install; under CI=true the same condition is a failure, never a silent skip."""
        from tests import ui_harness

        monkeypatch.setattr(ui_harness, "chromium_path", lambda: None)
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="install Debian's `chromium` package"):
            ui_harness.need_browser()
        monkeypatch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception, match="browser tests must run in CI"):
            ui_harness.need_browser()
