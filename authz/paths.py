"""HTTP request paths -> the one form a path prefix is matched against, or None.

A rule's `http.paths` prefix means "only under this path", so the request's
path must be read the way the upstream will read it. Servers disagree
(Tomcat and Spring drop `;params` before resolving `..`; some decode `%2e`
or `%252e` twice, or accept overlong UTF-8), so this module normalizes per
RFC 3986 where every reader agrees, and calls a path ambiguous (None) where
two common readers would reach different resources. An ambiguous path never
matches a prefix: the engine denies it with `path-not-normalized`.

Normalization: the query and fragment are dropped; `%XX` escapes of
unreserved characters are decoded (`%7E` -> `~`), other escapes are kept,
upper-cased; repeated slashes are merged (like Envoy's `merge_slashes`);
`.` and `..` segments are removed (RFC 3986 5.2.4).

Ambiguous: no leading `/`; a raw byte outside RFC 3986's path characters
(space, backslash, control, non-ASCII); a malformed escape; an escaped `/`,
`\\`, NUL or control character; a double escape (`%25` + two hex digits);
escaped bytes that are not valid UTF-8 (overlong `%C0%AE`); a dot segment
that is not written literally (`%2e%2e`, `..;x`, `.;`); `//` next to a `..`
(merging slashes first or not resolves it differently).
"""

from __future__ import annotations

import functools
import re

# RFC 3986 pchar (unreserved, sub-delims, ':' and '@') plus '/': the only raw
# characters a path may hold; '%' is handled separately.
_PCHAR = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
)
_UNRESERVED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX = frozenset("0123456789abcdefABCDEF")
# The fast path: a path of plain characters with nothing to resolve, the
# common case, costs one regex match and no cache entry.
_PLAIN = re.compile(r"/[A-Za-z0-9\-_~!$&'()*+,=:@/.]*\Z")
_SLASHES = re.compile(r"/{2,}")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")


def normalize_path(raw: str) -> str | None:
    """The normalized path of a request's `:path`, or None when it is ambiguous."""
    end = len(raw)
    for stop in ("?", "#"):
        i = raw.find(stop, 0, end)
        if i >= 0:
            end = i
    path = raw[:end] if end < len(raw) else raw
    if _PLAIN.match(path) and "/." not in path and "//" not in path:
        return path
    return _normalize_slow(path)


@functools.lru_cache(maxsize=4096)
def _normalize_slow(path: str) -> str | None:
    if not path.startswith("/"):
        return None
    decoded = _decode(path)
    if decoded is None:
        return None
    segments = decoded.split("/")[1:]
    # Escaped '/' is refused above, so decoding keeps the segments in step.
    for literal, seg in zip(path.split("/")[1:], segments, strict=True):
        # A dot segment must be written as one: '%2e%2e' (some readers do not
        # decode it) and '..;x' (Tomcat and Spring drop ';x' first) are read
        # as '..' by some upstreams and as a name by others.
        bare = seg.replace("%3B", ";").split(";", 1)[0]  # some decode '%3B' first
        if bare in (".", "..") and literal != bare:
            return None
    if "//" in decoded and ".." in segments:
        return None  # '/a//../b' is /a/b merged first, /a/b/.. -> /a/ not
    merged = _SLASHES.sub("/", decoded)
    return _remove_dot_segments(merged)


def _decode(path: str) -> str | None:
    """Decode escapes of unreserved characters, keep the rest upper-cased; None when
    a character or an escape makes the path ambiguous."""
    if "%" not in path:
        return path if all(c in _PCHAR for c in path) else None
    out: list[str] = []
    pending = bytearray()  # escaped bytes >= 0x80, checked as UTF-8 together
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != "%":
            if c not in _PCHAR or not _flush(pending, out):
                return None
            out.append(c)
            i += 1
            continue
        hex2 = path[i + 1 : i + 3]
        if len(hex2) != 2 or not (hex2[0] in _HEX and hex2[1] in _HEX):
            return None
        byte = int(hex2, 16)
        i += 3
        if byte >= 0x80:
            pending.append(byte)
            continue
        if not _flush(pending, out):
            return None
        char = chr(byte)
        if char in _UNRESERVED:
            out.append(char)
        elif byte < 0x20 or byte == 0x7F or char in "/\\":
            return None  # escaped separators and controls: Envoy's escaped-slashes case
        else:
            out.append("%" + hex2.upper())
    if not _flush(pending, out):
        return None
    decoded = "".join(out)
    # '%25' + two hex digits (also spelled '%25%32%65'): decoded twice, it is
    # another escape, which the first decoding could not check.
    return None if _DOUBLE.search(decoded) else decoded


def _flush(pending: bytearray, out: list[str]) -> bool:
    """Emit pending escaped bytes (kept escaped) if they are valid UTF-8."""
    if not pending:
        return True
    try:
        bytes(pending).decode("utf-8")  # strict: overlong and surrogate forms fail
    except UnicodeDecodeError:
        return False
    out.extend(f"%{b:02X}" for b in pending)
    pending.clear()
    return True


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")[1:]
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    tail = "/" if segments and segments[-1] in (".", "..") and out else ""
    return "/" + "/".join(out) + tail
