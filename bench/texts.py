"""Benchmark inputs: texts of an exact token length, text files, corpora and query/positive pairs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mrl.runtime.errors import InvalidInputError
from mrl.runtime.tokenize import TextTokenizer

# Plain English prose written for this benchmark: real words tokenise like real text (unlike
# repeated filler), and the varied starting points below give every text in a batch different ids.
PASSAGE = """\
The river runs slowly past the old mill, where the water wheel has not turned for many years.
In the spring the fields on both banks fill with wild flowers, and children walk along the path
to school while their parents talk about the weather, the price of bread and the new bridge that
the town council promised last winter. A small library stands at the corner of the market square.
Its shelves hold books about history, science, cooking, travel and the lives of famous people.
Every Thursday evening a group of neighbours meets there to read poems aloud and to argue about
which novel deserves a place on the list for next month. The librarian keeps a notebook of every
suggestion, and she writes the titles in careful handwriting on a board beside the door. Further
down the road the baker opens his shop before sunrise. He makes round loaves with a hard crust,
sweet rolls with raisins, and thin biscuits that travellers buy for long journeys by train. The
station is a short walk from the bakery, and the first train leaves for the city at six o'clock.
Engineers who work in the city say that the journey gives them time to think about difficult
problems: how to measure the speed of a machine honestly, how to compare two designs fairly, and
how to explain a result so that another person can repeat it and find the same answer. They
agree that a single measurement means little, that many repetitions and a careful record of the
conditions matter more than a clever method, and that the slowest requests often tell the most
interesting story. In the evening the train returns, the lights come on in the square, and the
river keeps running past the mill towards the sea, carrying leaves, branches and the reflections
of the houses on its quiet surface until the morning comes again.
"""
WORDS = PASSAGE.split()


@dataclass(frozen=True, kw_only=True)
class Pair:
    """A labelled retrieval example: a query and the one document that answers it."""

    query: str
    positive: str


def texts_of_length(tokenizer: TextTokenizer, n_tokens: int, count: int) -> list[str]:
    """`count` different texts that each tokenise to exactly `n_tokens` tokens, special tokens included."""
    specials = len(tokenizer.encode([""])[0].ids)
    if n_tokens <= specials:
        raise InvalidInputError(f"seq len {n_tokens} leaves no room beside {specials} special tokens")
    if n_tokens > tokenizer.max_length:
        raise InvalidInputError(f"seq len {n_tokens} is above the model's max length of {tokenizer.max_length}")
    cost = {w: len(e.ids) - specials for w, e in zip(WORDS, tokenizer.encode(WORDS), strict=True)}
    texts = []
    for i in range(count):
        texts.append(_text_with_tokens(tokenizer, n_tokens, start=(i * 11) % len(WORDS), cost=cost))
    return texts


def _text_with_tokens(tokenizer: TextTokenizer, n_tokens: int, *, start: int, cost: dict[str, int]) -> str:
    # Greedy fill by per-word token counts, then check with the real tokenizer and top up or trim
    # one token at a time: counts need not add up exactly for every tokenizer.
    budget = n_tokens - len(tokenizer.encode([""])[0].ids)
    words: list[str] = []
    i = start
    for _ in range(4 * n_tokens + len(WORDS)):
        if budget <= 0:
            break
        word = WORDS[i % len(WORDS)]
        i += 1
        if 0 < cost[word] <= budget:
            words.append(word)
            budget -= cost[word]
    for _ in range(2 * n_tokens):
        actual = len(tokenizer.encode([" ".join(words)])[0].ids)
        if actual == n_tokens:
            break
        if actual < n_tokens:
            words.append("the")
        else:
            words.pop()
    return " ".join(words)


def read_lines(path: Path, *, what: str = "text file") -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"cannot read {what} {path}: {e}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise InvalidInputError(f"{what} {path} holds no non-empty lines")
    return lines


def read_pairs(path: Path) -> list[Pair]:
    """Query/positive pairs from JSONL, one `{"query": ..., "positive": ...}` object a line."""
    pairs = []
    for n, line in enumerate(read_lines(path, what="pairs file"), start=1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path} line {n} is not JSON: {e.msg}") from None
        if not (
            isinstance(data, dict) and isinstance(data.get("query"), str) and isinstance(data.get("positive"), str)
        ):
            raise InvalidInputError(f'{path} line {n} needs string fields "query" and "positive"')
        pairs.append(Pair(query=data["query"], positive=data["positive"]))
    return pairs


def cycle(texts: Sequence[str], count: int, offset: int = 0) -> list[str]:
    """`count` texts taken in order from `texts`, starting at `offset` and wrapping around."""
    if not texts:
        raise InvalidInputError("no texts to take from")
    return [texts[(offset + i) % len(texts)] for i in range(count)]


def passage_sentences() -> list[str]:
    """The built-in passage cut into its sentences: a default set of request texts (about 10-40 words each)."""
    flat = " ".join(PASSAGE.split())
    return [s.strip() + "." for s in flat.split(".") if s.strip()]
