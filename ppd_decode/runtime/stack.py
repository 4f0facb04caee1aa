"""Running slices of a transformers decoder stack with its own modules and KV cache.

Decoding methods that split the model at a layer (early exit drafts, pipelined stages) compose the model's own
embedding, decoder layers, rotary embedding, final norm and LM head, and its ``DynamicCache``; nothing from the
modelling files is copied. Layers are indexed 0..L-1 here (the hidden state after layer index ``i`` is what the
rest of ppd calls layer ``d = i + 1``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch

from ppd_decode.models.kv import causal_mask, crop_cache, select_cache  # noqa: F401  (the runtime's own API too)
from ppd_decode.runtime.exact_argmax import exact_argmax
from ppd_decode.models.packed_linear import packed_linears


@functools.cache
def _cache_kwarg(forward) -> str:
    # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40):
    # pass whichever name this version's forward declares.
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


# SDPA's enable_gqa arrived in torch 2.5 (a builtin: no signature to inspect, its docstring names it)
_SDPA_HAS_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


@contextlib.contextmanager
def gqa_attention(device: torch.device):
    """On a CPU, let SDPA attend with grouped key/value heads even under an explicit mask, instead of transformers'
    default of copying every cached key and value once per query head group (``repeat_kv``) whenever a mask is given.
    Every block run_layers runs has a mask. It saves the copies, which matter more to a block timed alone than to a
    whole decode (docs/results.md); the outputs are bitwise the same (tested). transformers reads this switch at each call. Not on GPUs, where a masked grouped SDPA falls
    back to the slow math kernel."""
    if device.type != "cpu" or not _SDPA_HAS_GQA:
        yield
        return
    key, old = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def with_cache(module, cache) -> dict:
    """The keyword arguments handing ``cache`` to ``module``'s forward (a model or a decoder layer)."""
    return {_cache_kwarg(type(module).forward): cache, "use_cache": True}


def decoder(model):
    return model.model


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt ``ids`` [n] into ``cache``; the logits [V] of its last position only. Like ``generate``
    (``logits_to_keep=1``): projecting every prompt position through the LM head would add a large vocabulary's
    matmul per prompt token."""
    with packed_linears(model):
        return model(input_ids=ids[None], logits_to_keep=1, **with_cache(model, cache)).logits[0, -1]


def random_context(model, context: int, batch: int = 1, high: int = 100):
    """A new cache holding ``batch`` rows of ``context`` random tokens (ids 10..high-1): the cached prefix the
    step-cost profilers time their forwards against. Only the last position goes through the LM head."""
    ids = torch.randint(10, high, (batch, context), device=model.device)
    cache = new_cache(model)
    model(input_ids=ids, logits_to_keep=1, **with_cache(model, cache))
    return cache


def cache_len(cache, layer: int = 0) -> int:
    return cache.get_seq_length(layer)


def embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    return decoder(model).embed_tokens(input_ids)


def sibling_mask(q: int, past: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive mask [1, 1, q, past + q] for q alternative tokens at the same position: each sees the prefix and
    itself, not its siblings (PPD's k guesses for the next token, run as one block)."""
    if q == 1:
        return None
    mask = torch.full((q, past + q), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[:, :past] = 0
    mask[:, past:].fill_diagonal_(0)
    return mask[None, None]


def block_mask_4d(see: torch.Tensor, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask [1, 1, q, past + q] from a bool [q, q] visibility within the block; the prefix is visible."""
    q = see.shape[0]
    mask = torch.zeros(q, past + q, dtype=dtype, device=device)
    mask[:, past:].masked_fill_(~see.to(device), torch.finfo(dtype).min)
    return mask[None, None]


def run_layers(model, hidden: torch.Tensor, start: int, end: int, cache, past: int | None = None,
               siblings: bool = False, position_ids: torch.Tensor | None = None,
               block_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder layers ``start..end-1`` on ``hidden`` [B, q, H], appending to ``cache``. The q tokens sit at
    positions ``past..past+q-1`` (causal among themselves), or all at position ``past`` with ``siblings=True``,
    or anywhere with explicit ``position_ids`` [1, q] and ``block_mask`` (bool [q, q]: which block rows each row
    sees; the cached prefix is always visible), or a whole additive ``attention_mask`` [B, 1, q, past + q] with
    ``position_ids`` [B, q] (a batch whose rows sit at different lengths). ``past`` defaults to the cache length of
    layer ``start``."""
    if start >= end:
        return hidden
    m = decoder(model)
    q = hidden.shape[1]
    past = cache_len(cache, start) if past is None else past
    if attention_mask is not None:
        if position_ids is None:
            raise ValueError("attention_mask needs explicit position_ids")
        mask = attention_mask
    elif block_mask is not None:  # one row that sees itself needs no mask (the ordinary one-token step)
        mask = None if q == 1 and bool(block_mask.all()) else block_mask_4d(block_mask, past, hidden.dtype, hidden.device)
    elif siblings:
        position_ids = torch.full((1, q), past, device=hidden.device)
        mask = sibling_mask(q, past, hidden.dtype, hidden.device)
    else:
        position_ids = torch.arange(past, past + q, device=hidden.device)[None]
        mask = causal_mask(q, past, hidden.dtype, hidden.device)
    if block_mask is not None and position_ids is None:
        raise ValueError("block_mask needs explicit position_ids")
    position_embeddings = m.rotary_emb(hidden, position_ids=position_ids)
    with gqa_attention(hidden.device), packed_linears(model):
        for layer in m.layers[start:end]:
            out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                        position_ids=position_ids, **with_cache(layer, cache))
            hidden = out if torch.is_tensor(out) else out[0]
    return hidden


def pad_block(hidden: torch.Tensor, min_rows: int) -> torch.Tensor:
    """``hidden`` [B, q, H] with copies of its last row appended up to ``min_rows`` rows when 1 < q < min_rows.

    With MKL on the plain row-major weights (``PPD_PACKED_LINEAR=0``, or no oneDNN), a matmul over 2 or 3 rows
    runs as that many matrix-vector products (each reads the whole weight) while 4 rows get a real matrix kernel, so
    a padded block costs less than the unpadded one. With the packed weights the stack uses by default on a CPU
    (packed_linear.py) 2-4 rows cost about the same, so the padding neither helps nor hurts there.
    The padding rows sit after the real ones, so the causal mask keeps them out of every real row; callers ignore
    their outputs and crop their cache entries. One row stays one row."""
    q = hidden.shape[1]
    if q <= 1 or q >= min_rows:
        return hidden
    return torch.cat([hidden, hidden[:, -1:].expand(-1, min_rows - q, -1)], dim=1)


def final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(decoder(model).norm(hidden))


def final_argmax(model, hidden: torch.Tensor) -> torch.Tensor:
    """The greedy tokens [...] after the last layer's ``hidden`` [..., H]: ``final_logits(...).argmax(-1)``, token for
    token, without reading the whole fp32 LM head on a CPU (see exact_argmax.py)."""
    return exact_argmax(model)(decoder(model).norm(hidden))


def eos_ids(model) -> set[int]:
    """The token ids that end generation, as ``generate`` reads them (generation config first, then model config)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))


def num_layers(model) -> int:
    return model.config.num_hidden_layers
