"""Batched exact decoding: greedy, and self-speculation whose length is chosen per batch size.

``generate_batch(prompts, max_new_tokens)`` decodes prompts of different lengths together (left padding, per-row
stopping, ``batching.RaggedBatch``); each row is token-identical to that prompt decoded alone with
``model.generate(do_sample=False)``. ``generate(prompt)`` is a batch of one, so both strategies also sit in the
single-prompt exactness tests and benchmark.

Self-speculation drafts the same number of tokens gamma in every row (each row its own tokens), verifies all rows'
blocks in one forward of layers d+1..L that reuses the drafts' cache of layers 1..d, and lets each row keep its
own longest matching prefix. gamma is fixed, or (``draft_tokens="adaptive"``) looked up each step for the live
batch size from a profiled cost model (``profiling/gamma.py``) and the acceptance observed so far, with 0 (plain
greedy) allowed: speculation turns itself off where it does not pay.

A head that reads f(t-1) gets it, row by row, for the first draft of a step: the final normed state of the verified
row that produced that row's current token (unknown after the prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppd_decode.errors import PPDError
from ppd_decode.profiling.gamma import CostModel, profile
from ppd_decode.runtime.ragged import RaggedBatch
from ppd_decode.models.heads import F_PREV, H_D
from ppd_decode.runtime.stack import decoder, embed, final_argmax, num_layers
from ppd_decode.runtime.timing import stopwatch
from ppd_decode.strategies.base import DecodeResult, DecodingStrategy, pick_head, register


class BatchedDecoding(DecodingStrategy):
    """Common loop: subclasses say how many tokens to draft for the live batch (0: a plain greedy step)."""

    batched = True

    layer: int | None = None
    head = None

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        self.max_batch_size = self.config.max_batch_size  # every batched config has one

    def _generate(self, ids, max_new_tokens):
        return self._decode([ids.tolist()], max_new_tokens)[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list, max_new_tokens: int) -> list[DecodeResult]:
        """Decode every prompt (in batches of at most ``max_batch_size``); results in the prompts' order."""
        if not prompts:
            raise PPDError("no prompts given")
        checked = [self.check_request(p, max_new_tokens).tolist() for p in prompts]  # refuse before any work
        out: list[DecodeResult] = []
        for s in range(0, len(checked), self.max_batch_size):
            with stopwatch(self.model.device) as t:
                results = self._decode(checked[s:s + self.max_batch_size], max_new_tokens)
            for r in results:
                r.seconds = t.seconds
            out.extend(results)
        return out

    def gamma_for(self, batch_size: int) -> int:
        raise NotImplementedError

    def observe(self, drafted: int, accepted: torch.Tensor) -> None:
        """Acceptance seen in one step (for policies that learn it)."""

    def _decode(self, prompts: list[list[int]], max_new_tokens: int) -> list[DecodeResult]:
        m, L = self.model, num_layers(self.model)
        batch = RaggedBatch(m, prompts, self.pad)
        results = [self.new_result([], steps=1) for _ in prompts]
        self._finish_rows(batch, results, [[t] for t in batch.cur.tolist()], max_new_tokens)
        reads_prev = getattr(self.head, "reads_prev", False)
        prev = None  # [B, 1, H]: f(t-1) of each row's `cur`, for a head that reads it (unknown after the prefill)
        while batch.size:
            g = self.gamma_for(batch.size)
            dev = batch.cur.device
            if g == 0:
                h = batch.run(embed(m, batch.cur[:, None]), 0, L, batch.pos[:, None])
                target = final_argmax(m, h)  # [B, 1]
                final = h
                accepted = torch.zeros(batch.size, dtype=torch.long, device=dev)
                drafts = target[:, :0]
            else:
                d = self.layer
                tok, hidden, drafted = batch.cur, [], []
                for i in range(g + 1):  # g drafts, then the last draft's own layers 1..d
                    h = batch.run(embed(m, tok[:, None]), 0, d, (batch.pos + i)[:, None], offset=i)
                    hidden.append(h)
                    if i < g:
                        # ranked as the head's guesses are (over its shortlist), f(t-1) for the first draft only
                        known = prev[:, -1] if i == 0 and prev is not None else None
                        tok = self.head.guess(h[:, -1], 1, known)[:, 0]
                        drafted.append(tok)
                drafts = torch.stack(drafted, dim=1)  # [B, g]
                positions = batch.pos[:, None] + torch.arange(g + 1, device=dev)
                final = batch.run(torch.cat(hidden, dim=1), d, L, positions)
                target = final_argmax(m, final)
                accepted = (drafts == target[:, :g]).long().cumprod(dim=1).sum(dim=1)  # longest matching prefix
                self.observe(g, accepted)
            batch.commit(accepted, g + 1)
            batch.cur = target.gather(1, accepted[:, None])[:, 0]
            if reads_prev:  # each row's verified state whose argmax is its new `cur`
                at = accepted[:, None, None].expand(-1, 1, final.shape[-1])
                prev = decoder(m).norm(final.gather(1, at))
            new = []
            for r, (row, a) in enumerate(zip(batch.rows, accepted.tolist())):
                res = results[row]
                res.steps += 1
                res.drafted += g
                res.accepted += a
                new.append(drafts[r, :a].tolist() + [int(batch.cur[r])])
            live = self._finish_rows(batch, results, new, max_new_tokens)
            if prev is not None and live is not None:
                prev = prev[live]
        return results

    def _finish_rows(self, batch: RaggedBatch, results, new: list[list[int]], max_new_tokens: int):
        """Hand each row its new tokens; rows that finished leave the batch. Returns the live rows' indices when
        some left (None when none did)."""
        live = [r for r, (row, toks) in enumerate(zip(batch.rows, new))
                if not self.finish(results[row].tokens, toks, max_new_tokens)]
        if len(live) < batch.size:
            batch.drop(live)
            return live
        return None


