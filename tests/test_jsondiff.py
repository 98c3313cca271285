"""Explaining a replay miss: the nearest recorded request and its differing JSON paths."""

from __future__ import annotations

from hypothesis import given, strategies as st

from greyfox._jsondiff import ABSENT, Difference, differences, distance, nearest

CHAT = {"model": "gpt-4o-mini", "temperature": 0, "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello"},
]}


def changed(doc, **fields):
    return dict(doc, **fields)


def test_a_changed_message_is_named_by_its_path_with_old_and_new_values():
    new = changed(CHAT, messages=[CHAT["messages"][0], {"role": "user", "content": "Say goodbye"}])
    [d] = differences(CHAT, new)
    assert d.path == "messages[1].content"
    assert d.line() == 'messages[1].content: "Say hello" → "Say goodbye"'


def test_numbers_and_types_are_compared_as_json():
    assert [d.line() for d in differences(CHAT, changed(CHAT, temperature=0.2))] == ["temperature: 0 → 0.2"]
    assert differences({"n": 1}, {"n": True}) == [Difference("n", 1, True)]
    assert differences({"n": 1}, {"n": 1.0}) == [Difference("n", 1, 1.0)]


def test_added_and_removed_fields_and_elements_say_absent():
    new = dict(CHAT, seed=7)
    del new["temperature"]
    lines = [d.line() for d in differences(CHAT, new)]
    assert lines == ["seed: (absent) → 7", "temperature: 0 → (absent)"]
    more = changed(CHAT, messages=CHAT["messages"] + [{"role": "user", "content": "again"}])
    assert [d.line() for d in differences(CHAT, more)] == ['messages[2]: (absent) → {"content":"again","role":"user"}']


def test_keys_that_are_not_names_are_quoted():
    [d] = differences({"a b": {"x-y": 1}}, {"a b": {"x-y": 2}})
    assert d.path == '["a b"]["x-y"]'


def test_long_strings_are_cut_around_the_first_difference():
    base = "You are a careful assistant. " * 10
    old, new = base + "Answer in French.", base + "Answer in German."
    line = Difference("messages[0].content", old, new).line()
    assert "French" in line and "German" in line
    assert len(line) < 150
    assert line.count("…") == 2  # each value starts cut; both end at the string's end


def test_nearest_prefers_the_fewest_differences_and_the_first_of_equals():
    one_change = changed(CHAT, temperature=1)
    two_changes = changed(CHAT, temperature=1, seed=3)
    name, diffs = nearest(CHAT, [("far", two_changes), ("near", one_change), ("near-too", changed(CHAT, seed=1))])
    assert name == "near"
    assert [d.path for d in diffs] == ["temperature"]
    assert nearest(CHAT, []) is None


def test_a_whole_new_message_weighs_its_leaves():
    """Adding a message is further away than changing one word of one."""
    added = changed(CHAT, messages=CHAT["messages"] + [{"role": "user", "content": "x"}])
    reworded = changed(CHAT, messages=[CHAT["messages"][0], {"role": "user", "content": "Say hi"}])
    assert distance(CHAT, added) == 2 > distance(CHAT, reworded) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


@given(json_values, json_values)
def test_no_differences_exactly_when_equal_as_json(a, b):
    import json

    equal = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert (differences(a, b) == []) == equal
    assert differences(a, a) == []
    assert all(d.old is not ABSENT or d.new is not ABSENT for d in differences(a, b))
