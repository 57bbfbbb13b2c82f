"""A deterministic byte-pair-encoding trainer for new-language vocabularies.

Hugging Face ``tokenizers``' trainers number the words and characters they meet in the order of a
randomly seeded hash map and break ties between equally frequent pairs by those numbers, so two
trainings on the same text give different vocabularies (seen here: 373, 367 and 372 WordPiece
pieces from the same 64 Italian captions). A run must be reproducible and resumable, so clipcl learns
the merges itself: the most frequent adjacent pair first, ties to the pair whose two pieces sort
first as strings; the text is normalised and split by the ``tokenizers`` pipeline that will encode
it, and the result is handed back to ``tokenizers`` (``models.BPE`` / ``models.WordPiece``) to encode.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from itertools import pairwise


def concatenate(left: str, right: str) -> str:
    return left + right


def learn_merges(word_counts: dict[tuple[str, ...], int], limit: int,
                 join: Callable[[str, str], str] = concatenate) -> list[tuple[str, str]]:
    """At most ``limit`` merges for words given as symbol tuples with their counts, most frequent pair
    first (ties: the smaller ``(left, right)`` string pair); stops when no pair is left. ``join`` makes
    a merged symbol (WordPiece drops the right one's ``##``)."""
    words = [list(symbols) for symbols in sorted(word_counts)]
    counts = [word_counts[tuple(symbols)] for symbols in words]
    pair_counts: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        for pair in pairwise(symbols):
            pair_counts[pair] += counts[index]
            holders[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < limit:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative or negative == 0:
            continue  # a stale entry: the pair's count changed since it was pushed
        merges.append(pair)
        joined = join(*pair)
        changed: set[tuple[str, str]] = set()
        for index in sorted(holders.pop(pair, ())):
            symbols, count = words[index], counts[index]
            for old in pairwise(symbols):
                pair_counts[old] -= count
                changed.add(old)
            merged, position = [], 0
            while position < len(symbols):
                if position + 1 < len(symbols) and (symbols[position], symbols[position + 1]) == pair:
                    merged.append(joined)
                    position += 2
                else:
                    merged.append(symbols[position])
                    position += 1
            words[index] = merged
            for new in pairwise(merged):
                pair_counts[new] += count
                holders[new].add(index)
                changed.add(new)
        pair_counts.pop(pair, None)
        for touched in changed:
            count = pair_counts.get(touched, 0)
            if count <= 0:
                pair_counts.pop(touched, None)
            elif touched != pair:
                heapq.heappush(heap, (-count, touched))
    return merges


def word_counts(words: Iterable[str], split) -> dict[tuple[str, ...], int]:
    """Each word as its initial symbols (``split(word)``), counted."""
    counted: Counter[tuple[str, ...]] = Counter()
    for word, count in Counter(words).items():
        if word:
            counted[tuple(split(word))] += count
    return dict(counted)


__all__ = ["concatenate", "learn_merges", "word_counts"]
