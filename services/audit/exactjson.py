"""orjson where it reads JSON to exactly the values json.loads does.

orjson parses in a third of json's time, but it reads an integer beyond 64 bits as a (rounded)
float where json.loads keeps the exact int. The audit log must keep what was sent, and the timeline
must read the same values however it is built, so such JSON goes the slow, exact way.
"""

from __future__ import annotations

import json

import orjson

_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_DIGITS = b"0" * 19  # every integer beyond 64 bits has 19 digits or more
_BEFORE_A_NUMBER = frozenset(b":,[ \t\r\n")  # what may precede a JSON number (after its minus sign)


def may_hold_long_integer(data: bytes) -> bool:
    """Whether the JSON text may hold an integer orjson cannot keep exact.

    Looks for 19 digits in a row where a number may start: after `:`, `,`, `[` or whitespace (and an
    optional minus sign), or at the very start. A run inside a string (a hex digest) is mostly
    preceded by something else and skipped; when it is not, the answer is a needless detour, never
    a wrong one. About 2 us for 1 kB of JSON, most of it one bytes.translate."""
    digits = data.translate(_DIGITS_TO_ZERO)
    at = digits.find(_NINETEEN_DIGITS)
    while at != -1:  # `at` starts a run of digits: the leftmost match, or the first after the last run
        before = at - 1
        if before >= 0 and data[before] == 0x2D:  # '-'
            before -= 1
        if before < 0 or data[before] in _BEFORE_A_NUMBER:
            return True
        rest = digits[at:]
        at = digits.find(_NINETEEN_DIGITS, at + len(rest) - len(rest.lstrip(b"0")))  # past this run
    return False


def loads(text: str | bytes):
    """json.loads's values: by orjson, unless the text may hold an integer beyond 64 bits or orjson
    refuses it (e.g. a number too large for a double, which json reads as inf)."""
    data = text.encode() if isinstance(text, str) else text
    if not may_hold_long_integer(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
