"""A batch of prompts decoded together, each row at its own length: left-padded prefill, ragged KV cache, per-row
stopping.

Rows accept different numbers of tokens per step (speculation), so the cache's columns stop lining up: a
column that one row accepted may be a rejected draft in another. Instead of shifting every row's cache each step,
``RaggedBatch`` keeps one bool ``valid[B, K]`` over the cache columns: a rejected draft becomes a hole that no
query attends to, and keys keep the rotary positions they were written with, so holes change nothing but
wasted columns. Columns that are holes in every row are cut at once; when holes pile up inside rows the batch is
compacted (each row's valid columns gathered, right-aligned). Finished rows leave the batch.

Everything runs through the model's own decoder layers, rotary embedding and ``DynamicCache`` (``stack.py``).
"""

from __future__ import annotations

import torch

from ppd_decode.runtime.stack import final_argmax, new_cache, num_layers, run_layers


class RaggedBatch:
    """Decoding state of B rows: cache, valid columns, next positions, the token each row decodes next."""

    def __init__(self, model, prompts: list[list[int]], pad: int):
        self.model = model
        self.rows = list(range(len(prompts)))  # the original index of each live row
        self.compactions = 0
        dev = model.device
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=dev)
        prompt_valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=dev)
        self.valid = torch.zeros(len(prompts), 0, dtype=torch.bool, device=dev)  # over the cache's columns
        self.cache = new_cache(model)
        positions = (prompt_valid.cumsum(-1) - 1).clamp(min=0)
        h = self.run(model.model.embed_tokens(ids), 0, num_layers(model), positions, block_valid=prompt_valid)
        self.valid = prompt_valid
        self.pos = prompt_valid.sum(-1)  # position of each row's next token
        self.cur = final_argmax(model, h[:, -1:])[:, 0]  # each row's first new token (not cached)

    @property
    def size(self) -> int:
        return len(self.rows)

    def mask(self, q: int, extra: int, dtype, block_valid: torch.Tensor | None = None,
             see_step: torch.Tensor | None = None) -> torch.Tensor:
        """Additive mask [B, 1, q, K + extra + q]: query i sees the row's valid cache columns, the ``extra`` block
        columns this step already appended (all: they are the row's own drafts) and block columns 0..i (those of
        them in ``block_valid`` [B, q], when given: padding in the prefill); every query sees itself.
        ``see_step`` (bool [B, q, extra + q]) replaces that rule for this step's columns (token trees: ancestors)."""
        B, K = self.valid.shape
        dev = self.valid.device
        see = torch.ones(B, q, K + extra + q, dtype=torch.bool, device=dev)
        see[:, :, :K] = self.valid[:, None, :]
        if see_step is not None:
            see[:, :, K:] = see_step
        else:
            causal = torch.ones(q, q, dtype=torch.bool, device=dev).tril()
            block = causal[None] if block_valid is None else causal[None] & block_valid[:, None, :]
            see[:, :, K + extra:] = block
        see[:, :, K + extra:] |= torch.eye(q, dtype=torch.bool, device=dev)[None]
        mask = torch.zeros(see.shape, dtype=dtype, device=dev)
        return mask.masked_fill_(~see, torch.finfo(dtype).min)[:, None]

    def run(self, hidden, start: int, end: int, positions: torch.Tensor, offset: int = 0,
            block_valid: torch.Tensor | None = None, see_step: torch.Tensor | None = None) -> torch.Tensor:
        """Layers ``start..end-1`` on ``hidden`` [B, q, H] at ``positions`` [B, q], appending to the cache.
        ``offset``: block columns this step already appended to these layers; ``see_step``: see ``mask``."""
        mask = self.mask(hidden.shape[1], offset, hidden.dtype, block_valid, see_step)
        return run_layers(self.model, hidden, start, end, self.cache, position_ids=positions, attention_mask=mask)

    # ------------------------------------------------------------------------------------------ bookkeeping
    def commit(self, accepted: torch.Tensor, block: int) -> None:
        """The last ``block`` cache columns are this step's block; row b keeps its first ``accepted[b] + 1``
        (the token it decoded plus its accepted drafts), the rest become holes; trailing all-hole columns go."""
        cols = torch.arange(block, device=accepted.device)
        self.commit_columns(cols[None, :] <= accepted[:, None])

    def commit_columns(self, keep: torch.Tensor) -> None:
        """The last ``keep.shape[1]`` cache columns are this step's block; row b keeps the columns ``keep[b]``
        (bool; they must hold consecutive positions from the row's next one on: a chain, or a tree's accepted
        path), the rest become holes; trailing all-hole columns go."""
        self.valid = torch.cat([self.valid, keep], dim=1)
        self.pos = self.pos + keep.sum(-1)
        used = keep.any(0).nonzero()
        self._slice_columns(0, self.valid.shape[1] - keep.shape[1] + (int(used.max()) + 1 if len(used) else 0))
        holes = int((~self.valid).sum())
        if holes > 16 * self.size and 4 * holes > self.valid.numel():
            self.compact()

    def drop(self, keep_rows: list[int]) -> None:
        """Keep only the live rows at these batch indices (finished rows leave the batch)."""
        idx = torch.tensor(keep_rows, dtype=torch.long, device=self.valid.device)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.batch_select_indices(idx)
        self.valid, self.pos, self.cur = self.valid[idx], self.pos[idx], self.cur[idx]
        self.rows = [self.rows[i] for i in keep_rows]
        first = int(self.valid.any(0).float().argmax())  # leading columns that are padding in every live row
        if first:
            self._slice_columns(first, self.valid.shape[1])

    def compact(self) -> None:
        """Gather each row's valid columns, right-aligned (left padding), so holes stop costing attention."""
        count = self.valid.sum(-1)
        K = int(count.max())
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)[:, :K]  # valid columns first
        shift = (K - count)[:, None]
        src = torch.arange(K, device=self.valid.device)[None, :] - shift
        index = order.gather(1, src.clamp(min=0))
        self.valid = src >= 0
        self.compactions += 1
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or not layer.keys.numel():
                continue
            B, H, _, D = layer.keys.shape
            g = index[:, None, :, None].expand(B, H, K, D)
            layer.keys = layer.keys.gather(2, g)
            layer.values = layer.values.gather(2, g)

    def _slice_columns(self, start: int, stop: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[..., start:stop, :]
                layer.values = layer.values[..., start:stop, :]
        self.valid = self.valid[:, start:stop]
