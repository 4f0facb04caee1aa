"""One interface for every decoding method: a config dataclass, a strategy class, a registry by name.

A strategy is built once for a model (and, where it drafts, its early-exit heads) and then serves many prompts:
``strategy.generate(prompt_ids, max_new_tokens)`` returns the new tokens and statistics. Every registered strategy
must be token-identical to ``model.generate(do_sample=False)``; the exactness tests and the benchmark iterate over
the registry, so registering a method is all it takes to have it tested and measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ppd_decode.errors import HeadMismatchError, PPDError, PromptTooLongError
from ppd_decode.models.heads import check_layer
from ppd_decode.runtime.stack import eos_ids

REGISTRY: dict[str, type["DecodingStrategy"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str) -> type["DecodingStrategy"]:
    if name not in REGISTRY:
        raise PPDError(f"unknown decoding strategy {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def pick_head(strategy: "DecodingStrategy", layer: int | None):
    """The (layer, head) a drafting strategy uses: ``layer``, or the only head given; a clear error otherwise."""
    if not strategy.heads:
        raise HeadMismatchError(f"{strategy.name} needs an early-exit head: pass heads={{d: head}} "
                                f"(ppd_decode.models.heads.load_heads) or train one with `make train LAYER=d`")
    if layer is None:
        if len(strategy.heads) != 1:
            raise HeadMismatchError(f"several heads given ({sorted(strategy.heads)}): set config.layer to one of them")
        layer = next(iter(strategy.heads))
    if layer not in strategy.heads:
        raise HeadMismatchError(f"no head for layer {layer}; heads given: {sorted(strategy.heads)}")
    check_layer(strategy.model, layer)
    return layer, strategy.heads[layer]


@dataclass
class DecodeResult:
    tokens: list[int]  # the new tokens only (EOS included when generation stopped on it)
    steps: int = 0  # forward passes of the full model (verification steps for drafting methods)
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mean_accepted_tokens(self) -> float:
        """New tokens per full-model step (1.0 for plain greedy)."""
        return len(self.tokens) / self.steps if self.steps else 0.0


class DecodingStrategy:
    name: ClassVar[str]
    Config: ClassVar[type] = None  # a dataclass
    needs_heads: ClassVar[bool] = False

    def __init__(self, model, config=None, heads: dict | None = None, tokenizer=None):
        self.model = model
        self.config = config if config is not None else self.Config()
        self.heads = heads or {}
        self.tokenizer = tokenizer
        gen = model.generation_config
        self.eos = eos_ids(model)
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else next(iter(self.eos), 0)

    def check_request(self, prompt_ids, max_new_tokens: int) -> torch.Tensor:
        """Refuse a bad request before any work."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise PPDError("one prompt at a time (batch size 1)")
            ids = ids[0]
        if ids.numel() == 0:
            raise PPDError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise PPDError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ctx = getattr(self.model.config, "max_position_embeddings", None)
        if ctx is not None and ids.numel() + max_new_tokens > ctx:
            raise PromptTooLongError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                     f"model's context of {ctx}. Fix: shorten the prompt or lower max_new_tokens.")
        return ids.to(self.model.device)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int) -> DecodeResult:
        ids = self.check_request(prompt_ids, max_new_tokens)
        t0 = time.perf_counter()
        result = self._generate(ids, max_new_tokens)
        result.seconds = time.perf_counter() - t0
        return result

    def _generate(self, ids: torch.Tensor, max_new_tokens: int) -> DecodeResult:
        raise NotImplementedError

    def finish(self, out: list[int], new: list[int], max_new_tokens: int) -> bool:
        """Append ``new`` to ``out`` under generate's stopping rules; True when generation is over."""
        for t in new:
            out.append(t)
            if t in self.eos or len(out) >= max_new_tokens:
                return True
        return False
