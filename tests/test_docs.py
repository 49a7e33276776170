"""The repository's Markdown: every relative link points at a file that exists, every #anchor at a heading."""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Folders that hold no documentation of ours: environments, build output, local artifacts and models.
SKIPPED_DIRS = {"artifacts", "models", "build", "dist", "node_modules", "__pycache__"}

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_CODE_SPAN = re.compile(r"`+[^`\n]*?`+")
# [text](target) and ![alt](target); link text may hold one level of brackets.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root: Path) -> list[Path]:
    """The Markdown files under `root`, leaving out hidden folders, environments and local output."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [
            d for d in subfolders if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(".egg-info")
        ]
        found.extend(Path(folder) / f for f in files if f.endswith(".md"))
    return sorted(found)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    kept = (
        c for c in text.lower() if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a file offers: its headings' slugs (repeats numbered -1, -2, ... as GitHub does) and HTML ids."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(text):
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    found = []
    for number, line in prose_lines(text):
        definition = _REFERENCE_DEF.match(line)
        if definition:
            found.append((number, definition.group(1)))
            continue
        bare = _CODE_SPAN.sub("code", line)
        found.extend((number, target) for target in _INLINE_LINK.findall(bare))
    return found


def broken_links(root: Path) -> list[str]:
    """One line per relative link or #anchor in the Markdown under `root` that does not resolve."""
    problems = []
    cache: dict[Path, set[str]] = {}

    def anchors_of(path: Path) -> set[str]:
        if path not in cache:
            cache[path] = anchors(path.read_text(encoding="utf-8"))
        return cache[path]

    for source in markdown_files(root):
        where = source.relative_to(root)
        for number, target in links(source.read_text(encoding="utf-8")):
            if not target or _SCHEME.match(target) or target.startswith("//"):
                continue  # external: not checked here
            path_part, _, fragment = target.partition("#")
            resolved = (source.parent / path_part).resolve() if path_part else source
            if not resolved.exists():
                problems.append(f"{where}:{number}: {target}: no such file")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors_of(resolved):
                problems.append(f"{where}:{number}: {target}: no heading with anchor #{fragment}")
            elif fragment and resolved.is_dir():
                problems.append(f"{where}:{number}: {target}: an anchor into a folder")
    return problems


def test_every_relative_link_and_anchor_in_the_repository_resolves() -> None:
    assert markdown_files(REPO), "no Markdown found"
    problems = broken_links(REPO)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_and_the_readme_link_each_other() -> None:
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages, "docs/ holds no pages"
    readme = {target.partition("#")[0] for _, target in links((REPO / "README.md").read_text(encoding="utf-8"))}
    unlisted = [p.name for p in pages if f"docs/{p.name}" not in readme]
    assert not unlisted, f"README.md does not link these docs pages: {unlisted}"
    no_way_back = [p.name for p in pages if "](../README.md" not in p.read_text(encoding="utf-8")]
    assert not no_way_back, f"these docs pages do not link back to README.md: {no_way_back}"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        (
            "CPU: fused graphs, int8, one copy of the weights (issue 10)",
            "cpu-fused-graphs-int8-one-copy-of-the-weights-issue-10",
        ),
        ("Serving: 3 layers against 6, and a mix of depths", "serving-3-layers-against-6-and-a-mix-of-depths"),
        ("`mrl-bench serve`: load on a server", "mrl-bench-serve-load-on-a-server"),
        ("Errors and status codes", "errors-and-status-codes"),
        ("Scale out on [Triton](https://example.com)", "scale-out-on-triton"),
        ("Fewer layers: 2D Matryoshka", "fewer-layers-2d-matryoshka"),
        ("mrl_requests_total and friends", "mrl_requests_total-and-friends"),
    ],
)
def test_anchors_are_githubs(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\n## Same\n\n## Same\n\n"
        "[ok](docs/page.md#a-section) [ok](#same-1) [ok](docs/) [`ok`](docs/page.md) [web](https://example.com/x.md)\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#no-such-section) ![img](docs/missing.png)\n"
        "```\n[inside a code block](nowhere.md)\n```\n"
        "`[inside a code span](nowhere.md)`\n\n[ref]: docs/also-missing.md\n"
    )
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## A section\n\n[back](../README.md#top) [wrong](../README.md#bottom)\n"
    )
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "x.md").write_text("[not ours](nowhere.md)\n")

    problems = broken_links(tmp_path)

    assert problems == [
        "README.md:8: docs/missing.md: no such file",
        "README.md:8: docs/page.md#no-such-section: no heading with anchor #no-such-section",
        "README.md:8: docs/missing.png: no such file",
        "README.md:14: docs/also-missing.md: no such file",
        "docs/page.md:5: ../README.md#bottom: no heading with anchor #bottom",
    ]
