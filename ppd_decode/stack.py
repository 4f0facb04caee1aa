"""Running slices of a transformers decoder stack with its own modules and KV cache.

Decoding methods that split the model at a layer (early exit drafts, pipelined stages) compose the model's own
embedding, decoder layers, rotary embedding, final norm and LM head, and its ``DynamicCache``; nothing from the
modelling files is copied. Layers are indexed 0..L-1 here (the hidden state after layer index ``i`` is what the
rest of ppd calls layer ``d = i + 1``).
"""

from __future__ import annotations

import torch


def decoder(model):
    return model.model


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_len(cache, layer: int = 0) -> int:
    return cache.get_seq_length(layer)


def crop_cache(cache, length: int, layers: range | None = None) -> None:
    """Keep the first ``length`` positions of the given layers (all by default)."""
    for i, layer in enumerate(cache.layers):
        if layers is not None and i not in layers:
            continue
        if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def causal_mask(q: int, past: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive mask [1, 1, q, past + q]: query i (at position past + i) sees keys 0..past + i. None when q == 1."""
    if q == 1:
        return None
    k = torch.arange(past + q, device=device)
    qpos = torch.arange(q, device=device)[:, None] + past
    mask = torch.zeros(q, past + q, dtype=dtype, device=device)
    mask.masked_fill_(k[None, :] > qpos, torch.finfo(dtype).min)
    return mask[None, None]


def embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    return decoder(model).embed_tokens(input_ids)


def run_layers(model, hidden: torch.Tensor, start: int, end: int, cache, past: int | None = None) -> torch.Tensor:
    """Decoder layers ``start..end-1`` on ``hidden`` [B, q, H] at positions ``past..past+q-1``, appending to
    ``cache``. ``past`` defaults to the cache length of layer ``start``."""
    if start >= end:
        return hidden
    m = decoder(model)
    q = hidden.shape[1]
    past = cache_len(cache, start) if past is None else past
    position_ids = torch.arange(past, past + q, device=hidden.device)[None]
    position_embeddings = m.rotary_emb(hidden, position_ids=position_ids)
    mask = causal_mask(q, past, hidden.dtype, hidden.device)
    for layer in m.layers[start:end]:
        out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        hidden = out if torch.is_tensor(out) else out[0]
    return hidden


def final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(decoder(model).norm(hidden))


def num_layers(model) -> int:
    return model.config.num_hidden_layers
