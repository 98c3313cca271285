"""Token counting: offline encodings and an exact incremental counter."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from greyfox._tokens import IncrementalCounter, KnownCounts, encoding_name_for, estimate_prompt_tokens, load_encodings

CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus.txt")


@pytest.fixture(scope="module")
def encodings(tmp_path_factory):
    return load_encodings(str(tmp_path_factory.mktemp("tiktoken")))


def test_encodings_load_offline_from_the_package(encodings):
    # The machine has no network: this only passes because the files ship with GreyFox.
    assert encodings["cl100k_base"].n_vocab == 100277
    assert encodings["o200k_base"].encode_ordinary("hello world") == [24912, 2375]


def test_encoding_per_model():
    assert encoding_name_for("gpt-4o-mini") == "o200k_base"
    assert encoding_name_for("gpt-4.1-nano") == "o200k_base"
    assert encoding_name_for("gpt-5") == "o200k_base"
    assert encoding_name_for("o3-mini") == "o200k_base"
    assert encoding_name_for("openai/gpt-4o") == "o200k_base"
    assert encoding_name_for("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name_for("text-embedding-3-small") == "cl100k_base"
    assert encoding_name_for("deepseek-chat") == "cl100k_base"


texts = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \n\t\r'.,!?-_:;0123456789")),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=40), name=st.sampled_from(["cl100k_base", "o200k_base"]))
def test_incremental_count_equals_the_joined_count_for_any_chunking(encodings, text, cuts, name):
    enc = encodings[name]
    cuts = sorted({c for c in cuts if c <= len(text)})
    counter = IncrementalCounter(enc)
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        counter.feed(text[a:b])
    assert counter.total == len(enc.encode_ordinary(text))


def test_incremental_count_on_the_corpus_in_small_chunks(encodings):
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    for enc in encodings.values():
        counter = IncrementalCounter(enc)
        for i in range(0, len(text), 5):
            counter.feed(text[i : i + 5])
        assert counter.total == len(enc.encode_ordinary(text))


def test_special_token_text_is_counted_as_text(encodings):
    enc = encodings["cl100k_base"]
    counter = IncrementalCounter(enc)
    counter.feed("say <|endoftext|> now")
    assert counter.total == len(enc.encode_ordinary("say <|endoftext|> now"))


def test_without_an_encoding_the_count_is_rough_but_not_zero():
    counter = IncrementalCounter(None)
    counter.feed("x" * 40)
    assert counter.total == 10


def test_prompt_estimate_for_chat_matches_openai_accounting(encodings):
    enc = encodings["o200k_base"]
    body = {"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}
    expected = 3 + len(enc.encode_ordinary("Be brief.")) + 3 + len(enc.encode_ordinary("Hello there")) + 3
    assert estimate_prompt_tokens(enc, body) == expected
    assert estimate_prompt_tokens(enc, {"input": ["a b", "c"]}) == len(enc.encode_ordinary("a b")) + 1


class Spy:
    """An encoding that records what it was asked to encode."""

    def __init__(self, enc):
        self.enc, self.name, self.encoded = enc, enc.name, []

    def encode_ordinary(self, text):
        self.encoded.append(text)
        return self.enc.encode_ordinary(text)


def test_an_agent_conversation_resent_each_turn_is_tokenized_once_per_message(encodings):
    enc = encodings["o200k_base"]
    with open(CORPUS, encoding="utf-8") as f:
        corpus = f.read()
    turns = [f"Turn {i}. {corpus}" for i in range(4)]  # long messages (~2,800 characters), as agents send
    spy, known = Spy(enc), KnownCounts()
    messages = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        body = {"model": "gpt-4o", "messages": list(messages)}
        fresh = estimate_prompt_tokens(enc, body, known=KnownCounts(max_chars=0))  # nothing remembered
        assert estimate_prompt_tokens(spy, body, known=known) == fresh
    assert spy.encoded == turns  # each message once, not 1 + 2 + 3 + 4 times


def test_remembered_texts_are_bounded_and_the_oldest_go_first(encodings):
    enc = encodings["cl100k_base"]
    spy, known = Spy(enc), KnownCounts(max_chars=2000)
    texts = [("%d " % i) * 400 for i in range(3)]  # 800 characters each: the third pushes the first out
    for text in texts:
        known.count(spy, text)
    assert known.chars <= 2000
    spy.encoded.clear()
    assert known.count(spy, texts[2]) == len(enc.encode_ordinary(texts[2])) and spy.encoded == []  # still known
    known.count(spy, texts[0])
    assert spy.encoded == [texts[0]]  # forgotten: counted again
    short = "short text"
    known.count(spy, short)
    known.count(spy, short)
    assert spy.encoded.count(short) == 2  # short texts are not kept


def test_a_counter_without_an_encoding_yet_is_exact_once_it_arrives(encodings):
    """A stream that starts while the tokenizers load is counted roughly meanwhile,
    then exactly, its earlier text included, once the encoding is known."""
    enc = encodings["o200k_base"]
    text = "Counting before the tokenizer loads, then after: 12345 émoji 😀 and more words."
    pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
    loaded: list[object] = [None]
    counter = IncrementalCounter(None, resolve=lambda: loaded[0])
    for piece in pieces[:6]:
        counter.feed(piece)
    assert not counter.exact and counter.total == (len("".join(pieces[:6])) + 3) // 4
    loaded[0] = enc
    for piece in pieces[6:]:
        counter.feed(piece)
    assert counter.exact and counter.total == len(enc.encode_ordinary(text))
    late = IncrementalCounter(None)
    for piece in pieces:
        late.feed(piece)
    late.resolve(enc)
    assert late.exact and late.total == len(enc.encode_ordinary(text))


def nested_parts(depth: int) -> object:
    content: object = "deep"
    for _ in range(depth):
        content = [{"content": content}]
    return content


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "assistant", "tool_calls": [{"function": "not an object"}, "nor this", {"function": None}]}]},
        {"messages": [{"role": "user", "content": [{"content": [{"content": "x"}]}]}]},
        {"messages": [{"role": "user", "content": nested_parts(5000)}]},
    ],
    ids=["tool-call-not-an-object", "nested-parts", "deeply-nested-parts"],
)
def test_prompt_estimate_takes_any_shape_of_body(encodings, body):
    assert estimate_prompt_tokens(encodings["cl100k_base"], body) >= 6
