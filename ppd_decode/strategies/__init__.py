"""Decoding strategies, registered by name (see base.py). Importing this package registers all of them."""

from ppd_decode.strategies import (  # noqa: F401  (each module registers its methods)
    batched,
    batched_tree,
    greedy,
    hf_methods,
    lookahead,
    ppd,
    self_speculative,
    tree_speculative,
)
from ppd_decode.strategies.base import REGISTRY, DecodeResult, DecodingStrategy, get_strategy, register

__all__ = ["REGISTRY", "DecodeResult", "DecodingStrategy", "get_strategy", "register"]
