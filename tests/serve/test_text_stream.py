"""The serving engine's detokenizer: text released only once it cannot change, stop strings held
back, the same text as one whole decode (real byte-level and Metaspace tokenizers), a few tokens per decode."""

import pytest
import torch

from lorakit.serve.text_stream import TextStream


class PieceTokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids)


def test_text_stream_holds_back_possible_stop_strings():
    stream = TextStream(PieceTokenizer({1: "Hel", 2: "lo", 3: " wor", 4: "ld"}), stop=("lo w",))
    assert stream.push(1) == "He"        # "l" may start "lo w"
    assert stream.push(2) == "l"         # "lo" may too
    assert stream.push(3) == "" and stream.stopped
    assert stream.flush() == ""          # the answer is "Hel"

    stream = TextStream(PieceTokenizer({1: "Hel", 2: "lo", 3: "!"}), stop=("lo w",))
    assert stream.push(1) + stream.push(2) + stream.push(3) == "Hello!" and not stream.stopped


def test_text_stream_holds_back_incomplete_characters():
    bytes_of = {1: "ab", 2: "\ufffd", 3: "é"}  # a byte-level tokenizer shows half a character as U+FFFD

    class Utf8:
        def decode(self, ids, **_):
            text = "".join(bytes_of[i] for i in ids)
            return text.replace("\ufffdé", "é")

    stream = TextStream(Utf8())
    assert stream.push(1) == "ab"
    assert stream.push(2) == ""
    assert stream.push(3) == "é"
    assert stream.flush() == ""


def trained_tokenizer(kind):
    """A small real tokenizer, trained here: byte-level BPE (GPT-2 style, a character may span
    tokens) or Metaspace BPE (SentencePiece style, "▁" marks a word's leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the happy moon sings to the café", "naïve señor déjà vu", "emoji 🙂 and 日本語 text", "a b c"] * 20
    core = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytes":
        core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                                         special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")


@pytest.mark.parametrize("kind", ["bytes", "metaspace"])
def test_text_stream_equals_a_whole_decode_at_a_bounded_cost(kind):
    tokenizer = trained_tokenizer(kind)
    lengths = []

    class Counting:  # the tokenizer, noting how many ids each decode gets
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    text = "the happy moon sings: déjà vu 🙂 日本語, naïve señor! " * 30
    g = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, len(tokenizer), (300,), generator=g).tolist()  # any order, halves of characters
    for ids in (tokenizer(text)["input_ids"], random_ids):
        stream = TextStream(Counting())
        lengths.clear()
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert len(ids) >= 300 and max(lengths) <= 16  # a few tokens per decode, not the whole answer


def test_text_stream_special_tokens_mid_stream_and_a_stop_string_by_a_split_character():
    tokenizer = trained_tokenizer("bytes")
    eos = tokenizer.convert_tokens_to_ids("</s>")
    ids = tokenizer("déjà vu 🙂 ok")["input_ids"]
    ids = ids[:3] + [eos] + ids[3:5] + [eos, eos] + ids[5:]  # special tokens between (and inside) characters
    stream = TextStream(tokenizer)
    streamed = "".join(stream.push(i) for i in ids) + stream.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == "déjà vu 🙂 ok"
    assert len(tokenizer("🙂")["input_ids"]) > 1  # the emoji spans tokens: the stop string starts mid-character
    stream = TextStream(tokenizer, stop=("🙂 ok",))
    pieces = [stream.push(i) for i in tokenizer("vu 🙂 ok then")["input_ids"]]
    assert "".join(pieces) + stream.flush() == "vu " and stream.stopped


def test_text_stream_goes_on_when_the_tokenizer_rewrites_earlier_text():
    class Rewriting:  # "b" after "a" turns the "a" into "A" (a decode that changes released text)
        def decode(self, ids, **_):
            text = "".join("ab"[i] for i in ids)
            return text.replace("ab", "Ab")

    stream = TextStream(Rewriting())
    assert stream.push(0) == "a"
    assert stream.push(1) == "b"  # "a" was released already; the stream goes on from where they agree
    assert stream.push(0) + stream.push(0) + stream.flush() == "aa"
