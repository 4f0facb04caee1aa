"""When does a token that differs from greedy count as a near-tie rather than a bug?

Exact decoding emits the reference's argmax at every position, but two computations of the same logits in other
matrix shapes (a block of rows instead of one, a layer slice instead of the whole forward) round differently, and
where the reference's top two logits are closer than that rounding the argmax may flip. In fp32 (TF32 off) the
rounding is far below 1e-4, so a flip with a larger top-two gap is a bug. In bf16 and fp16 the logits carry about
8 and 11 significant bits: the threshold scales with the dtype's resolution at the logit's magnitude (two units in
the last place), and every mismatch is still counted and shown, near-tie or not.
"""

from __future__ import annotations

import torch

FP32_NEAR_TIE = 1e-4


def near_tie_threshold(dtype: torch.dtype, magnitude: float) -> float:
    """The top-two gap below which a flip may be rounding, for logits of ``magnitude`` computed in ``dtype``."""
    return max(FP32_NEAR_TIE, 2 * torch.finfo(dtype).eps * abs(float(magnitude)))


@torch.no_grad()
def top2(model, prompt: list[int], ref: list[int], pos: int) -> tuple[float, float]:
    """(the top-two gap, the top logit) of the reference's next-token logits at ``pos`` (after ``ref[:pos]``)."""
    ids = torch.tensor([prompt + ref[:pos]], device=model.device)
    top = model(ids).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1]), float(top[0])


def is_near_tie(model, prompt: list[int], ref: list[int], pos: int) -> tuple[bool, float]:
    """Whether the reference's position ``pos`` is a near-tie in the model's dtype, and its top-two gap."""
    gap, top = top2(model, prompt, ref, pos)
    return gap < near_tie_threshold(model.dtype, top), gap
