"""Long texts in bounded memory: a text cut into pieces at white space, and texts grouped into
batches of bounded size, so that no tokenizer (training or encoding) ever holds a whole long
row. A tokenizer's work on a text costs ~100 bytes per character (its encodings, alignments and
offsets): one 50 MB row took 8-16 GB whole, a few MB in pieces.

A piece ends where white space follows a character that is not white space, so the next piece
starts with that white space: byte-level (GPT-2 style) and metaspace pre-tokenizers split there
anyway (a pre-token never spans such a point), so the pieces tokenize as the whole text does."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

PIECE = 1 << 16  # characters: a piece is about this long (at most twice)
BATCH = 1 << 20  # characters: a batch of pieces given to the tokenizer at once is about this
_CUT = re.compile(r"(?<=\S)\s")


def pieces(text: str, size: int = PIECE) -> Iterator[str]:
    """`text` as consecutive pieces of `size` to 2 * `size` characters, each but the last ending
    before white space that follows a non-space character (where there is such a point within
    that range; otherwise at `size`). A text of at most 2 * `size` characters is one piece."""
    start, n = 0, len(text)
    while n - start > 2 * size:
        found = _CUT.search(text, start + size, start + 2 * size)
        end = found.start() if found else start + size
        yield text[start:end]
        start = end
    yield text[start:]


def batches(items: Iterable[tuple[int, str]], size: int = BATCH) -> Iterator[list[tuple[int, str]]]:
    """`items` ((row, piece) pairs) in consecutive lists of about `size` characters in all."""
    batch: list[tuple[int, str]] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item[1])
        if chars >= size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
