"""The decision viewer in a real browser (Debian's Chromium driven by Playwright)
against a running `egress-authz serve` fed with Checks over gRPC.

Every wait is on a condition with a generous bound (the machine is shared);
nothing sleeps. Without a Chromium these skip saying why (and fail under CI).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from authz.cli import main
from authz.commands.admin_client import AdminClient
from authz.commands.suggest import FIXABLE
from tests.ui_harness import (
    ANALYTICS,
    CART,
    WAIT_MS,
    CuttableProxy,
    Service,
    service,
    traffic,
)

__all__ = ["service", "traffic"]  # fixtures

pytestmark = pytest.mark.timeout(300)

# Would set window.__xss if it ever became markup; a CSP violation would be
# recorded if it became markup that the policy then blocked.
XSS_HOST = '<img src=x onerror="window.__xss=1">'
XSS_PATH = '/"><script>window.__xss=2</script><img src=y onerror="window.__xss=3">'
XSS_SNI = '"><svg onload="window.__xss=4">'
RECORD_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.violatedDirective));
"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from tests.ui_harness import CHROMIUM_ARGS, need_browser

    path = need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, timeout=WAIT_MS * 2)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context()
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    pg.add_init_script(RECORD_VIOLATIONS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def expect_live(page: Any) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_have_attribute("data-state", "live", timeout=WAIT_MS)


def row(page: Any, decision_id: str) -> Any:
    return page.locator(f'#decisions tbody tr[data-id="{decision_id}"]')


class TestLive:
    def test_decisions_appear_live_and_pause_holds_them(
        self, page: Any, service: Service, traffic: dict[str, str]
    ) -> None:
        """A Check sent after the page is open shows up as a row without a reload, with
        the documented columns; while paused nothing is added, and resume catches up."""
        from playwright.sync_api import expect

        page.goto(service.admin_url + "/")
        expect_live(page)
        expect(row(page, traffic["deny"])).to_be_visible()  # from the initial list
        live = service.check(sni="live-1.leng.com", **CART)
        r = row(page, live)
        expect(r).to_be_visible()
        expect(r.locator("td.workload")).to_contain_text("shop/cart")
        expect(r.locator("td.workload")).to_contain_text("cart-7d9f")
        expect(r.locator("td.dest")).to_have_text("live-1.leng.com")
        expect(r.locator("td.port")).to_have_text("443")
        expect(r.locator("td.protocol")).to_have_text("TLS")
        expect(r.locator("td.verdict")).to_have_text("deny")
        expect(r.locator("td.reason")).to_have_text("host-not-allowed")
        expect(r.locator("td.rule")).to_have_text(re.compile("^(nearest: .+|-)$"))
        expect(r.locator("td.latency")).to_have_text(re.compile(r"^\d+(\.\d)?(µs|ms)$"))
        expect(r.locator("td.decision")).to_have_text(live)

        page.click("#pause")
        expect(page.locator("#status")).to_have_attribute("data-state", "paused")
        before = page.locator("#decisions tbody tr").count()
        held = service.check(sni="live-2.leng.com", **CART)
        # Recorded by the server (so a live stream would have carried it)...
        found = AdminClient(service.admin_url).decisions(host="live-2.leng.com")
        assert [d["decision_id"] for d in found] == [held]
        # ...but the paused table has no stream: it is not there until resumed.
        assert page.locator("#decisions tbody tr").count() == before
        expect(row(page, held)).to_have_count(0)
        page.click("#pause")
        expect_live(page)
        expect(row(page, held)).to_be_visible()


class TestFilters:
    def test_filters_narrow_the_table_and_survive_a_reload(
        self, page: Any, service: Service, traffic: dict[str, str]
    ) -> None:
        """Namespace and verdict filters narrow the table to what the API returns for
        them, are kept in the URL, come back after a reload, and filter the stream too."""
        from playwright.sync_api import expect

        page.goto(service.admin_url + "/")
        expect_live(page)
        page.fill("#filters input[name=namespace]", "marketing")
        page.select_option("#filters select[name=verdict]", "audit")  # applies at once
        expect(page).to_have_url(re.compile(r"\?namespace=marketing&verdict=audit$"))
        expected = AdminClient(service.admin_url).decisions(
            namespace="marketing", verdict="audit", limit=200
        )
        assert expected, "the audit decision was recorded"
        rows = page.locator("#decisions tbody tr")
        expect(rows).to_have_count(len(expected))
        expect(row(page, traffic["audit"])).to_be_visible()
        expect(row(page, traffic["deny"])).to_have_count(0)
        for verdict in page.locator("#decisions tbody td.verdict").all_text_contents():
            assert verdict == "audit"

        page.reload()
        expect_live(page)
        expect(page.locator("#filters input[name=namespace]")).to_have_value("marketing")
        expect(page.locator("#filters select[name=verdict]")).to_have_value("audit")
        expect(rows).to_have_count(len(expected))

        # Live rows obey the filters: the shop denial is sent first, on the same
        # ordered stream, so had it passed the filter it would be there too.
        service.check(sni="filtered-out.leng.com", **CART)
        kept = service.check(host="hooks.kadath.io", port=80, path="/v9/live", **ANALYTICS)
        expect(row(page, kept)).to_be_visible()
        expect(rows).to_have_count(len(expected) + 1)

        page.click("#clear")
        expect(page).to_have_url(re.compile(r"/$"))
        expect(row(page, traffic["deny"])).to_be_visible()


class TestExplanation:
    def test_clicking_a_denial_explains_it_like_the_cli(
        self,
        page: Any,
        service: Service,
        traffic: dict[str, str],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Clicking a denial opens its explanation: the reason code, each rule considered,
        the ConfigMap to edit and the rule to add, the same text `egress-authz explain`
        prints; the panel's URL opens it again after a reload."""
        from playwright.sync_api import expect

        deny = traffic["deny"]
        page.goto(service.admin_url + "/?namespace=shop")
        expect_live(page)
        row(page, deny).locator("td.reason").click()
        expect(page).to_have_url(re.compile(f"decision={deny}"))
        panel = page.locator("#detail")
        expect(panel).to_be_visible()
        expect(panel.locator(".reason-code")).to_have_text("host-not-allowed")
        expect(panel.locator("pre.command")).to_have_text(
            "kubectl -n shop edit configmap egress-policy"
        )
        expect(panel.locator("pre.code")).to_contain_text("hosts: [api.leng.com]")
        expect(panel.locator("ul.rules li").first).to_be_visible()

        capsys.readouterr()
        assert main(["explain", deny, "--server", service.admin_url]) == 0
        cli_text = capsys.readouterr().out
        panel.locator("details summary").click()
        assert panel.locator("details pre").text_content() == cli_text
        # The structured panel carries each rule line and fix of that text.
        shown = panel.inner_text()
        for line in cli_text.splitlines():
            if line.startswith("  no ") or line.startswith("  applies"):
                rule = line.split()[1].rstrip(":")
                assert rule in shown, rule
        assert "The policy to edit is the ConfigMap shop/egress-policy:" in shown

        page.reload()
        expect(panel.locator(".reason-code")).to_have_text("host-not-allowed")
        page.click("#detail-close")
        expect(panel).to_be_hidden()
        expect(page).not_to_have_url(re.compile("decision="))


