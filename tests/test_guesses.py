"""Guess sources for PPD and drafting: prompt lookup and a head's shortlist."""

import torch
from test_strategies import model

from ppd_decode.models.heads import EarlyExitHead
from ppd_decode.runtime.text_guesses import NextTokenLookup, merge_guesses


def _after_latest_earlier(tokens, n):
    """Where the token after the latest earlier occurrence of the last n tokens sits, by scanning (None: none)."""
    tail = tokens[-n:]
    return next((s + n for s in range(len(tokens) - n - 1, -1, -1) if tokens[s:s + n] == tail), None)


def _random_texts(seed: int, vocab: int, count: int = 50, max_len: int = 40):
    """``count`` reproducible random texts: token ids 0..vocab-1, lengths 1..max_len-1."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randint(0, vocab, (int(torch.randint(1, max_len, (1,), generator=g)),), generator=g).tolist()


def _naive(tokens, n_max, limit):
    """The definition: for n = n_max..1, the token after the latest earlier occurrence of the last n tokens."""
    out = []
    for n in range(min(n_max, len(tokens)), 0, -1):
        j = _after_latest_earlier(tokens, n)
        if j is not None and tokens[j] not in out and len(out) < limit:
            out.append(tokens[j])
    return out


def test_lookup_follows_the_latest_longest_match():
    lk = NextTokenLookup(max_ngram=3)
    lk.extend([1, 2, 3, 9, 2, 3, 4, 7, 2, 3])
    assert lk.candidates(1) == [4]  # "2 3" was last followed by 4 (the trigram "7 2 3" never occurred before)
    assert lk.candidates(3) == [4]  # "3" alone was also last followed by 4
    lk.extend([4, 5, 1, 2])
    assert lk.candidates(2) == [3]
    assert NextTokenLookup().candidates(2) == []


def test_lookup_equals_the_definition_on_random_text():
    for tokens in _random_texts(seed=0, vocab=6):
        lk = NextTokenLookup(max_ngram=3)
        for i, t in enumerate(tokens):
            lk.extend([t])
            assert lk.candidates(3) == _naive(tokens[:i + 1], 3, 3)


def _naive_continuation(tokens, n_max, limit):
    """The definition: the tokens after the latest earlier occurrence of the longest suffix (n <= n_max) seen before."""
    for n in range(min(n_max, len(tokens)), 0, -1):
        j = _after_latest_earlier(tokens, n)
        if j is not None:
            return tokens[j:j + limit]
    return []


def test_continuation_copies_what_followed_the_latest_longest_match():
    lk = NextTokenLookup(max_ngram=3)
    lk.extend([1, 2, 3, 9, 2, 3, 4, 7, 2, 3])
    assert lk.continuation(3) == [4, 7, 2]
    assert lk.continuation(10) == [4, 7, 2, 3]  # up to the end of the text
    assert NextTokenLookup().continuation(4) == [] and lk.continuation(0) == []
    for tokens in _random_texts(seed=1, vocab=5):
        lk = NextTokenLookup(max_ngram=3)
        for i, t in enumerate(tokens):
            lk.extend([t])
            assert lk.continuation(4) == _naive_continuation(tokens[:i + 1], 3, 4)
            assert lk.continuation(4)[:1] == lk.candidates(1)  # its first token is the lookup's first guess


def _naive_continuations(tokens, n_max, limit, count, min_match):
    """The definition: per suffix length n (longest first, n >= min_match) seen before, what followed its latest
    earlier occurrence; a continuation that is a prefix of one already listed is left out."""
    out = []
    for n in range(min(n_max, len(tokens)), min_match - 1, -1):
        j = _after_latest_earlier(tokens, n)
        if j is None:
            continue
        if len(out) >= count:
            break
        cont = tokens[j:j + limit]
        if not any(o[:len(cont)] == cont for o in out):
            out.append(cont)
    return out


def test_continuations_list_one_per_suffix_length_and_respect_the_minimum_match():
    lk = NextTokenLookup(max_ngram=3)
    lk.extend([5, 2, 3, 9, 1, 3, 4, 7, 2, 3])  # suffixes seen before: (2, 3) -> 9; (3,) -> 4, latest
    assert lk.continuations(2, 3) == [[9, 1], [4, 7]]
    assert lk.continuations(2, 1) == [[9, 1]]
    assert lk.continuations(2, 3, min_match=2) == [[9, 1]]
    assert lk.continuations(2, 3, min_match=3) == [] and lk.continuation(2, min_match=3) == []
    assert lk.continuation(2, min_match=2) == [9, 1]
    for tokens in _random_texts(seed=3, vocab=4):
        lk = NextTokenLookup(max_ngram=3)
        for i, t in enumerate(tokens):
            lk.extend([t])
            for count, min_match in ((1, 1), (3, 1), (3, 2)):
                got = lk.continuations(4, count, min_match)
                assert got == _naive_continuations(tokens[:i + 1], 3, 4, count, min_match)
                assert got[:1] == ([lk.continuation(4, min_match)] if lk.continuation(4, min_match) else [])


def test_rollback_undoes_a_guessed_extension():
    """Tokens appended on a guess and rolled back leave the index as if they had never been there."""
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        text, guess, real = (torch.randint(0, 5, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
                             for _ in range(3))
        lk, ref = NextTokenLookup(max_ngram=3), NextTokenLookup(max_ngram=3)
        lk.extend(text)
        ref.extend(text + real)
        undo: list = []
        lk.extend(guess, undo)
        assert lk.tokens == text + guess
        lk.rollback(len(text), undo)
        assert undo == [] and lk.tokens == text
        lk.extend(real)
        assert lk.follower == ref.follower and lk.continuation(4) == ref.continuation(4)


def test_merge_keeps_lookup_first_then_the_ranking_without_repeats():
    assert merge_guesses([7], [3, 7, 5, 6], 3) == [7, 3, 5]
    assert merge_guesses([], [3, 7], 2) == [3, 7]
    assert merge_guesses([1, 1, 2], [2, 3], 2) == [1, 2]


def _shortlist_head():
    """A materialised frequent-rows head with trained (random) rows, its rows, the model and some states."""
    m = model(0, 0.3)
    rows = torch.tensor([3, 10, 11, 40, 77, 200])
    head = EarlyExitHead.from_model(m, 2, projection="frequent", rows=rows)
    with torch.no_grad():
        head.row_weight.add_(torch.randn_like(head.row_weight))
    head.materialize()
    return head, rows, m, torch.randn(5, m.config.hidden_size, dtype=torch.float64)


def test_a_shortlist_head_guesses_its_best_shortlisted_tokens():
    head, rows, m, h = _shortlist_head()
    full = head(h)
    want = rows[full[:, rows].topk(2, dim=-1).indices]
    assert torch.equal(head.guess(h, 2), want)
    assert torch.equal(head.guess(h, 7), full.topk(7, dim=-1).indices)  # more than the shortlist: whole vocabulary
    plain = EarlyExitHead.from_model(m, 2)
    assert torch.equal(plain.guess(h, 3), plain(h).topk(3, dim=-1).indices)


def test_a_shortlist_head_ranks_and_weighs_its_shortlist_as_it_guesses():
    """``ranked`` (what token trees branch on): the guesses' ids with the softmax over the shortlist, the head's
    trained candidate softmax; without a shortlist, over the vocabulary."""
    head, rows, m, h = _shortlist_head()
    ids, probs = head.ranked(h, 3)
    assert torch.equal(ids, head.guess(h, 3))
    want = head(h)[:, rows].softmax(-1).topk(3, dim=-1).values
    assert torch.allclose(probs, want.float())
    one, p1 = head.guess_with_confidence(h)
    assert torch.equal(one, ids[:, 0]) and torch.equal(p1, probs[:, 0])
    plain = EarlyExitHead.from_model(m, 2)
    ids, probs = plain.ranked(h, 2)
    assert torch.equal(ids, plain.guess(h, 2))
    assert torch.allclose(probs, plain(h).softmax(-1).topk(2, dim=-1).values.float())

