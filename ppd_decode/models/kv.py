"""Operations on a transformers ``DynamicCache`` and the attention masks that go with it, shared by the decoding
runtime (``runtime.stack``) and the heads' own caches (``models.heads.HeadContext``).

Caches are cut by slicing each layer's keys and values, not with ``DynamicCache.crop``, whose argument changed
meaning across transformers versions.
"""

from __future__ import annotations

import torch


def crop_cache(cache, length: int, layers: range | None = None) -> None:
    """Keep the first ``length`` positions of the given layers (all by default)."""
    select_cache(cache, length, [], layers)


def select_cache(cache, keep: int, moved: list[int], layers: range | None = None) -> None:
    """Keep the first ``keep`` positions of the given layers (all by default), followed by the positions ``moved``
    (in this order): accepted tokens moved into place; everything after them is dropped. Only the moved entries
    are copied."""
    idx = None
    for i, layer in enumerate(cache.layers):
        if (layers is not None and i not in layers) or getattr(layer, "keys", None) is None:
            continue
        if moved:
            if idx is None:
                idx = torch.tensor(moved, device=layer.keys.device)
            layer.keys[..., keep:keep + len(moved), :] = layer.keys.index_select(-2, idx)
            layer.values[..., keep:keep + len(moved), :] = layer.values.index_select(-2, idx)
        layer.keys = layer.keys[..., :keep + len(moved), :]
        layer.values = layer.values[..., :keep + len(moved), :]


def causal_mask(q: int, past: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive mask [1, 1, q, past + q]: query i (at position past + i) sees keys 0..past + i. None when q == 1."""
    if q == 1:
        return None
    k = torch.arange(past + q, device=device)
    qpos = torch.arange(q, device=device)[:, None] + past
    mask = torch.zeros(q, past + q, dtype=dtype, device=device)
    mask.masked_fill_(k[None, :] > qpos, torch.finfo(dtype).min)
    return mask[None, None]
