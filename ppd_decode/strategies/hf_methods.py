"""transformers' own exact speed-ups, run through its public ``generate`` API, as comparators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DecodeResult, DecodingStrategy, register


class _HFGenerate(DecodingStrategy):
    def generate_kwargs(self) -> dict:
        raise NotImplementedError

    def _generate(self, ids, max_new_tokens):
        ids = ids[None]
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.pad, **self.generate_kwargs())
        return DecodeResult(out[0, ids.shape[1]:].tolist())


@dataclass
class PromptLookupConfig:
    num_tokens: int = 10  # prompt_lookup_num_tokens
    max_ngram: int = 2  # max_matching_ngram_size


@register
class PromptLookup(_HFGenerate):
    name = "prompt_lookup"
    Config = PromptLookupConfig

    def generate_kwargs(self):
        return {"prompt_lookup_num_tokens": self.config.num_tokens, "max_matching_ngram_size": self.config.max_ngram}


@dataclass
class AssistantEarlyExitConfig:
    layer: int | None = None  # default: half the layers


@register
class AssistantEarlyExit(_HFGenerate):
    """transformers' self-speculation: the model's own first layers plus its (untrained) LM head as the draft."""

    name = "assistant_early_exit"
    Config = AssistantEarlyExitConfig

    def generate_kwargs(self):
        return {"assistant_early_exit": self.config.layer or self.model.config.num_hidden_layers // 2}