@dataclass
class BatchedGreedyConfig:
    max_batch_size: int = 16


@register
class BatchedGreedy(BatchedDecoding):
    """The batched reference: one full forward per step over the live rows."""

    name = "batched_greedy"
    Config = BatchedGreedyConfig

    def gamma_for(self, batch_size: int) -> int:
        return 0




@dataclass
class BatchedSelfSpeculativeConfig:
    layer: int | None = None  # d: the head's layer (default: the only head given)
    draft_tokens: int | str = "adaptive"  # gamma for every batch size, or "adaptive": gamma*(b) from the cost model
    max_draft_tokens: int = 8
    cost_model: str | None = None  # a profiled cost model (JSON); None: profile this machine on first use
    acceptance: float | None = None  # prior per-token acceptance; None: the head's validation top-1, else 0.5
    prior_weight: float = 32.0  # the prior counts as this many drafted tokens
    learn_acceptance: bool = True  # update the acceptance from what the batch accepts
    max_batch_size: int = 16


@register
class BatchedSelfSpeculative(BatchedDecoding):
    name = "batched_self_speculative"
    Config = BatchedSelfSpeculativeConfig
    needs_heads = True
    head_inputs = (H_D, F_PREV)  # f(t-1) for each row's first draft of a step (see above)

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        c = self.config
        self.layer, self.head = pick_head(self, c.layer)
        if c.draft_tokens != "adaptive" and not (isinstance(c.draft_tokens, int) and c.draft_tokens >= 0):
            raise PPDError(f"draft_tokens must be an int >= 0 or 'adaptive', got {c.draft_tokens!r}")
        prior = c.acceptance
        if prior is None:
            prior = float(getattr(self.head, "metrics", {}).get("val_top1_agree", 0.5))
        if not 0.0 <= prior <= 1.0:
            raise PPDError(f"acceptance must be a probability, got {prior}")
        # A Beta-like running estimate: accepted drafts over drafts that were put to the test.
        self.hits, self.trials = prior * c.prior_weight, c.prior_weight
        self.cost: CostModel | None = None
        if c.draft_tokens == "adaptive":
            self.cost = CostModel.load(c.cost_model) if c.cost_model else profile(model, self.head, self.layer)
            if self.cost.layer != self.layer:
                raise PPDError(f"the cost model was profiled for layer {self.cost.layer}, not {self.layer}; "
                               f"profile one for this layer (ppd_decode.profiling.gamma.profile)")
        self.gammas: list[tuple[int, int]] = []  # (live batch size, gamma) per step, for the benchmark

    @property
    def acceptance(self) -> float:
        return self.hits / self.trials

    def gamma_for(self, batch_size: int) -> int:
        c = self.config
        g = c.draft_tokens if self.cost is None else self.cost.best_gamma(batch_size, self.acceptance,
                                                                          c.max_draft_tokens)
        self.gammas.append((batch_size, g))
        return g

    def observe(self, drafted: int, accepted: torch.Tensor) -> None:
        if not self.config.learn_acceptance:
            return
        # Drafts tested per row: the accepted ones plus the first rejected one (if any).
        self.hits += float(accepted.sum())
        self.trials += float(accepted.sum()) + float((accepted < drafted).sum())
