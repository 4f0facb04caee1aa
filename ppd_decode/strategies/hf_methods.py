"""transformers' own exact speed-ups, run through its public ``generate`` API, as comparators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppd_decode.models.heads import F_PREV, H_D
from ppd_decode.strategies.base import DecodingStrategy, pick_head, register


class _HFGenerate(DecodingStrategy):
    def generate_kwargs(self) -> dict:
        raise NotImplementedError

    def _generate(self, ids, max_new_tokens):
        ids = ids[None]
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.pad, **self.generate_kwargs())
        return self.new_result(out[0, ids.shape[1]:].tolist())


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


class _HeadFeatures(torch.nn.Module):
    """The head's features (adapter, norm; the f(t-1) stand-in) in place of the draft model's final norm."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.features(hidden)


class _ShortlistProjection(torch.nn.Module):
    """The draft model's LM head for a head with a shortlist: the shortlist's logits and the dtype's lowest value
    for every other token, so transformers' assistant drafts what the head's guesses rank first."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.head.shortlist_weight
        out = x.new_full((*x.shape[:-1], self.head.lm_head.out_features), torch.finfo(x.dtype).min, dtype=w.dtype)
        out[..., self.head.shortlist] = torch.nn.functional.linear(x.to(w.dtype), w)
        return out


def early_exit_model(model, head):
    """A causal LM made of the model's own embedding and layers 1..d plus our head, sharing their weights: the
    draft model for transformers' assisted generation (it keeps its own KV cache). The head's adapter and norm
    replace the final norm, and its projection ranks as its guesses do (over its shortlist where it has one)."""
    import copy

    from torch import nn

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = head.layer
    with torch.device("meta"):
        draft = type(model)(cfg)
    draft.model.embed_tokens = model.model.embed_tokens
    draft.model.layers = nn.ModuleList(model.model.layers[: head.layer])
    draft.model.rotary_emb = model.model.rotary_emb
    draft.model.norm = _HeadFeatures(head)
    draft.lm_head = _ShortlistProjection(head) if getattr(head, "shortlist", None) is not None else head.lm_head
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.eval()


@dataclass
class EarlyExitAssistedConfig:
    layer: int | None = None
    num_assistant_tokens: int = 5


@register
class EarlyExitAssisted(_HFGenerate):
    """transformers' assisted generation with our early exit (layers 1..d + our trained head) as the assistant."""

    name = "early_exit_assisted"
    Config = EarlyExitAssistedConfig
    needs_heads = True
    # f(t-1) as unknown at every draft: transformers' assistant never sees the main model's states, and a head that
    # reads f(t-1) is trained for that case too (head.prev_drop), so it drafts with its learned stand-in
    head_inputs = (H_D, F_PREV)

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        self.config.layer, head = pick_head(self, self.config.layer)
        self.assistant = early_exit_model(model, head)
        self.assistant.generation_config.num_assistant_tokens = self.config.num_assistant_tokens

    def generate_kwargs(self):
        return {"assistant_model": self.assistant}
