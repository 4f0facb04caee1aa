"""Self-speculative decoding with our early-exit heads (exact).

Draft ``gamma`` tokens with layers 1..d plus the head for layer d, then verify them with one forward of layers
d+1..L over all drafts at once. The drafts' KV entries for layers 1..d are already in the cache, so verification
never recomputes those layers: it starts from the layer-d hidden states the draft left behind (LayerSkip's cache
reuse). The longest prefix equal to the final layer's argmax is kept, plus the final layer's next token, so the
output is the model's greedy output. ``gamma`` adapts to the observed acceptance.

With ``lookup=True`` a step first tries a draft copied from the text (prompt lookup: what followed the latest earlier
occurrence of the last 1-3 tokens, ``NextTokenLookup.continuation``). Such a draft costs nothing to make, so it is
verified by one forward of the whole model over the current token and the draft; where the text offers none, the
head drafts as above. Each source keeps its own adaptive draft length and its own counts.

Text drafts are tuned by three settings: ``lookup_min_match`` (draft only where the text's match is at least this many
tokens long: a one-token match is often a poor guess, and a verification block costs more than a one-token
step), ``lookup_tokens`` (a fixed draft length instead of the adaptive one) and ``lookup_candidates`` (up to this many
different continuations, one per matching suffix length, verified together as a token tree in one forward:
``token_tree``; the longest root path equal to the final layer's argmax chain is accepted).

With ``head_branch=True`` the head also checks the text's drafts: the block runs layers 1..d first, the head reads
cur's layer-d state there, and where it is at least ``head_branch_confidence`` sure of a token other than the text's
first draft, that token joins the block as a second branch (a sibling of the first draft; its own layers 1..d see
the prefix and cur only), verified in the same pass of layers d+1..L. The final layer picks at most one of them,
so the output stays greedy's; a copied draft that the head disagrees with no longer costs the head its turn.

A block head (``h_d_prefix``) reads the layer-d states of the accepted text through its own KV cache
(``HeadContext``): every verification is run as layers 1..d, then d+1..L (the same products), so the layer-d state
of every accepted position reaches the head, whichever source drafted it; the prompt's come from the prefill.

A verification block of 2 or 3 rows is padded to ``min_block`` rows (``stack.pad_block``): on a CPU with MKL's plain
weights that is cheaper than the block itself (with the stack's packed weights, the default, it measured no
different). Text drafts fill the padding with more copied tokens where the text
has them (they are free to make); the head's drafts are not extended (each costs layers 1..d), so theirs is padded
with rows that are cropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppd_decode.errors import ConfigError
from ppd_decode.runtime.stack import (
    crop_cache,
    decoder,
    embed,
    final_argmax,
    new_cache,
    num_layers,
    pad_block,
    prefill,
    run_layers,
    select_cache,
)
from ppd_decode.models.features import layer_outputs
from ppd_decode.models.heads import F_PREV, H_D, H_PREFIX
from ppd_decode.runtime.text_guesses import NextTokenLookup
from ppd_decode.runtime.token_tree import Tree, accepted_path, accepted_prefix, tree_mask
from ppd_decode.strategies.base import DecodingStrategy, Stats, pick_head, register


@dataclass
class SelfSpeculativeConfig:
    layer: int | None = None  # d: the head's layer (default: the only head given)
    draft_tokens: int = 4  # initial gamma
    max_draft_tokens: int = 16
    adaptive: bool = True  # +2 after a fully accepted draft, -1 otherwise (transformers' heuristic)
    lookup: bool = False  # drafts copied from the text first, the head's where the text has none (see above)
    # A head draft stops at the first token the head gives less than this probability (Kangaroo's early stop);
    # with none left the step is a plain greedy one. 0: always draft the adaptive length.
    min_confidence: float = 0.0
    # Verification blocks of 2..min_block-1 rows are padded to min_block rows (1: never): cheaper on a CPU (see above).
    min_block: int = 4
    lookup_min_match: int = 1  # text drafts only where the last this-many tokens occurred before (see above)
    lookup_tokens: int = 0  # text drafts of this many tokens (0: the adaptive length)
    lookup_candidates: int = 1  # several text continuations verified as one token tree (see above)
    lookup_tree_rows: int = 8  # such a tree's rows at most (cur included): later continuations are cut short
    head_branch: bool = False  # the head's guess as a second branch beside a copied draft it disagrees with
    head_branch_confidence: float = 0.5  # ... where it is at least this sure of it (see above)


@dataclass
class SelfSpeculativeStats(Stats):
    lookup_drafted: int = 0  # drafted tokens copied from the text (the rest came from the head)
    lookup_accepted: int = 0
    lookup_trees: int = 0  # steps whose text drafts were verified as a token tree of continuations
    lookup_branch_wins: int = 0  # ... where a continuation other than the first was accepted
    head_branches: int = 0  # steps where the head's guess joined the text's block as a second branch
    head_branch_wins: int = 0  # ... and was the greedy token


@register
class SelfSpeculative(DecodingStrategy):
    name = "self_speculative"
    Config = SelfSpeculativeConfig
    Stats = SelfSpeculativeStats
    needs_heads = True
    # f(t-1) for the first draft token of a step: the verified row that produced cur; the layer-d states of the
    # accepted text for a block head
    head_inputs = (H_D, F_PREV, H_PREFIX)

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        c = self.config
        self.layer, self.head = pick_head(self, c.layer)
        if c.draft_tokens < 1 or c.max_draft_tokens < c.draft_tokens:
            raise ConfigError(f"need 1 <= draft_tokens <= max_draft_tokens, got {c.draft_tokens} and {c.max_draft_tokens}")
        if c.min_block < 1:
            raise ConfigError("min_block must be >= 1 (1: no padding)")
        if c.lookup_min_match < 1 or c.lookup_tokens < 0 or c.lookup_candidates < 1 or c.lookup_tree_rows < 2:
            raise ConfigError("need lookup_min_match >= 1, lookup_tokens >= 0, lookup_candidates >= 1 and "
                              "lookup_tree_rows >= 2")
        if c.head_branch and not (c.lookup and c.lookup_candidates == 1 and self.head.block is None):
            raise ConfigError("head_branch sets the head's guess beside one copied draft: it needs lookup=true, "
                              "lookup_candidates=1 and a head without a decoder block. Fix: head_branch=false, or those")
        if not 0 <= c.head_branch_confidence <= 1:
            raise ConfigError(f"head_branch_confidence is a probability; got {c.head_branch_confidence}")

    def _generate(self, ids, max_new_tokens):
        m, L, c = self.model, num_layers(self.model), self.config
        cache = new_cache(m)
        ctx = self.head.context()
        logits = self._prefill(ids, cache, ctx)
        cur = int(logits.argmax())
        out: list[int] = []
        res = self.new_result(out, steps=1)
        if self.finish(out, [cur], max_new_tokens):
            return res
        n = ids.numel()  # every layer caches positions 0..n-1; `cur` sits at position n
        # f(n-1), the final normed state that produced `cur`, for a head that reads it (unknown after the prefill)
        prev = None
        reads_prev = self.head.reads_prev
        gamma = lookup_gamma = c.draft_tokens
        text = NextTokenLookup()
        if c.lookup:
            text.extend(ids.tolist() + [cur])
        while True:
            room = max_new_tokens - len(out) - 1  # never draft past max_new_tokens
            # (copied drafts are free: fill what a padded block would hold anyway)
            lookup_limit = min(max(c.lookup_tokens or lookup_gamma, c.min_block - 1), room)
            conts = text.continuations(lookup_limit, c.lookup_candidates, c.lookup_min_match) if c.lookup else []
            copied = bool(conts)
            if copied and len(conts) > 1:
                drafts, new, g, last = self._verify_tree(cache, cur, conts, n, ids.device, ctx)
                a = text_a = len(drafts)
                res.stats.lookup_trees += 1
                res.stats.lookup_branch_wins += bool(a and drafts != conts[0][:a])
            elif copied and c.head_branch:
                drafts = conts[0]
                g, (new, last, branched, won) = len(drafts), self._text_block_with_head(cache, cur, drafts, n,
                                                                                         ids.device, prev)
                a = len(new) - 1
                res.stats.head_branches += branched
                res.stats.head_branch_wins += won
                res.drafted += branched  # the head's one drafted token (the text's are counted below)
                text_a = 0 if won else a  # what the text's drafts earned
            else:
                if copied:
                    drafts = conts[0]
                    block = torch.tensor([[cur] + drafts], device=ids.device)
                    x = pad_block(embed(m, block), c.min_block)
                    if self.head.block is None:
                        at_d, verify = None, run_layers(m, x, 0, L, cache, past=n)
                    else:  # (a block head reads the accepted rows' layer-d states: stop there on the way)
                        at_d = run_layers(m, x, 0, self.layer, cache, past=n)
                        verify = run_layers(m, at_d, self.layer, L, cache, past=n)
                else:
                    drafts, verify = self._head_drafts(cache, cur, max(0, min(gamma, room)), n, ids.device, prev, ctx)
                    at_d = None  # (the head read every drafted row's layer-d state already)
                g = len(drafts)
                new, last = self._accept(cache, drafts, final_argmax(m, verify[:, :g + 1])[0].tolist(), verify, n)
                a = text_a = len(new) - 1
                if at_d is not None:
                    ctx.read(at_d[:, :a + 1], n)  # cur and the accepted drafts, for a block head
            res.steps += 1
            res.drafted += g
            res.accepted += a
            if copied:
                res.stats.lookup_drafted += g
                res.stats.lookup_accepted += text_a
            n += a + 1  # cur and the accepted drafts are now in the cache, in every layer
            if self.finish(out, new, max_new_tokens):
                return res
            if c.lookup:
                text.extend(new)
            cur = new[-1]
            if reads_prev:
                prev = decoder(m).norm(last)  # the row whose argmax is the new `cur`
            if c.adaptive:
                g_max = max(map(len, conts)) if copied else g
                if copied and not c.lookup_tokens and g_max == lookup_limit:  # grow from what was drafted,
                    lookup_gamma = self._adapt(g_max if text_a == g_max else lookup_gamma, text_a == g_max)  # or own
                elif not copied and g == gamma:  # (a draft cut short by low confidence says nothing of gamma)
                    gamma = self._adapt(gamma, a == g)

    def _prefill(self, ids, cache, ctx):
        """The prompt into ``cache``, its last position's logits; a block head reads the prompt's layer-d states
        (taken from the prefill itself by a hook, so the prefill is the one ``generate`` runs)."""
        if self.head.block is None:
            return prefill(self.model, ids, cache)
        with layer_outputs(self.model, [self.layer], {}) as seen:
            logits = prefill(self.model, ids, cache)
        ctx.read(seen[self.layer], 0)
        return logits

    def _adapt(self, length: int, all_accepted: bool) -> int:
        return min(length + 2, self.config.max_draft_tokens) if all_accepted else max(1, length - 1)

    def _verify_tree(self, cache, cur: int, conts: list[list[int]], n: int, dev,
                     ctx) -> tuple[list[int], list[int], int]:
        """Verify several continuations of ``cur`` as one token tree through the whole model (shared prefixes
        merged). Returns the accepted drafts, the new tokens (those plus the final layer's next token) and how many
        tokens were drafted; the cache keeps ``cur`` and the accepted path only."""
        m, L = self.model, num_layers(self.model)
        tree = Tree()
        tree.add(cur, -1, 1.0)
        for cont in conts:
            node = 0
            for t in cont:
                child = next((i for i in range(1, len(tree.tokens)) if tree.parent[i] == node and tree.tokens[i] == t),
                             None)
                if child is None:
                    if len(tree.tokens) >= self.config.lookup_tree_rows:  # the block is full: cut this one short
                        break
                    child = tree.add(t, node, 1.0)
                node = child
        drafted = len(tree.tokens) - 1
        while len(tree.tokens) < self.config.min_block:  # padding rows (see pad_block): any draft keeps it exact
            tree.add(tree.tokens[-1], len(tree.tokens) - 1, 0.0)
        nodes = list(range(len(tree.tokens)))
        pos = torch.tensor([[n + x for x in tree.depth]], device=dev)
        mask = tree_mask(tree.ancestors(nodes), nodes, n, m.dtype, dev)
        x = embed(m, torch.tensor([tree.tokens], device=dev))
        at_d = None
        if self.head.block is not None:  # (it reads the accepted path's layer-d states: stop there on the way)
            x = at_d = run_layers(m, x, 0, self.layer, cache, position_ids=pos, attention_mask=mask)
        h = run_layers(m, x, 0 if at_d is None else self.layer, L, cache, position_ids=pos, attention_mask=mask)
        target = dict(zip(nodes, final_argmax(m, h)[0].tolist()))
        path = accepted_path(tree, nodes, target)
        if at_d is not None:
            ctx.read(at_d[:, path], n)  # the accepted path (cur first)
        select_cache(cache, n, [n + i for i in path])
        drafts = [tree.tokens[i] for i in path[1:]]
        return drafts, drafts + [target[path[-1]]], drafted, h[:, path[-1]]

    def _text_block_with_head(self, cache, cur: int, drafts: list[int], n: int, dev,
                              prev: torch.Tensor | None) -> tuple[list[int], torch.Tensor, bool, bool]:
        """Verify ``cur`` and the copied ``drafts``, with the head's guess for the token after ``cur`` as a second
        branch where it is sure of another token than ``drafts[0]`` (``head_branch``). Returns the new tokens (the
        accepted drafts, or the branch's token, then the final layer's next token), the hidden state whose argmax is
        the last of them, whether a branch was added and whether it was accepted; the cache keeps ``cur`` and the
        accepted path only."""
        m, d, L, c = self.model, self.layer, num_layers(self.model), self.config
        x = pad_block(embed(m, torch.tensor([[cur] + drafts], device=dev)), c.min_block)
        q, g = x.shape[1], len(drafts)
        at_d = run_layers(m, x, 0, d, cache, past=n)
        guess, conf = self.head.guess_with_confidence(at_d[:, 0], prev)
        h = int(guess)
        if h == drafts[0] or float(conf) < c.head_branch_confidence:
            verify = run_layers(m, at_d, d, L, cache, past=n)
            return *self._accept(cache, drafts, final_argmax(m, verify[:, :g + 1])[0].tolist(), verify, n), False, False
        # Column q (after the block's rows and padding) is the branch, at cur's position + 1: in layers 1..d it sees
        # the prefix and cur; in d+1..L the block's rows see each other causally and the branch sees cur and itself.
        see = torch.ones(q + 1, q + 1, dtype=torch.bool).tril()
        see[q, 1:q] = False
        branch_d = run_layers(m, embed(m, torch.tensor([[h]], device=dev)), 0, d, cache,
                              position_ids=torch.tensor([[n + 1]], device=dev),
                              attention_mask=tree_mask(see, [q], n, m.dtype, dev))
        pos = torch.tensor([list(range(n, n + q)) + [n + 1]], device=dev)
        verify = run_layers(m, torch.cat([at_d, branch_d], dim=1), d, L, cache, position_ids=pos,
                            attention_mask=tree_mask(see, list(range(q + 1)), n, m.dtype, dev))
        target = final_argmax(m, verify)[0].tolist()
        if target[0] == h:  # the branch is greedy's next token (so the first draft, another token, is not)
            select_cache(cache, n, [n, n + q])
            return [h, target[q]], verify[:, q], True, True
        return *self._accept(cache, drafts, target[:g + 1], verify, n), True, False  # (the branch is cropped)

    @staticmethod
    def _accept(cache, drafts: list[int], target: list[int], verify: torch.Tensor,
                n: int) -> tuple[list[int], torch.Tensor]:
        """A verified chain (``target[i]``: the greedy token after ``cur`` and i drafts): the new tokens (the
        accepted drafts and the final layer's next one) and the hidden state of the last; the cache keeps ``cur`` and
        the accepted drafts."""
        a = accepted_prefix(drafts, target)
        crop_cache(cache, n + a + 1)
        return drafts[:a] + [target[a]], verify[:, a]

    def _head_drafts(self, cache, cur: int, g: int, n: int, device, prev: torch.Tensor | None,
                     ctx) -> tuple[list[int], torch.Tensor]:
        """Up to ``g`` tokens drafted by layers 1..d and the head (fewer where its confidence drops below
        ``min_confidence``), then layers d+1..L over ``cur`` and the drafts (whose layers 1..d are already cached):
        the drafts and the verifying hidden states. ``prev`` (f(t-1) of ``cur``, for a head that reads it) is known
        for the first draft only: the later ones follow drafts the final layer has not run yet. Every row's layer-d
        state goes through ``ctx`` (a block head's cache; the last too, which is accepted when all drafts are)."""
        m, d, L = self.model, self.layer, num_layers(self.model)
        drafts, hidden = [], []
        tok = cur
        while True:
            h = run_layers(m, embed(m, torch.tensor([[tok]], device=device)), 0, d, cache)
            hidden.append(h)  # cur's and every draft's layers 1..d, before the whole block is verified
            read = ctx.read(h, n + len(drafts))
            if len(drafts) == g:
                break
            nxt, conf = self.head.guess_with_confidence(read[:, -1], prev)  # over its shortlist when it has one
            prev = None
            if float(conf) < self.config.min_confidence:
                break
            tok = int(nxt)
            drafts.append(tok)
        block = pad_block(torch.cat(hidden, dim=1), self.config.min_block)
        return drafts, run_layers(m, block, d, L, cache, past=n)
