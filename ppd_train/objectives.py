"""Training objectives for early-exit heads, and the agreement metric they are judged by.

* ``ce``: cross-entropy to the next ground-truth token (the paper's objective).
* ``distill``: match the final layer: ``kind=kl`` (KL from the final layer's distribution, temperature T) or
  ``kind=argmax`` (cross-entropy to the final layer's top-1 token, which is what a match is scored against).

Candidate softmax (``head.train_vocab=N``): on a small model the vocabulary projection, not the backbone, is what a
head costs to train (49,152 x 576 for SmolLM2-135M: a fifth of the model, paid again for the weight gradient and the
softmax). The loss can then be taken over a candidate set instead of the whole vocabulary: the N tokens most frequent
in the training data plus every target of the batch, so each target is always in the set and its strongest usual
competitors are too. The head itself keeps the full vocabulary; evaluation and decoding use all of it.
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


def targets(input_ids: torch.Tensor, teacher_logits: torch.Tensor | None, objective: str, kind: str) -> torch.Tensor | None:
    """The token ids a loss pulls towards (None for KL, which uses the whole teacher distribution)."""
    if objective == "ce":
        return input_ids[:, 1:]
    return teacher_logits.argmax(-1) if kind == "argmax" else None


def candidate_set(frequent: torch.Tensor, required: torch.Tensor) -> torch.Tensor:
    """Sorted token ids the candidate softmax scores: the frequent tokens plus ``required`` (the batch's targets,
    from ``targets``; for KL, the teacher's argmax)."""
    required = required.reshape(-1)
    return torch.unique(torch.cat([frequent.to(required.device), required]))


def candidate_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None,
                   candidates: torch.Tensor, objective: str, kind: str = "kl", temperature: float = 1.0,
                   target_index: torch.Tensor | None = None) -> torch.Tensor:
    """``head_loss`` over the candidate set: ``student_logits`` are [B, T, len(candidates)] (the head's projection
    restricted to those rows); targets are mapped into the set, the teacher restricted to it. ``target_index``
    (the targets' positions in the set, flattened) may be passed in when several heads share it."""
    C = len(candidates)
    if objective == "ce":
        s = student_logits[:, :-1].reshape(-1, C).float()
    else:
        s = student_logits.reshape(-1, C).float()
    if objective == "ce" or kind == "argmax":
        if target_index is None:
            target_index = torch.searchsorted(candidates, targets(input_ids, teacher_logits, objective, kind).reshape(-1))
        return F.cross_entropy(s, target_index)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, candidates].float()
    T = temperature
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * T * T


def _by_frequency(blocks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every token id, most frequent in the training blocks first (ties broken by id: deterministic)."""
    counts = torch.bincount(blocks.reshape(-1), minlength=vocab_size)[:vocab_size]
    return torch.argsort(-counts, stable=True)


def frequent_tokens(blocks: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent token ids of the training blocks, sorted by id."""
    return _by_frequency(blocks, vocab_size)[:n].sort().values


def new_frequent_tokens(blocks: torch.Tensor, have: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent token ids of the training blocks that are not in ``have``, sorted by id."""
    order = _by_frequency(blocks, vocab_size)
    return order[~torch.isin(order, have.to(order.device))][:n].sort().values


@torch.no_grad()
def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ks=(1, 5),
              scored: torch.Tensor | None = None, shortlist: torch.Tensor | None = None) -> dict[int, float]:
    """Fraction of positions (those ``scored`` marks, if given) where the final layer's argmax is among the head's
    top-k (the match rate p_k); with ``shortlist`` (token ids), the head's top-k among those rows only, as a
    frequent-rows head guesses in decoding."""
    target = teacher_logits.argmax(-1, keepdim=True)
    if shortlist is not None:
        top = shortlist[student_logits.index_select(-1, shortlist).topk(max(ks), dim=-1).indices]
    else:
        top = student_logits.topk(max(ks), dim=-1).indices
    hit = top == target
    keep = (lambda x: x[scored]) if scored is not None else (lambda x: x)
    return {k: keep(hit[..., :k].any(-1)).float().mean().item() for k in ks}
