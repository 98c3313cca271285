"""The body parser: json.loads's results and errors, on a faster path for UTF-8 objects."""

import json

import pytest

from greyfox._json import loads

BODIES = [
    b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
    '{"content":"é ✓ 😀"}'.encode(),
    b'{"a":1}\r\n',  # trailing whitespace
    b' {"a":1}',  # leading whitespace
    b'\xef\xbb\xbf{"a":1}',  # UTF-8 byte order mark
    '{"a":1}'.encode("utf-16-le"),  # starts with "{" too
    b'{"a":"\xed\xa0\x80"}',  # a lone surrogate, as json.loads takes it
    b'{"a":NaN}',
    b"[1, 2]",
    b"{}",
]

BAD = [b'{"a":1}x', b'{"a":1}{"b":2}', b'{"a":', b"{", b'{"a":"\xff"}', b"", b"nope"]


@pytest.mark.parametrize("body", BODIES)
def test_parses_what_json_loads_parses(body):
    assert repr(loads(body)) == repr(json.loads(body))  # (repr: NaN != NaN)


@pytest.mark.parametrize("body", BAD)
def test_fails_as_json_loads_fails(body):
    with pytest.raises(ValueError) as expected:
        json.loads(body)
    with pytest.raises(type(expected.value)) as got:
        loads(body)
    assert str(got.value) == str(expected.value)
