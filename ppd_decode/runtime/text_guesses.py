"""Where guesses for the next token come from, besides an early-exit head: the text itself.

Prompt lookup (Saxena 2023; transformers' ``prompt_lookup_num_tokens``): if the last n tokens occurred before, the
token that followed them then is a good guess now. Answers copy their passage (SQuAD), summaries their article
(CNN/DM), and this model's translations copy much of their source (WMT15). On these tasks the lookup alone guesses
the greedy token more often than a middle-layer head, and leading the head's guesses it raises the share of
positions where one of k guesses is right (the measurements: docs/benchmarks/guess_sources*.md, docs/results.md).

A guess never decides what is emitted, so any source keeps decoding exact.
"""

from __future__ import annotations


class NextTokenLookup:
    """An incremental n-gram index over a growing token sequence: for every n-gram (n <= ``max_ngram``), the position
    after its latest occurrence that has a follower. ``candidates`` answers in O(max_ngram), however long the text."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.n = max_ngram
        self.tokens: list[int] = []
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it last

    def extend(self, tokens, undo: list | None = None) -> None:
        """Append ``tokens``; with an ``undo`` list, record what is overwritten so ``rollback`` can take them back
        (tokens appended on a guess that may prove wrong)."""
        for t in tokens:
            j = len(self.tokens)  # t's index: it follows every n-gram that ends at j - 1
            for n in range(1, min(self.n, j) + 1):
                key = tuple(self.tokens[j - n:j])
                if undo is not None:
                    undo.append((key, self.follower.get(key)))
                self.follower[key] = j
            self.tokens.append(int(t))

    def rollback(self, length: int, undo: list) -> None:
        """Back to the sequence's first ``length`` tokens, undoing the ``extend(..., undo)`` calls since then."""
        for key, old in reversed(undo):
            if old is None:
                self.follower.pop(key, None)
            else:
                self.follower[key] = old
        undo.clear()
        del self.tokens[length:]

    def _followers(self):
        """For the sequence's suffixes seen before, longest first: (the suffix's length, the index of the token that
        followed its latest earlier occurrence)."""
        for n in range(min(self.n, len(self.tokens)), 0, -1):
            j = self.follower.get(tuple(self.tokens[-n:]))
            if j is not None and j < len(self.tokens):
                yield n, j

    def candidates(self, limit: int = 1) -> list[int]:
        """Up to ``limit`` distinct guesses for the token after the sequence: the follower of its longest suffix
        seen before first, then of shorter suffixes."""
        out: list[int] = []
        for _, j in self._followers():
            if len(out) >= limit:
                break
            if self.tokens[j] not in out:
                out.append(self.tokens[j])
        return out

    def continuation(self, limit: int, min_match: int = 1) -> list[int]:
        """Up to ``limit`` tokens guessed to come next: what followed the latest earlier occurrence of the sequence's
        longest suffix seen before (prompt lookup's draft; empty when no suffix of at least ``min_match`` tokens
        occurred before)."""
        n, j = next(self._followers(), (0, None))
        return [] if j is None or n < min_match else self.tokens[j:j + limit]

    def continuations(self, limit: int, count: int, min_match: int = 1) -> list[list[int]]:
        """Up to ``count`` different continuations (each up to ``limit`` tokens), one per suffix length seen before
        (at least ``min_match`` tokens), longest suffix first; none that is a prefix of one already listed."""
        out: list[list[int]] = []
        for n, j in self._followers():
            if len(out) >= count or n < min_match:
                break
            cont = self.tokens[j:j + limit]
            if cont and not any(o[:len(cont)] == cont for o in out):
                out.append(cont)
        return out


def merge_guesses(first: list[int], ranked, k: int) -> list[int]:
    """``first`` (deduplicated, at most k), then the ``ranked`` ids not yet present, up to k guesses in all."""
    out: list[int] = []
    for t in list(first)[:k] + [int(x) for x in ranked]:
        if len(out) >= k:
            break
        if t not in out:
            out.append(t)
    return out
