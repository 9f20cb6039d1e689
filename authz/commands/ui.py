"""`egress-authz ui`: the decision viewer in a browser.

The page is served by the admin endpoint itself (authz/ui). Locally this
command checks the endpoint answers and prints the page's URL; with --kube it
port-forwards a local port to the admin port of one ready replica through the
Kubernetes API (the official client's pods/portforward, as `kubectl
port-forward` does) and prints the local URL. The page has no write action.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from . import exits
from .traces import add_server_argument

DEFAULT_NAMESPACE = "egress-authz"
DEFAULT_SELECTOR = "app.kubernetes.io/name=egress-authz"
ADMIN_PORT = 9090  # the chart's ports.admin
_PUMP_CHUNK = 64 * 1024


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ui",
        help="open the decision viewer (a page served by the admin endpoint)",
        description="Print the URL of the decision viewer. With --kube, port-forward to one "
        "replica of the service through the Kubernetes API first, until Ctrl-C.",
    )
    add_server_argument(p)
    p.add_argument("--open", action="store_true", help="also open it in the default browser")
    p.add_argument(
        "--kube", action="store_true", help="port-forward to a replica in the cluster"
    )
    p.add_argument(
        "--namespace", "-n", default=DEFAULT_NAMESPACE, metavar="NS",
        help=f"with --kube: the service's namespace (default {DEFAULT_NAMESPACE})",
    )  # fmt: skip
    p.add_argument(
        "--selector", "-l", default=DEFAULT_SELECTOR, metavar="LABELS",
        help=f"with --kube: the replicas' labels (default {DEFAULT_SELECTOR})",
    )  # fmt: skip
    p.add_argument(
        "--admin-port", type=int, default=ADMIN_PORT, metavar="N",
        help=f"with --kube: the pods' admin port (default {ADMIN_PORT})",
    )  # fmt: skip
    p.add_argument(
        "--local-port", type=int, default=0, metavar="N",
        help="with --kube: the local port on 127.0.0.1 (default: a free one)",
    )  # fmt: skip
    p.add_argument("--kubeconfig", metavar="PATH", help="with --kube: a kubeconfig file")
    p.set_defaults(run=run)


def run(
    args: argparse.Namespace, out: TextIO | None = None, *, stop: threading.Event | None = None
) -> int:
    """Print the page's URL; with --kube, forward until Ctrl-C (or `stop` is set)."""
    out = out or sys.stdout
    if args.kube:
        return _run_kube(args, out, stop or threading.Event())
    from .admin_client import AdminClient

    url = AdminClient(args.server).server + "/"
    problem = probe(url)
    if problem:
        print(f"egress-authz ui: {problem}", file=sys.stderr)
        return exits.NO
    print(url, file=out, flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    return exits.OK


def probe(url: str, timeout: float = 5.0) -> str | None:
    """None when the admin endpoint at `url` serves the page, else what is wrong."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return f"{url} answered {e.code} on /healthz"
    except (urllib.error.URLError, OSError) as e:
        from .admin_client import SERVER_ENV

        return (
            f"cannot reach the admin endpoint at {url}: {getattr(e, 'reason', e)}\n"
            f"Is `egress-authz serve` running there? Pass --server or set {SERVER_ENV}, "
            "or use --kube to port-forward to the cluster."
        )


# ---------------------------------------------------------------------------
# --kube


def pick_pod(pods: list[Any]) -> Any | None:
    """A Running pod whose Ready condition is True, newest first; else None."""

    def ready(pod: Any) -> bool:
        status = pod.status
        conditions = (status.conditions or []) if status else []
        return bool(status and status.phase == "Running") and any(
            c.type == "Ready" and c.status == "True" for c in conditions
        )

    candidates = [p for p in pods if ready(p) and not p.metadata.deletion_timestamp]
    candidates.sort(key=lambda p: (p.metadata.creation_timestamp or 0, p.metadata.name))
    return candidates[-1] if candidates else None


class Forwarder:
    """127.0.0.1:local_port -> one stream per connection from `connect()`.

    `connect` returns a connected socket-like object (the kubernetes client's
    port-forward socket in production); one is opened per browser connection,
    as `kubectl port-forward` does, so a long SSE stream and page loads do not
    share one.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        local_port: int = 0,
        stopping: threading.Event | None = None,
    ) -> None:
        self.connect = connect
        self.listener = socket.create_server(("127.0.0.1", local_port))
        self.stopping = stopping or threading.Event()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def serve_forever(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            remote = self.connect()
        except Exception as e:  # the API refused or the pod went away: drop this one
            print(f"egress-authz ui: port-forward failed: {e}", file=sys.stderr)
            conn.close()
            return
        conn.settimeout(None)
        t = threading.Thread(target=_pump, args=(remote, conn), daemon=True)
        t.start()
        _pump(conn, remote)
        t.join()


def _pump(src: Any, dst: Any) -> None:
    try:
        while data := src.recv(_PUMP_CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _run_kube(args: argparse.Namespace, out: TextIO, stop: threading.Event) -> int:
    from kubernetes import client as k8s
    from kubernetes.stream import portforward

    from ..kube.client import configuration

    try:
        api = k8s.CoreV1Api(k8s.ApiClient(configuration(kubeconfig=args.kubeconfig)))
        pods = api.list_namespaced_pod(args.namespace, label_selector=args.selector).items
    except Exception as e:  # no kubeconfig, API unreachable, RBAC: say which
        print(f"egress-authz ui: cannot list the service's pods: {e}", file=sys.stderr)
        return exits.NO
    pod = pick_pod(pods)
    if pod is None:
        print(
            f"egress-authz ui: no ready pod in namespace {args.namespace} matches "
            f"{args.selector} (of {len(pods)} found)",
            file=sys.stderr,
        )
        return exits.NO
    name, port = pod.metadata.name, args.admin_port

    def connect() -> Any:
        pf = portforward(
            api.connect_get_namespaced_pod_portforward, name, args.namespace, ports=str(port)
        )
        sock = pf.socket(port)
        sock.setblocking(True)
        return sock

    forwarder = Forwarder(connect, args.local_port, stop)
    url = f"http://127.0.0.1:{forwarder.port}/"
    print(
        f"{url}\n(forwarding to pod {args.namespace}/{name} port {port}; "
        "this shows that replica's decisions; Ctrl-C to stop)",
        file=out,
        flush=True,
    )
    if args.open:
        import webbrowser

        webbrowser.open(url)
    try:
        forwarder.serve_forever()
    finally:
        forwarder.stop()
    return exits.OK
