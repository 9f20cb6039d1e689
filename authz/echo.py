"""Quoting hostile input in messages, bounded: the one helper every error message uses.

A value echoed into an error, a log line or a Kubernetes Event came from a
namespace owner or a pod. `repr()` of it is unbounded (and, for a structure
sharing subtrees, exponential), so every echo goes through `shown`.
"""

from __future__ import annotations

import reprlib
from typing import Any

MAX_ECHO = 80  # characters of one echoed value

_REPR = reprlib.Repr()
# A few items of the first two levels are enough to recognise a value; the
# rest becomes '...'. Set attribute by attribute: Python 3.11 takes no kwargs.
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4
_REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxarray = 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_ECHO


def shown(value: Any, *, limit: int = MAX_ECHO, quote: bool = True) -> str:
    """`value` for a message: repr-quoted (or plain with quote=False), at most ~`limit`
    characters, with '...' where it was cut. Costs O(limit) whatever `value` is."""
    if isinstance(value, str):
        cut = value[:limit]
        text = repr(cut) if quote else cut
        return text + "..." if len(value) > limit else text
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<a number of about {int(value.bit_length() * 0.30103)} digits>"
    text = _REPR.repr(value)
    return text[:limit] + "..." if len(text) > limit else text
