"""Match rates p_k(d): how often the final layer's greedy token is among an early head's top-k (docs/method.md).

Two passes per batch of prompts: batched, left-padded greedy generation of the continuation, then one
teacher-forced forward over prompt + continuation that yields every layer's hidden state; all heads and all k are
scored from it. Per-position outcomes are kept so the latency simulator can replay them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import PPDError
from .features import FrozenBackbone

KS = (1, 2, 3, 5, 10)


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                         progress=None) -> list[list[int]]:
    """Greedy continuations, batched with left padding (longest first to waste little padding); each is cut after
    its first EOS, as generate does for a single prompt."""
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(_eos_ids(model)), 0)
    eos = _eos_ids(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=model.device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                            device=model.device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)[:, width:].tolist()
        for i, row in zip(idx, gen):
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            out[i] = row[:cut]
        if progress is not None:
            progress.update(len(idx))
    return out  # type: ignore[return-value]


@dataclass
class HeadScore:
    label: str  # e.g. "lens", "distill-kl"
    layer: int
    hits: dict[int, int] = field(default_factory=dict)
    positions: int = 0
    outcomes: list[torch.Tensor] = field(default_factory=list)  # per prompt: bool [n_pos, len(KS)]
    top: list[torch.Tensor] = field(default_factory=list)  # per prompt: the head's top-max(k) tokens [n_pos, kmax]
    targets: list[torch.Tensor] = field(default_factory=list)  # per prompt: the final layer's argmax [n_pos]

    def rate(self, k: int) -> float:
        return self.hits.get(k, 0) / self.positions if self.positions else float("nan")


@torch.no_grad()
def score_heads(model, heads: dict[tuple[str, int], torch.nn.Module], prompts: list[list[int]],
                continuations: list[list[int]], ks=KS, batch_size: int = 4, progress=None,
                keep_top: bool = False) -> tuple[list[HeadScore], dict]:
    """Score every head (keyed by (label, layer)) at every generated position of every prompt."""
    vocab = model.config.vocab_size
    if max(ks) > vocab:
        raise PPDError(f"k={max(ks)} is larger than the vocabulary ({vocab}); use smaller k")
    layers = sorted({d for _, d in heads})
    extractor = FrozenBackbone(model, layers)
    scores = {key: HeadScore(key[0], key[1], {k: 0 for k in ks}) for key in heads}
    stats = {"positions": 0, "teacher_forced_disagreements": 0}
    pad = model.generation_config.pad_token_id or 0
    items = [i for i in range(len(prompts)) if continuations[i]]
    for s in range(0, len(items), batch_size):
        idx = items[s:s + batch_size]
        seqs = [prompts[i] + continuations[i] for i in idx]
        width = max(map(len, seqs))
        ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs], device=model.device)  # right padding
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=model.device)
        hidden, final = extractor.with_final_hidden(ids, mask)
        for row, i in enumerate(idx):
            p, n = len(prompts[i]), len(continuations[i])
            pos = torch.arange(p - 1, p - 1 + n, device=model.device)  # where each generated token was predicted
            y = model.lm_head(final[row, pos]).argmax(-1)
            stats["positions"] += n
            stats["teacher_forced_disagreements"] += int((y != torch.tensor(continuations[i], device=y.device)).sum())
            for key, head in heads.items():
                logits = head(hidden[key[1]][row, pos].to(head.lm_head.weight.dtype))
                top = logits.topk(max(ks), dim=-1).indices
                hit = top == y[:, None]
                out = torch.stack([hit[:, :k].any(-1) for k in ks], dim=1).cpu()
                sc = scores[key]
                sc.positions += n
                for j, k in enumerate(ks):
                    sc.hits[k] += int(out[:, j].sum())
                sc.outcomes.append(out)
                if keep_top:
                    sc.top.append(top.cpu())
                    sc.targets.append(y.cpu())
        if progress is not None:
            progress.update(len(idx))
    return list(scores.values()), stats
