"""The reference: transformers' own greedy decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DecodeResult, DecodingStrategy, register


@dataclass
class GreedyConfig:
    pass


@register
class Greedy(DecodingStrategy):
    name = "greedy"
    Config = GreedyConfig

    def _generate(self, ids, max_new_tokens):
        ids = ids[None]
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.pad)
        new = out[0, ids.shape[1]:].tolist()
        return DecodeResult(new, steps=len(new))
