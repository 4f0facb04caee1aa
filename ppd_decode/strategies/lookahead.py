"""Lookahead decoding (Fu, Bailis, Stoica, Zhang, ICML 2024): exact Jacobi n-gram decoding without a draft model.

One forward per step, after the cached prefix, holds three parts (positions relative to the current token t0 at p):

* t0 and **level 0** of the lookahead window (W-1 tokens at p+1..p+W-1), causal among themselves;
* **levels 1..N-2** (W tokens each): level l, column j sits at p+j+l and sees t0, level 0 up to column j-1 and
  column j of levels 1..l: a contiguous run of positions, so each column is a Jacobi trajectory;
* the **verification branch**: every n-gram the pool holds under t0, or under the last K tokens with
  ``key_tokens=K`` (at most G), each N-1 tokens at p+1..p+N-1,
  causal within itself and seeing t0 only. Lookahead rows never see candidates.

t0's row gives the true next token; the last level's rows give new Jacobi guesses; each column gives one n-gram for
the pool (key: its level-0 token, or t0 for column 0); the window slides by one level. The longest candidate prefix
equal to the model's own argmax chain is accepted with the model's next token; only t0's and those tokens' cache
entries are kept, moved into place. The pool can be seeded with the prompt's n-grams and fed generated ones (helps
QA and summarization, where answers copy the input).

Built from the model's own decoder layers, rotary embedding and cache (``ppd_decode.runtime.stack``): custom 4D masks and
position ids, no patched or copied modelling code (the reference implementation patches transformers 4.36).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ppd_decode.errors import ConfigError
from ppd_decode.runtime.stack import embed, final_argmax, new_cache, num_layers, prefill, run_layers, select_cache
from ppd_decode.strategies.base import DecodingStrategy, Stats, register


@dataclass
class LookaheadConfig:
    # Defaults from the W/N/G/K sweeps on 2 CPU cores (docs/results.md): where every extra row of a forward costs,
    # the best setting runs no Jacobi branch and verifies one 7-token pool n-gram only when the last two tokens
    # match its key; otherwise a step is a plain one-token forward. Where extra rows are nearly free (GPUs) try
    # window=5, ngram=5, max_candidates=5, key_tokens=1 (the reference implementation's).
    window: int = 0  # W: Jacobi columns (0: no lookahead branch, only the pool: prompt and generated n-grams)
    ngram: int = 8  # N: n-gram size (N-1 window levels)
    max_candidates: int = 1  # G: n-grams kept per key, and verified per step
    key_tokens: int = 2  # K: an n-gram is stored under the K tokens ending at its first one (1: the reference)
    seed_from_prompt: bool = True  # start the pool with the prompt's own n-grams
    add_generated: bool = True  # and keep adding the n-grams of the generated text
    seed: int = 0  # the window's initial tokens are drawn from the prompt with this seed


class NgramPool:
    """key -> at most G tuples of N-1 following tokens, least recently used first out. The key is the K tokens ending
    at the n-gram's first token (K = 1: the first token alone, as in the reference); a longer key verifies only
    n-grams whose context matches, which pays where every verified row costs."""

    def __init__(self, n: int, g: int, key_tokens: int = 1):
        self.n, self.g, self.k = n, g, key_tokens
        self.table: dict[tuple[int, ...], OrderedDict] = {}

    def add(self, gram) -> None:
        """``gram``: K-1 tokens of context, then the n-gram's N tokens."""
        key, rest = tuple(int(t) for t in gram[:self.k]), tuple(int(t) for t in gram[self.k:])
        bucket = self.table.setdefault(key, OrderedDict())
        bucket.pop(rest, None)
        bucket[rest] = None  # most recent last
        while len(bucket) > self.g:
            bucket.popitem(last=False)

    def add_sequence(self, tokens: list[int]) -> None:
        w = self.k + self.n - 1
        for i in range(len(tokens) - w + 1):
            self.add(tokens[i:i + w])

    def candidates(self, context) -> list[tuple[int, ...]]:
        """The n-grams stored under the last K tokens of ``context``, most recent first."""
        key = tuple(int(t) for t in context[-self.k:]) if len(context) >= self.k else None
        return list(reversed(self.table.get(key, {})))


def lookahead_layout(p: int, level0: int, levels: int, width: int, cands: int, n1: int):
    """Position ids [q] and the in-block visibility [q, q] (bool) of one step's rows, in the order
    t0, level 0, levels 1..levels, candidates. ``levels`` counts the full levels present (warm-up has fewer)."""
    pos, rows = [p], []  # rows: (kind, level, column)
    rows.append(("t0", 0, 0))
    for c in range(level0):
        pos.append(p + 1 + c)
        rows.append(("lv", 0, c))
    for lv in range(1, levels + 1):
        for j in range(width):
            pos.append(p + j + lv)
            rows.append(("lv", lv, j))
    for i in range(cands):
        for m in range(n1):
            pos.append(p + 1 + m)
            rows.append(("cand", i, m))
    q = len(rows)
    index = {r: i for i, r in enumerate(rows)}
    see = torch.zeros(q, q, dtype=torch.bool)
    for i, (kind, a, b) in enumerate(rows):
        see[i, 0] = True  # everyone sees t0
        if kind == "lv" and a == 0:  # level 0 column b: causal over t0, level 0
            for c in range(b + 1):
                see[i, index[("lv", 0, c)]] = True
        elif kind == "lv":  # level a column b: level 0 up to b-1, then column b of levels 1..a
            for c in range(min(b, level0)):
                see[i, index[("lv", 0, c)]] = True
            for lv in range(1, a + 1):
                see[i, index[("lv", lv, b)]] = True
        elif kind == "cand":
            for m in range(b + 1):
                see[i, index[("cand", a, m)]] = True
    return torch.tensor(pos), see, rows


