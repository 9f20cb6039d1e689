"""The emulator's pods/portforward: the WebSocket stream `kubectl port-forward`
and the official client's `kubernetes.stream.portforward` speak.

Protocol `v4.channel.k8s.io`: per forwarded port a data channel (0) and an
error channel (1); the server first sends each channel's port number (two
bytes, little-endian), then every binary frame is one channel byte and data.
The emulator connects the stream to the address a test registered for
(namespace, pod, port) in `KubeEmulator.port_forwards`: the "pod" is a real
server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import struct
import threading
from typing import Any

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455
PROTOCOL = "v4.channel.k8s.io"
_BINARY, _CLOSE, _PING, _PONG = 0x2, 0x8, 0x9, 0xA


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def _read_frame(rfile: Any) -> tuple[int, bytes] | None:
    head = rfile.read(2)
    if len(head) < 2:
        return None
    opcode, n = head[0] & 0x0F, head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", rfile.read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", rfile.read(8))[0]
    mask = rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = rfile.read(n)
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def serve(handler: Any, namespace: str, pod: str, query: dict[str, str]) -> int:
    """Answer one portforward upgrade on `handler`; returns the HTTP status sent."""
    ports = [int(p) for p in query.get("ports", "").split(",") if p.isdigit()]
    target = handler.emulator.port_forwards.get((namespace, pod, ports[0])) if ports else None
    if len(ports) != 1 or target is None:
        body = b"no such pod port to forward to"
        handler.send_response(404)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        return 404
    key = handler.headers.get("Sec-WebSocket-Key", "")
    accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
    handler.send_response(101, "Switching Protocols")
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept)
    handler.send_header("Sec-WebSocket-Protocol", PROTOCOL)
    handler.end_headers()
    lock = threading.Lock()
    sock: socket.socket = handler.connection

    def send(opcode: int, payload: bytes) -> None:
        with lock:
            sock.sendall(_frame(opcode, payload))

    port_bytes = struct.pack("<H", ports[0])
    with socket.create_connection(target, timeout=10) as upstream:
        upstream.settimeout(None)
        send(_BINARY, b"\0" + port_bytes)
        send(_BINARY, b"\1" + port_bytes)

        def pump_up() -> None:  # pod -> client
            with contextlib.suppress(OSError):
                while data := upstream.recv(65536):
                    send(_BINARY, b"\0" + data)
                send(_CLOSE, struct.pack("!H", 1000))

        t = threading.Thread(target=pump_up, daemon=True)
        t.start()
        with contextlib.suppress(OSError, struct.error):
            while (got := _read_frame(handler.rfile)) is not None:
                opcode, data = got
                if opcode == _CLOSE:
                    break
                if opcode == _PING:
                    send(_PONG, data)
                elif opcode == _BINARY and data[:1] == b"\0" and len(data) > 1:
                    upstream.sendall(data[1:])
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)
        t.join(5)
    return 101
