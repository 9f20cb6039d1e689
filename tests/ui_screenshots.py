"""Regenerate the decision viewer's screenshots in docs/ (README, "Reading decisions").

    .venv/bin/python -m tests.ui_screenshots

Runs a real `serve` with the example policies, sends a few Checks like the
demo's, and photographs the three views with Debian's Chromium.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.ui_harness import (
    ANALYTICS,
    CART,
    CHROMIUM_ARGS,
    ROOT,
    WAIT_MS,
    chromium_path,
    running_serve,
)

DOCS = ROOT / "docs"


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    path = chromium_path()
    if path is None:
        raise SystemExit("no Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp, running_serve(Path(tmp)) as svc:
        svc.check(sni="api.kadath.io", **CART)
        deny = svc.check(sni="api.leng.com", **CART)
        svc.check(sni="api.kadath.io", port=8443, **CART)
        svc.check(sni="api.stealyourmoney.com", **CART)
        svc.check(host="hooks.kadath.io", port=80, path="/v2/events", **ANALYTICS)
        svc.check(host="hooks.kadath.io", port=80, method="POST", path="/v1/orders", **CART)
        svc.check(sni="status.kadath.io", **CART)
        svc.check(sni="api.kadath.io", **CART)
        svc.check(host="hooks.kadath.io", port=80, path="/v1/events", **ANALYTICS)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 560})
            page.set_default_timeout(WAIT_MS)
            page.goto(svc.admin_url + "/")
            expect(page.locator("#status")).to_have_attribute("data-state", "live")
            expect(page.locator("#decisions tbody tr")).to_have_count(9)
            page.screenshot(path=str(DOCS / "ui-decisions.png"))
            page.locator(f'#decisions tbody tr[data-id="{deny}"] td.reason').click()
            expect(page.locator("#detail .reason-code")).to_be_visible()
            page.set_viewport_size({"width": 1400, "height": 900})
            page.screenshot(path=str(DOCS / "ui-explain.png"))
            page.goto(svc.admin_url + "/?view=namespace&ns=shop")
            expect(page.locator("#ns-policy")).to_contain_text("kind: ConfigMap")
            page.screenshot(path=str(DOCS / "ui-namespace.png"), full_page=True)
            browser.close()
    print("wrote", *(DOCS / f"ui-{n}.png" for n in ("decisions", "explain", "namespace")))


if __name__ == "__main__":
    main()
