"""The reference, transformers' own greedy decoding, and the same decoding through ppd's stack."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ppd_decode.models.packed_linear import packed_linears
from ppd_decode.runtime.stack import embed, final_argmax, new_cache, num_layers, prefill, run_layers
from ppd_decode.strategies.base import DecodingStrategy, register


@dataclass
class GreedyConfig:
    # transformers' generate with the decoder's matmuls packed as ppd's stack runs them (packed_linear.py): the
    # benchmark's row that shows how much of the stack's lead is that packing, which generate could have too
    packed: bool = False


@register
class Greedy(DecodingStrategy):
    name = "greedy"
    Config = GreedyConfig

    def _generate(self, ids, max_new_tokens):
        ids = ids[None]
        with packed_linears(self.model) if self.config.packed else contextlib.nullcontext():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.pad)
        new = out[0, ids.shape[1]:].tolist()
        return self.new_result(new, steps=len(new))


@dataclass
class StackGreedyConfig:
    pass


@register
class StackGreedy(DecodingStrategy):
    """Plain greedy decoding through ppd's own stack (the layer loop and the screened exact argmax of the LM head,
    stack.final_argmax): one token per full forward, nothing guessed. The benchmark runs it so that what the stack
    saves over ``generate`` is not mistaken for what speculation or pipelining gains."""

    name = "stack_greedy"
    Config = StackGreedyConfig

    def _generate(self, ids, max_new_tokens):
        m, L = self.model, num_layers(self.model)
        cache = new_cache(m)
        cur = int(prefill(m, ids, cache).argmax())
        out: list[int] = []
        res = self.new_result(out, steps=1)
        n = ids.numel()
        while not self.finish(out, [cur], max_new_tokens):
            h = run_layers(m, embed(m, torch.tensor([[cur]], device=ids.device)), 0, L, cache, past=n)
            cur = int(final_argmax(m, h[:, -1]))
            n += 1
            res.steps += 1
        return res
