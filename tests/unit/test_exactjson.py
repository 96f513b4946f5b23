"""services.audit.exactjson: orjson's speed, json.loads's values (integers beyond 64 bits stay exact)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.audit.exactjson import loads, may_hold_long_integer

BIG = 123456789012345678901234567890


def test_orjson_alone_would_round_an_integer_beyond_64_bits():
    """Why the module exists: if orjson starts refusing or keeping these, it can be simplified."""
    assert orjson.loads(f"[{BIG}]") != [BIG]


@pytest.mark.parametrize("text, flagged", [
    (f'{{"a": {BIG}}}', True),
    ('{"a":[-9223372036854775809]}', True),               # below int64
    ('{"a": 18446744073709551616}', True),                 # above uint64
    ('{"a": 1, "b": 9223372036854775807}', True),          # 19 digits: a needless detour, never a wrong answer
    ('{"a":\n  12345678901234567890}', True),
    ("12345678901234567890", True),
    ('{"a": 123456789012345678}', False),                 # 18 digits
    ('{"h": "0000000000000000000000000000"}', False),     # a run inside a string, after its quote
    ('{"h": "ab1234567890123456789012"}', False),
    ('{"f": 0.12345678901234567890123}', False),          # a fraction: orjson reads it as json does
    ('{"s": "x:1234567890123456789"}', True),              # looks like a number: a detour
    ('{"h": "0000000000000000000000000000", "n": 12345678901234567890}', True),  # a run in a string, then a number
])
def test_may_hold_long_integer(text, flagged):
    assert may_hold_long_integer(text.encode()) is flagged


def _same(a, b) -> bool:
    """Equal values of the same types (1 == 1.0 and 0.0 == -0.0 in Python; json.dumps tells them apart)."""
    return json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize("text", [
    f'{{"a": {BIG}, "b": [1, 2.5, -0.0, "{BIG}"]}}',
    '{"a": 1e400}',                                        # orjson refuses it; json reads inf
    '{"a": "caf\\u00e9 \\ud83d\\ude00"}',
    '{"a": 1, "a": 2}',
    "[]",
])
def test_loads_reads_what_json_reads(text):
    assert _same(loads(text), json.loads(text))
    assert _same(loads(text.encode()), json.loads(text))


def test_loads_refuses_what_json_refuses():
    with pytest.raises(ValueError):
        loads("{not json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_loads_equals_json_loads_for_any_json(value):
    text = json.dumps(value)
    assert _same(loads(text), json.loads(text))
