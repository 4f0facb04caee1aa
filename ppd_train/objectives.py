"""Training objectives for early-exit heads, and the agreement metric they are judged by.

* ``ce``: cross-entropy to the next ground-truth token (the paper's objective).
* ``distill``: match the final layer: ``kind=kl`` (KL from the final layer's distribution, temperature T) or
  ``kind=argmax`` (cross-entropy to the final layer's top-1 token, which is what a match is scored against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("ce", "distill")
DISTILL_KINDS = ("kl", "argmax")


def check_objective(name: str, kind: str = "kl") -> None:
    from ppd_decode.errors import PPDError

    if name not in OBJECTIVES:
        raise PPDError(f"unknown objective {name!r}; use one of {list(OBJECTIVES)} (head.objective=...)")
    if name == "distill" and kind not in DISTILL_KINDS:
        raise PPDError(f"unknown distill kind {kind!r}; use one of {list(DISTILL_KINDS)} (head.distill_kind=...)")


def needs_final_layer(name: str) -> bool:
    return name == "distill"


def head_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None,
              objective: str, kind: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """Mean loss over the positions that have a target. Logits are [B, T, V]."""
    V = student_logits.shape[-1]
    if objective == "ce":
        # position t predicts token t+1; the last position has no target
        return F.cross_entropy(student_logits[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1))
    s = student_logits.reshape(-1, V).float()
    t = teacher_logits.reshape(-1, V).float()
    if kind == "argmax":
        return F.cross_entropy(s, t.argmax(-1))
    T = temperature
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * T * T


@torch.no_grad()
def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of positions where the final layer's argmax is among the head's top-k (the match rate p_k)."""
    target = teacher_logits.argmax(-1, keepdim=True)
    top = student_logits.topk(max(ks), dim=-1).indices
    hit = top == target
    return {k: hit[..., :k].any(-1).float().mean().item() for k in ks}
