"""What `egress-authz demo --keep-running` prints: commands to try by hand.

The commands are built as argument lists first (tests/test_demo.py runs
them) and shell-quoted only for printing.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .scenario import ANALYTICS, CART, KADATH, LENG
from .stack import DemoStack


@dataclass(frozen=True)
class Example:
    what: str
    argv: tuple[str, ...]
    stdin: str | None = None  # piped in, printed as `printf ... |`

    def shell(self) -> str:
        cmd = shlex.join(self.argv)
        if self.stdin is None:
            return cmd
        return f"printf {shlex.quote(self.stdin)} | {cmd}"


def examples(stack: DemoStack) -> list[Example]:
    ca = str(stack.ca_path)
    cart_tls, cart_http, _ = stack.ports.sidecars[CART.name]
    analytics = stack.identity(ANALYTICS)
    return [
        Example(
            f"{CART.workload} -> https://{LENG} (the app's own TLS via its sidecar): allowed",
            ("curl", "-sS", "--noproxy", "*", "--cacert", ca,
             "--connect-to", f"{LENG}:443:127.0.0.1:{cart_tls}", f"https://{LENG}/"),
        ),
        Example(
            f"{CART.workload} -> https://{KADATH}: denied, the connection is closed",
            ("curl", "-sS", "--noproxy", "*", "--cacert", ca,
             "--connect-to", f"{KADATH}:443:127.0.0.1:{cart_tls}", f"https://{KADATH}/"),
        ),
        Example(
            f"{CART.workload} -> http://{KADATH} (plain HTTP via its sidecar): 403 and why",
            ("curl", "-sS", "--noproxy", "*", "--connect-to", f"{KADATH}:80:127.0.0.1:{cart_http}",
             f"http://{KADATH}/"),
        ),
        Example(
            f"the same TLS call with openssl, as {CART.workload}",
            ("openssl", "s_client", "-quiet", "-verify_return_error", "-CAfile", ca,
             "-connect", f"127.0.0.1:{cart_tls}", "-servername", LENG),
            stdin=f"GET / HTTP/1.0\\r\\nHost: {LENG}\\r\\n\\r\\n",
        ),
        Example(
            f"as the sidecar of {ANALYTICS.workload}: mTLS with its certificate, from its pod "
            f"IP, straight to the gateway's HTTP listener (-k: the gateway is named by a "
            f"SPIFFE id, which curl cannot check)",
            ("curl", "-sS", "--noproxy", "*", "-k", "--interface", ANALYTICS.ip,
             "--cert", str(analytics.cert_path), "--key", str(analytics.key_path),
             "--connect-to", f"{KADATH}:443:127.0.0.1:{stack.ports.gateway_http}",
             f"https://{KADATH}/v1/events"),
        ),
    ]


def cli_command() -> str:
    """`egress-authz` as a fresh shell can run it: the script installed beside
    this Python (a venv's bin/ is rarely on PATH), else `python -m authz`."""
    script = Path(sys.executable).parent / "egress-authz"
    if script.is_file():
        return shlex.quote(str(script))
    return shlex.join([sys.executable, "-m", "authz"])


def instructions(stack: DemoStack, decision_id: str | None = None) -> str:
    p = stack.ports
    cli = cli_command()
    lines = [
        "The demo keeps running; Ctrl-C stops everything it started.",
        "",
        "Policies (edit them: the service reloads the directory within a second):",
        *(f"  {f}" for f in sorted(stack.policy_dir.glob("*.yaml"))),
        f"Pods (source IP -> namespace, service account, labels): {stack.workloads_file}",
        f"The gateway listens on 127.0.0.1:{p.gateway_tls} (TLS, for 443) and "
        f":{p.gateway_http} (HTTP, for 80); serve --gateway-port-map judges them as 443 and 80.",
        "",
    ]
    for ex in examples(stack):
        lines += [f"# {ex.what}", ex.shell(), ""]
    lines += [
        "# Try a live edit: in shop-policy.yaml add api.kadath.io to the hosts of",
        "# finance-to-leng, save (this console then says whether the reload was accepted),",
        "# and run the second command again.",
        "",
        "# Decisions so far, then live (Ctrl-C stops it), and why one was made (ids are in",
        "# every 403 body and in `traces -o json`):",
        f"export EGRESS_AUTHZ_SERVER={stack.admin_url}",
        f"{cli} traces",
        f"{cli} traces --follow",
        f"{cli} explain {decision_id or 'DECISION_ID'}",
        "",
        "# The same decisions in a browser, live, with explanations and suggested policies",
        "# (`egress-authz ui` prints this URL):",
        f"{stack.admin_url}/",
        "",
        f"Logs: {stack.service_log}, {stack.access_log}, Envoys under {stack.workdir}",
    ]
    if stack.removes_files:
        lines.append("(all of it is removed when the demo stops; --workdir DIR keeps it)")
    return "\n".join(lines)