class TestNamespace:
    def test_suggested_policy_fed_to_check_allows_what_was_observed(
        self,
        chromium: Any,
        service: Service,
        traffic: dict[str, str],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The namespace view groups the denials and charts the verdicts; its Copy
        button copies the policy `suggest` writes, and `egress-authz check` with that
        policy allows every fixable request observed (denied without it), not more."""
        from playwright.sync_api import expect

        service.check(host="hooks.kadath.io", port=80, method="POST", path="/v1/x", **CART)
        origin = "http://" + urlsplit(service.admin_url).netloc
        context = chromium.new_context(permissions=["clipboard-read", "clipboard-write"])
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=origin)
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        try:
            page.goto(service.admin_url + "/?view=namespace&ns=shop")
            expect(page.locator("#ns-chart svg rect.bar-deny").first).to_be_visible()
            expect(page.locator("#ns-chart svg rect.bar-allow").first).to_be_visible()
            groups = page.locator("#ns-groups tbody")
            expect(groups).to_contain_text("api.leng.com:443")
            expect(groups).to_contain_text("shop/cart")
            expect(groups).to_contain_text("host-not-allowed")
            expect(page.locator("#ns-policy")).to_contain_text("kind: ConfigMap")
            page.click("#copy-policy")
            expect(page.locator("#copy-status")).to_have_text("copied")
            policy = page.evaluate("navigator.clipboard.readText()")
        finally:
            context.close()
        assert policy == page_text_free(policy)

        observed = [
            d
            for verdict in ("deny", "audit")
            for d in AdminClient(service.admin_url).decisions(
                namespace="shop", verdict=verdict, limit=1000
            )
            if d["reason"] in FIXABLE and d["host"]
        ]
        assert {d["reason"] for d in observed} >= {"host-not-allowed", "port-not-allowed"}
        capsys.readouterr()
        assert main(["suggest", "-n", "shop", "--since", "1h", "--server", service.admin_url]) == 0
        assert policy == capsys.readouterr().out  # the same text as the CLI's

        before = tmp_path / "before"
        shutil.copytree(service.policies, before)
        after = tmp_path / "after"
        shutil.copytree(service.policies, after)
        (after / "suggested.yaml").write_text(policy)
        for d in observed:
            argv = check_argv(d)
            assert check(capsys, before, argv)["verdict"] == "deny", d
            assert check(capsys, after, argv)["verdict"] == "allow", (d, policy)
        # Exactly what was observed: a host nobody asked for stays denied.
        never = ["--principal", CART["principal"], "--host", "api.never-asked.leng.com"]
        assert check(capsys, after, never)["verdict"] == "deny"


def page_text_free(text: str) -> str:
    """The policy must be plain text (what the <pre> showed), nothing added."""
    assert "<" not in text.replace("<none>", ""), text
    return text


def check_argv(d: dict[str, Any]) -> list[str]:
    argv = ["--principal", d["principal"], "--port", str(d["port"])]
    if d["protocol"] == "HTTP":
        return [*argv, "--host", d["http_host"], "--protocol", "http",
                "--method", d["method"], "--path", d["path"]]  # fmt: skip
    return [*argv, "--host", d["sni"]]


def check(capsys: pytest.CaptureFixture[str], policies: Path, argv: list[str]) -> dict[str, Any]:
    capsys.readouterr()
    main(["check", "--policies", str(policies), "-o", "json", *argv])
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


class TestHostileText:
    def test_html_in_host_path_and_sni_renders_as_text(
        self, page: Any, service: Service, traffic: dict[str, str]
    ) -> None:
        """A decision whose Host, path and SNI carry HTML and script shows them as
        literal text in the table, the explanation and the namespace view: no payload
        runs (window.__xss stays unset), none becomes an element, and the CSP never
        had to block anything."""
        from playwright.sync_api import expect

        ids = [
            service.check(host=XSS_HOST, port=80, path=XSS_PATH, **CART),
            service.check(host="hooks.kadath.io", port=80, path=XSS_PATH, **ANALYTICS),
            service.check(sni=XSS_SNI, **CART),
        ]
        page.goto(service.admin_url + "/")
        expect_live(page)
        for decision_id in ids:
            expect(row(page, decision_id)).to_be_visible()
        expect(row(page, ids[0]).locator("td.dest")).to_contain_text(XSS_HOST)
        expect(row(page, ids[0]).locator("td.dest")).to_contain_text(XSS_PATH)
        expect(row(page, ids[2]).locator("td.dest")).to_contain_text(XSS_SNI)

        row(page, ids[1]).locator("td.time").click()
        expect(page.locator("#detail dl").last).to_contain_text(XSS_PATH)
        row(page, ids[0]).locator("td.time").click()
        expect(page.locator("#detail")).to_contain_text(XSS_HOST)

        page.goto(service.admin_url + "/?view=namespace&ns=shop")
        expect(page.locator("#ns-groups tbody")).to_contain_text(XSS_HOST)
        expect(page.locator("#ns-policy")).to_contain_text("kind: ConfigMap")

        assert page.evaluate("window.__xss") is None
        assert page.evaluate("document.querySelectorAll('img, [onerror], [onload]').length") == 0
        assert page.evaluate("document.scripts.length") == 1  # /ui/app.js, nothing else
        assert page.evaluate("window.__csp") == []


class TestStreamInterrupted:
    def test_the_page_recovers_when_the_stream_is_cut_and_restored(
        self, page: Any, service: Service, traffic: dict[str, str]
    ) -> None:
        """Cut the connection between browser and admin endpoint: the page says it is
        reconnecting; once the network is back it is live again, shows what was decided
        while it was cut, and keeps streaming."""
        from playwright.sync_api import expect

        port = int(service.admin_url.rsplit(":", 1)[1])
        proxy = CuttableProxy(("127.0.0.1", port))
        proxy.restore()
        try:
            page.goto(proxy.url + "/")
            expect_live(page)
            first = service.check(sni="cut-1.leng.com", **CART)
            expect(row(page, first)).to_be_visible()

            proxy.cut()
            expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
            during = service.check(sni="cut-2.leng.com", **CART)
            proxy.restore()
            expect_live(page)
            expect(row(page, during)).to_be_visible()
            after = service.check(sni="cut-3.leng.com", **CART)
            expect(row(page, after)).to_be_visible()
            expect(row(page, first)).to_have_count(1)  # nothing doubled by the refetch
        finally:
            proxy.cut()
