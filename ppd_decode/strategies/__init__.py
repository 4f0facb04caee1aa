"""Decoding strategies, registered by name (see base.py). Importing this package registers all of them."""

from .base import REGISTRY, DecodeResult, DecodingStrategy, get_strategy, register
from . import batched, batched_tree, greedy, hf_methods, lookahead, self_speculative, tree_speculative  # noqa: F401

__all__ = ["REGISTRY", "DecodeResult", "DecodingStrategy", "get_strategy", "register"]


def _register_pipeline():
    from .. import pipeline  # noqa: F401  (registers "ppd"; imported here so strategies/ stays importable alone)


_register_pipeline()
