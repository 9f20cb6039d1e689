"""Loopback stand-ins for the external hosts, recording what reached them.

The gateway's clusters point at these (STATIC 127.0.0.1 ports) instead of
resolving api.kadath.io: tests must never touch DNS or the network. What a
test most wants to know from an upstream is whether anything got through,
so each server counts raw TCP accepts before any TLS or HTTP parsing.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from .pki import Credential


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    client: tuple[str, int]

    @property
    def host(self) -> str:
        return self.headers.get("host", "")


class _Recording:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepts = 0

    def _count_accept(self) -> None:
        with self._lock:
            self.accepts += 1


class HTTPUpstream(_Recording):
    """Plain HTTP/1.1 server answering 200 with a JSON echo of the request.

    The echo lets a client see what the gateway forwarded (Host, the
    decision-id header) without reaching into the server."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.requests: list[SeenRequest] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                seen = SeenRequest(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    client=self.client_address[:2],
                )
                with upstream._lock:
                    upstream.requests.append(seen)
                body = json.dumps(
                    {
                        "upstream": "http",
                        "method": seen.method,
                        "path": seen.path,
                        "headers": seen.headers,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # tests read self.requests, not stderr

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self) -> tuple[socket.socket, Any]:
                conn, addr = super().get_request()
                upstream._count_accept()
                return conn, addr

        self._server = Server((host, port), Handler)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def start(self) -> HTTPUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.accepts = 0

    def __enter__(self) -> HTTPUpstream:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class SeenConnection:
    client: tuple[str, int]
    sni: str | None = None
    received: bytes = b""
    error: str | None = None


@dataclass
class _TLSState:
    connections: list[SeenConnection] = field(default_factory=list)


class TLSUpstream(_Recording):
    """A TLS server for the external host: the app's own end-to-end TLS
    terminates here, after passing through sidecar and gateway untouched.

    Protocol: reads one line, answers `hello <sni>: <line>` and closes."""

    def __init__(self, credential: Credential, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.connections: list[SeenConnection] = []
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(credential.cert_path, credential.key_path)
        self._ctx.sni_callback = self._on_sni
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @staticmethod
    def _on_sni(sslsock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
        sslsock.context_sni = name  # type: ignore[union-attr]

    def start(self) -> TLSUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def clear(self) -> None:
        with self._lock:
            self.connections.clear()
            self.accepts = 0

    def __enter__(self) -> TLSUpstream:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._count_accept()
            threading.Thread(target=self._serve, args=(conn, addr[:2]), daemon=True).start()

    def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        seen = SeenConnection(client=addr)
        with self._lock:
            self.connections.append(seen)
        conn.settimeout(5)
        try:
            with self._ctx.wrap_socket(conn, server_side=True) as tls:
                seen.sni = getattr(tls, "context_sni", None)
                line = b""
                while not line.endswith(b"\n") and len(line) < 4096:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    line += chunk
                seen.received = line
                tls.sendall(b"hello " + (seen.sni or "").encode() + b": " + line)
        except (OSError, ssl.SSLError) as e:
            seen.error = repr(e)
        finally:
            conn.close()
