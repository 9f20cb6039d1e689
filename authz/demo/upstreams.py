"""HTTPS servers on loopback standing in for the demo's external hosts.

Each one holds a certificate for its own name only, so an answer proves the
caller reached *that* host: on the TLS path the app's own TLS ends here (the
gateway only forwarded bytes); on the HTTP path the gateway originated TLS
to it. Each counts the TCP connections it accepted, which is how the demo
shows that a denied call never got out.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from authz.testing.pki import Credential


class StandInHost:
    """`https://<name>/` on 127.0.0.1:<port>: answers 200 with a small JSON echo."""

    def __init__(self, name: str, credential: Credential, port: int = 0) -> None:
        self.name = name
        self.accepts = 0
        self._lock = threading.Lock()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(credential.cert_path, credential.key_path)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = f"stand-in-{name}"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                body = (
                    json.dumps(
                        {
                            "host": name,
                            "method": self.command,
                            "path": self.path,
                            "decision_id": self.headers.get("x-egress-authz-decision-id"),
                        }
                    )
                    + "\n"
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the demo prints its own table

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self) -> tuple[socket.socket, Any]:
                conn, addr = self.socket.accept()
                with stand_in._lock:
                    stand_in.accepts += 1
                # The handshake happens in the handler thread (on first
                # read), so one slow client never blocks the accept loop.
                return ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up mid-handshake is not news here

            def shutdown_request(self, request: Any) -> None:
                # End TLS with a close_notify, as real servers do: without it
                # `openssl s_client` reports "unexpected eof" and exits 1.
                if isinstance(request, ssl.SSLSocket):
                    with contextlib.suppress(OSError, ValueError):
                        request.settimeout(0.5)
                        request.unwrap()
                super().shutdown_request(request)

        self._server = Server(("127.0.0.1", port), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"stand-in-{name}",
            daemon=True,
        )

    def start(self) -> StandInHost:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
