"""Content hashes, normalization, prompt keys, and the content-hash split."""

from __future__ import annotations

from skytune.core.data.records import (
    content_hash,
    dedup_keys,
    is_val,
    normalize,
    order_key,
)


def prompt_key(record: dict) -> int:
    return dedup_keys(record)[0]


def normalized_key(record: dict) -> int:
    return dedup_keys(record)[1]


def conv(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_content_hash_depends_on_content_only() -> None:
    a = conv("q", "a")
    b = {"messages": [{"content": "q", "role": "user"}, {"role": "assistant", "content": "a"}]}
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(conv("q", "b"))


def test_normalization_ignores_case_punctuation_space_and_unicode_form() -> None:
    assert normalize("  Hello   WORLD!\n") == "hello world"
    assert normalize("ﬁne café") == normalize("fine CAFÉ")
    assert normalize("What is 12+3?") != normalize("What is 123?")  # inner punctuation carries meaning
    assert normalized_key(conv("Hello world!", "Hi.")) == normalized_key(conv("hello  world", "hi"))
    assert normalized_key(conv("hello world", "hi")) != normalized_key(conv("hello world", "bye"))


def test_prompt_key_ignores_the_answer() -> None:
    assert prompt_key(conv("What is 2+2?", "4")) == prompt_key(conv("what is 2+2", "Four."))
    assert prompt_key(conv("What is 2+2?", "4")) != prompt_key(conv("What is 22?", "22"))
    preference = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [], "rejected": []}
    assert prompt_key(preference) == prompt_key(conv("What is 2+2?", "4"))


def test_split_is_stable_when_rows_are_added() -> None:
    keys = [prompt_key(conv(str(i), "x")) for i in range(2000)]
    before = {k: is_val(k, 0.2, seed=7) for k in keys[:1000]}
    after = {k: is_val(k, 0.2, seed=7) for k in keys}
    assert all(after[k] == v for k, v in before.items())
    assert 0.15 < sum(after.values()) / len(after) < 0.25
    assert {k: is_val(k, 0.2, seed=8) for k in keys} != after  # the seed salts the split


def test_order_key_is_a_seeded_shuffle() -> None:
    ids = [f"{i:04d}" for i in range(100)]
    assert sorted(ids, key=lambda i: order_key(1, i)) == sorted(reversed(ids), key=lambda i: order_key(1, i))
    assert sorted(ids, key=lambda i: order_key(1, i)) != sorted(ids, key=lambda i: order_key(2, i))