@dataclass
class LookaheadStats(Stats):
    ngram_hits: int = 0  # steps that accepted at least one token of a verified n-gram


@register
class Lookahead(DecodingStrategy):
    name = "lookahead"
    Stats = LookaheadStats
    Config = LookaheadConfig

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        c = self.config
        if (c.window < 0 or c.ngram < 2 or c.max_candidates < 0 or c.key_tokens < 1
                or (c.window == 0 and c.max_candidates == 0)):
            raise ConfigError(f"lookahead needs window >= 0, ngram >= 2, max_candidates >= 0, key_tokens >= 1 and one "
                              f"of W, G > 0; got W={c.window}, N={c.ngram}, G={c.max_candidates}, K={c.key_tokens}")

    def _generate(self, ids, max_new_tokens):
        m, c, L = self.model, self.config, num_layers(self.model)
        W, N, G, K = c.window, c.ngram, c.max_candidates, c.key_tokens
        prompt = ids.tolist()
        cache = new_cache(m)
        logits = prefill(m, ids, cache)
        cur = int(logits.argmax())
        out: list[int] = []
        res = self.new_result(out, steps=1)
        if self.finish(out, [cur], max_new_tokens):
            return res
        pool = NgramPool(N, G, K)
        if c.seed_from_prompt:
            pool.add_sequence(prompt)
        rng = random.Random(c.seed)
        level0 = [rng.choice(prompt) for _ in range(W - 1)]
        levels: list[list[int]] = []  # levels 1..N-2, filled one per step during warm-up
        n = ids.numel()  # cached positions; cur sits at position n
        while True:
            tail = (prompt[-(K + N):] + out[-(K + N):])[-(K + N):]  # ends with cur
            cands = pool.candidates(tail)[:G] if G else []
            pos, see, rows = lookahead_layout(n, len(level0), len(levels), W, len(cands), N - 1)
            tokens = [cur, *level0, *(t for lv in levels for t in lv), *(t for cd in cands for t in cd)]
            x = embed(m, torch.tensor([tokens], device=ids.device))
            h = run_layers(m, x, 0, L, cache, past=n, position_ids=pos[None].to(ids.device), block_mask=see)
            # Logits only where they are read: t0, the last level's W rows, the candidates.
            last = range(0, W) if not levels or not W else range(1 + len(level0) + W * (len(levels) - 1),
                                                         1 + len(level0) + W * len(levels))
            cand_start = 1 + len(level0) + W * len(levels)
            want = [0, *last, *range(cand_start, len(tokens))]
            pred = dict(zip(want, final_argmax(m, h[0, want]).tolist()))
            # Acceptance: the candidate agreeing longest with the model's own argmax chain.
            best, best_len = None, 0
            for i, cd in enumerate(cands):
                a, prev = 0, pred[0]
                while a < N - 1 and cd[a] == prev:
                    a += 1
                    prev = pred[cand_start + i * (N - 1) + a - 1]
                if a > best_len:
                    best, best_len = i, a
            if best is None:
                emitted, moved = [pred[0]], []
            else:
                base = cand_start + best * (N - 1)
                emitted = list(cands[best][:best_len]) + [pred[base + best_len - 1]]
                moved = [n + base + j for j in range(best_len)]  # the accepted candidate's cache entries
                res.stats.ngram_hits += 1
            res.steps += 1
            res.drafted += len(cands) * (N - 1)
            res.accepted += best_len
            # Jacobi update: new guesses from the last level, n-grams from the columns, then slide.
            new = [pred[r] for r in last]
            if W and len(levels) < N - 2:  # warm-up: the window fills level by level
                levels.append(new)
            elif W:
                seq = tail + level0
                for j in range(W):  # column j's n-gram starts at t0 (j = 0) or at level 0's token j - 1,
                    start = len(tail) - 1 + j  # keyed by the K tokens ending there
                    key = seq[max(0, start - K + 1):start + 1]
                    if len(key) == K:
                        pool.add([*key, *(lv[j] for lv in levels), new[j]])
                if N == 2:
                    level0 = new[1:]
                else:
                    level0 = levels[0][1:]
                    levels = levels[1:] + [new]
            select_cache(cache, n + 1, moved)  # the prefix and t0 stay where they are
            n += 1 + len(moved)
            if c.add_generated:  # the n-grams that end in the new tokens
                pool.add_sequence(tail[-(K + N - 2):] + emitted)
            if self.finish(out, emitted, max_new_tokens):
                return res
            cur = emitted[-1]
