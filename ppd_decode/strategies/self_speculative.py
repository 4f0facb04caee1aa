"""Self-speculative decoding with our early-exit heads (exact).

Draft ``gamma`` tokens with layers 1..d plus the head for layer d, then verify them with one forward of layers
d+1..L over all drafts at once. The drafts' KV entries for layers 1..d are already in the cache, so verification
never recomputes those layers: it starts from the layer-d hidden states the draft left behind (LayerSkip's cache
reuse). The longest prefix equal to the final layer's argmax is kept, plus the final layer's next token, so the
output is the model's greedy output. ``gamma`` adapts to the observed acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HeadMismatchError
from ..heads import check_layer
from ..stack import crop_cache, embed, final_logits, new_cache, num_layers, prefill, run_layers
from .base import DecodeResult, DecodingStrategy, register


@dataclass
class SelfSpeculativeConfig:
    layer: int | None = None  # d: the head's layer (default: the only head given)
    draft_tokens: int = 4  # initial gamma
    max_draft_tokens: int = 16
    adaptive: bool = True  # +2 after a fully accepted draft, -1 otherwise (transformers' heuristic)


def pick_head(strategy: DecodingStrategy, layer: int | None):
    if not strategy.heads:
        raise HeadMismatchError(f"{strategy.name} needs an early-exit head: pass heads={{d: head}} "
                                f"(ppd_decode.heads.load_heads) or train one with `make train LAYER=d`")
    if layer is None:
        if len(strategy.heads) != 1:
            raise HeadMismatchError(f"several heads given ({sorted(strategy.heads)}): set config.layer to one of them")
        layer = next(iter(strategy.heads))
    if layer not in strategy.heads:
        raise HeadMismatchError(f"no head for layer {layer}; heads given: {sorted(strategy.heads)}")
    check_layer(strategy.model, layer)
    return layer, strategy.heads[layer]


@register
class SelfSpeculative(DecodingStrategy):
    name = "self_speculative"
    Config = SelfSpeculativeConfig
    needs_heads = True

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        self.layer, self.head = pick_head(self, self.config.layer)
        if self.config.draft_tokens < 1 or self.config.max_draft_tokens < self.config.draft_tokens:
            raise ValueError("need 1 <= draft_tokens <= max_draft_tokens")

    def _generate(self, ids, max_new_tokens):
        m, d, L = self.model, self.layer, num_layers(self.model)
        cache = new_cache(m)
        logits = prefill(m, ids, cache)
        cur = int(logits.argmax())
        out: list[int] = []
        res = DecodeResult(out, steps=1)
        if self.finish(out, [cur], max_new_tokens):
            return res
        n = ids.numel()  # every layer caches positions 0..n-1; `cur` sits at position n
        gamma = self.config.draft_tokens
        while True:
            g = max(0, min(gamma, max_new_tokens - len(out) - 1))  # never draft past max_new_tokens
            drafts, hidden = [], []
            tok = cur
            for _ in range(g):
                h = run_layers(m, embed(m, torch.tensor([[tok]], device=ids.device)), 0, d, cache)
                hidden.append(h)
                tok = int(self.head.guess(h[:, -1], 1)[0, 0])  # over the head's shortlist when it has one
                drafts.append(tok)
            # The last draft also needs its layers 1..d before the whole block is verified.
            hidden.append(run_layers(m, embed(m, torch.tensor([[tok]], device=ids.device)), 0, d, cache))
            verify = run_layers(m, torch.cat(hidden, dim=1), d, L, cache, past=n)
            target = final_logits(m, verify)[0].argmax(-1).tolist()  # target[i]: greedy token after block[i]
            a = 0
            while a < g and drafts[a] == target[a]:
                a += 1
            res.steps += 1
            res.drafted += g
            res.accepted += a
            n += a + 1  # cur and the accepted drafts are now in the cache, in every layer
            crop_cache(cache, n)
            if self.finish(out, drafts[:a] + [target[a]], max_new_tokens):
                return res
            cur = target[a]
            if self.config.adaptive and g == gamma:
                gamma = min(gamma + 2, self.config.max_draft_tokens) if a == g else max(1, gamma - 1)
