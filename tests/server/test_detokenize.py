"""Incremental detokenisation (multi-byte characters split over tokens) and stop strings on streamed text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.server.detokenize import IncrementalDetokenizer, StopStrings

TEXTS = ["hello world, héllo wörld", "日本語のテキスト 🙂 emoji", "plain ascii text with spaces"]


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE tokenizer trained here (no download): some tokens hold half of a UTF-8 character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(TEXTS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("text", TEXTS + ["日本 🙂 héllo"])
def test_deltas_add_up_to_the_whole_decode(byte_bpe, text):
    ids = byte_bpe.encode(text) + [byte_bpe.eos_token_id]
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids) or text.isascii()
    detok = IncrementalDetokenizer(byte_bpe)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text  # the EOS is skipped
    assert not any("\ufffd" in d for d in deltas)


def test_a_character_cut_off_at_the_end_is_flushed_as_decoded(byte_bpe):
    ids = byte_bpe.encode("🙂")
    detok = IncrementalDetokenizer(byte_bpe)
    assert detok.add(ids[:1]) == ""
    assert detok.flush() == byte_bpe.decode(ids[:1])


def _stream(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    checker = StopStrings(stops)
    out = ""
    for piece in pieces:
        out += checker.feed(piece)
        if checker.stopped:
            return out, True
    return out + checker.flush(), False


def test_stop_string_split_over_deltas_is_never_sent():
    out, stopped = _stream(["END"], ["abc E", "N", "D more"])
    assert (out, stopped) == ("abc ", True)


def test_earliest_of_several_stop_strings_wins():
    assert _stream(["xyz", "b"], ["a", "bcxyz"]) == ("a", True)


def test_no_stop_string_sends_everything():
    assert _stream(["###"], ["ab#", "#c"]) == ("ab##c", False)


def test_the_first_stop_string_completed_wins_however_the_text_is_split():
    assert _stream(["abcd", "c"], ["abcd"]) == _stream(["abcd", "c"], ["ab", "cd"]) == ("ab", True)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abcEND ", max_size=40),
       stops=st.lists(st.text(alphabet="abcEND", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40)))
def test_streamed_output_is_the_text_before_the_first_completed_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = (text[: min(hits)[1]], True) if hits else (text, False)
    assert _stream(stops, pieces) == expected


def test_stop_strings_are_not_looked_for_before_they_are_armed():
    """An answer short of its min_tokens keeps a stop string it writes (as vLLM); once armed, the next one ends it."""
    stops = StopStrings(["ab"])
    assert stops.feed("xxab", armed=False) == "xxab" and not stops.stopped
    assert stops.feed("yyabzz") == "yy" and stops.stopped and stops.text == "xxabyy"
