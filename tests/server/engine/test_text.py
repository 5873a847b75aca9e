"""TextAssembler: text deltas from tokens, incomplete characters held back, stop strings cut."""

from __future__ import annotations

import pytest

from matlora.testing import build_tiny_tokenizer
from server.engine.text import TextAssembler


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def feed(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    """Add ``text`` one byte-token at a time; return every delta (the last from ``finish``)."""
    assembler = TextAssembler(tokenizer, stop)
    deltas = []
    for token_id in tokenizer(text, add_special_tokens=False).input_ids:
        deltas.append(assembler.add_token(token_id))
        if assembler.stopped:
            break
    deltas.append(assembler.finish())
    return deltas, assembler


def test_deltas_join_to_text(tokenizer) -> None:
    deltas, assembler = feed(tokenizer, "hello world")

    assert "".join(deltas) == "hello world"
    assert assembler.text == "hello world"
    assert deltas[:3] == ["h", "e", "l"]


def test_split_character_held_until_complete(tokenizer) -> None:
    deltas, assembler = feed(tokenizer, "café!")

    assert deltas == ["c", "a", "f", "", "é", "!", ""]
    assert assembler.text == "café!"


def test_stop_string_cut_and_flagged(tokenizer) -> None:
    deltas, assembler = feed(tokenizer, "hello world", stop=("lo",))

    assert assembler.stopped
    assert assembler.text == "hel"
    assert "".join(deltas) == "hel"


def test_possible_stop_prefix_held_back(tokenizer) -> None:
    assembler = TextAssembler(tokenizer, ("END",))
    ids = tokenizer("abEN", add_special_tokens=False).input_ids

    deltas = [assembler.add_token(token_id) for token_id in ids]

    assert deltas == ["a", "b", "", ""]
    assert assembler.finish() == "EN"  # the generation ended without completing the stop string


def test_stop_string_across_earlier_text(tokenizer) -> None:
    deltas, assembler = feed(tokenizer, "one\n\nUser: two", stop=("\n\nUser:",))

    assert assembler.text == "one"
    assert "".join(deltas) == "one"


def test_earliest_of_several_stops_wins(tokenizer) -> None:
    _, assembler = feed(tokenizer, "a1b2c3", stop=("c3", "b2"))

    assert assembler.text == "a1"


def test_special_tokens_not_in_text(tokenizer) -> None:
    assembler = TextAssembler(tokenizer)
    ids = tokenizer("hi<|im_end|>", add_special_tokens=False).input_ids

    text = "".join(assembler.add_token(token_id) for token_id in ids) + assembler.finish()

    assert text == "hi"
