"""Real offline benchmark data: chatterbot-corpus question/answer pairs as a corpus, pairs and request texts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mrl.runtime.errors import BackendUnavailableError, InvalidInputError


@dataclass(frozen=True, kw_only=True)
class CorpusFiles:
    """The files `mrl-bench corpus` writes."""

    corpus: Path
    pairs: Path
    texts: Path
    n_corpus: int
    n_pairs: int
    n_texts: int


def chatterbot_conversations() -> list[list[str]]:
    """Every English conversation in the installed chatterbot-corpus, as lists of utterances."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as e:
        raise BackendUnavailableError(f"needs {e.name}: pip install chatterbot-corpus pyyaml") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            if isinstance(conv, list):
                # YAML reads answers like 1963 as numbers: they are text here.
                conversations.append([" ".join(str(u).split()) for u in conv if str(u).strip()])
    return conversations


def word_count(text: str) -> int:
    """Whitespace-separated words."""
    return len(text.split())


def build_sets(
    conversations: Sequence[Sequence[str]], *, min_words: int = 10, max_words: int = 40
) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """(corpus of unique answers, first question -> first answer pairs, utterances of min..max words).

    The corpus holds answers only, so a question never finds itself in the index it is searched in.
    """
    corpus = list(dict.fromkeys(u for conv in conversations for u in conv[1:]))
    pairs = [{"query": conv[0], "positive": conv[1]} for conv in conversations if len(conv) >= 2]
    every = dict.fromkeys(u for conv in conversations for u in conv)
    texts = [t for t in every if min_words <= word_count(t) <= max_words]
    return corpus, pairs, texts


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_chatterbot(out: Path, *, min_words: int = 10, max_words: int = 40) -> CorpusFiles:
    """Write corpus.txt, pairs.jsonl and texts-MIN-MAX.txt from chatterbot-corpus into `out`."""
    if min_words < 1 or max_words < min_words:
        raise InvalidInputError(f"need 1 <= min words <= max words, got {min_words}..{max_words}")
    corpus, pairs, texts = build_sets(chatterbot_conversations(), min_words=min_words, max_words=max_words)
    out.mkdir(parents=True, exist_ok=True)
    files = CorpusFiles(
        corpus=out / "corpus.txt",
        pairs=out / "pairs.jsonl",
        texts=out / f"texts-{min_words}-{max_words}.txt",
        n_corpus=len(corpus),
        n_pairs=len(pairs),
        n_texts=len(texts),
    )
    _write_lines(files.corpus, corpus)
    _write_lines(files.pairs, (json.dumps(p, ensure_ascii=False) for p in pairs))
    _write_lines(files.texts, texts)
    return files
