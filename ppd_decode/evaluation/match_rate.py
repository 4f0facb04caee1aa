"""Match rates p_k(d): how often the final layer's greedy token is among an early head's top-k (docs/method.md).

One pass per batch of prompts: batched, left-padded greedy generation whose decoder-layer hooks keep, at every
step, the hidden state of the position being decoded at each layer a head reads: exactly h_i^d of the definition,
the input that produced the generated token y_i. All heads and all k are then scored from those states in large
matrix products (``score_captured``). The prompt is read once, by the generation itself.

``score_heads`` is the other way to get the same states (method.md): one teacher-forced forward over prompt +
continuation, kept as the reference the capture is checked against.
Per-position outcomes are kept so the latency simulator can replay them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ppd_decode.errors import PPDError
from ppd_decode.models.features import FrozenBackbone
from ppd_decode.models.heads import previous_states
from ppd_decode.runtime.stack import eos_ids

KS = (1, 2, 3, 5, 10)


FINAL = "final"  # the key of the final layer's normed states among captured ones (what f(t-1) is read from)


class _StepCapture:
    """Forward hooks on decoder layers (and, with ``final``, the final norm) that keep the last position's output at
    every forward of a generation."""

    def __init__(self, model, layers: list[int], final: bool = False):
        self.layers = sorted(set(layers))
        self.model = model
        self.final = final
        self.steps: dict = {d: [] for d in self.layers + ([FINAL] if final else [])}

    def __enter__(self):
        from ppd_decode.models.features import _layer_output

        blocks = self.model.model.layers
        self.handles = [blocks[d - 1].register_forward_hook(
            lambda _m, _a, out, d=d: self.steps[d].append(_layer_output(out)[:, -1])) for d in self.layers]
        if self.final:
            self.handles.append(self.model.model.norm.register_forward_hook(
                lambda _m, _a, out: self.steps[FINAL].append(out[:, -1])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def stacked(self) -> dict[int, torch.Tensor]:
        """{d: [B, steps, H]}; step i holds the state that produced generated token i."""
        return {d: torch.stack(v, dim=1) for d, v in self.steps.items()}


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                         progress=None, capture_layers: list[int] | None = None, capture_final: bool = False):
    """Greedy continuations, batched with left padding (longest first to waste little padding); each is cut after
    its first EOS, as generate does for a single prompt.

    With ``capture_layers`` it returns ``(continuations, states)`` where ``states[i][d]`` is ``[len(cont_i), H]``:
    the layer-d hidden state that produced each generated token of prompt i; with ``capture_final`` also
    ``states[i][FINAL]``, the final normed state that produced each one (f(t-1) of the next position)."""
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else next(iter(eos_ids(model)), 0)
    eos = eos_ids(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    states: list[dict[int, torch.Tensor] | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=model.device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                            device=model.device)
        with _StepCapture(model, capture_layers or [], final=capture_final and bool(capture_layers)) as cap:
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)[:, width:].tolist()
        captured = cap.stacked() if capture_layers else {}
        for r, (i, row) in enumerate(zip(idx, gen)):
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            out[i] = row[:cut]
            states[i] = {d: h[r, :cut] for d, h in captured.items()}
        if progress is not None:
            progress.update(len(idx))
    return (out, states) if capture_layers else out  # type: ignore[return-value]


@dataclass
class HeadScore:
    label: str  # e.g. "lens", "distill-kl"
    layer: int
    hits: dict[int, int] = field(default_factory=dict)  # in the ranking decoding uses (a shortlist, if the head has one)
    full_hits: dict[int, int] = field(default_factory=dict)  # in the full-vocabulary ranking
    noprev_hits: dict[int, int] = field(default_factory=dict)  # a head that reads f(t-1): the same, never given it
    positions: int = 0
    seconds: float = 0.0  # time spent scoring this head (its projection, top-k and counts)
    outcomes: list[torch.Tensor] = field(default_factory=list)  # per prompt: bool [n_pos, len(KS)]
    top: list[torch.Tensor] = field(default_factory=list)  # per prompt: the head's top-max(k) tokens [n_pos, kmax]
    targets: list[torch.Tensor] = field(default_factory=list)  # per prompt: the final layer's argmax [n_pos]

    def rate(self, k: int) -> float:
        return self.hits.get(k, 0) / self.positions if self.positions else float("nan")

    def full_rate(self, k: int) -> float:
        return self.full_hits.get(k, 0) / self.positions if self.positions else float("nan")

    def noprev_rate(self, k: int) -> float | None:
        if not self.noprev_hits:
            return None
        return self.noprev_hits.get(k, 0) / self.positions if self.positions else float("nan")


def merge_scores(parts: list[list[HeadScore]]) -> list[HeadScore]:
    """One task's scores from its batches' (each a list over the same heads, in the same order), batch order kept
    for the per-position records."""
    merged = []
    for per_head in zip(*parts):
        first = per_head[0]
        out = HeadScore(first.label, first.layer)
        for sc in per_head:
            for mine, theirs in ((out.hits, sc.hits), (out.full_hits, sc.full_hits), (out.noprev_hits, sc.noprev_hits)):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            out.positions += sc.positions
            out.seconds += sc.seconds
            out.outcomes.extend(sc.outcomes)
            out.top.extend(sc.top)
            out.targets.extend(sc.targets)
        merged.append(out)
    return merged


def _has_shortlist(head) -> bool:
    return getattr(head, "shortlist", None) is not None


def _new_scores(model, heads, ks) -> dict:
    vocab = model.config.vocab_size
    if max(ks) > vocab:
        raise PPDError(f"k={max(ks)} is larger than the vocabulary ({vocab}); use smaller k")
    return {key: HeadScore(key[0], key[1], {k: 0 for k in ks}) for key in heads}


def _ranked(head, h, kmax: int, prev=None, known=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ranking decoding uses, the full-vocabulary ranking), top-``kmax`` each. A head with a shortlist guesses
    from it (EarlyExitHead.guess): that is the rate PPD and self-speculation see."""
    full = head(h, prev, known).topk(kmax, dim=-1).indices
    if not _has_shortlist(head):
        return full, full
    short = head.shortlist[head.shortlist_logits(h, prev, known).topk(kmax, dim=-1).indices]
    return short, full


def _score_positions(scores: dict, heads: dict, hidden: dict, y: torch.Tensor, ks,
                     keep_top: bool, sizes: list[int] | None = None) -> None:
    """Score positions: ``hidden[d]`` is [n, H], ``y`` the final layer's argmax there [n]; ``sizes`` splits the n
    positions into prompts (one prompt when omitted) for the per-prompt outcomes the simulator replays.
    ``hidden[FINAL]`` (when a head reads f(t-1)) is ``(prev, known)`` for those positions, as decoding feeds them;
    ``hidden[key]``, where present, is that head's own input (a block head's decoder layer output)."""
    sizes = sizes or [len(y)]
    prev, known = hidden.get(FINAL, (None, None))
    for key, head in heads.items():
        t0 = time.perf_counter()
        h = hidden.get(key, hidden[key[1]]).to(head.lm_head.weight.dtype)
        reads = getattr(head, "reads_prev", False)
        if reads and prev is None:
            raise PPDError(f"the head at layer {key[1]} reads f(t-1): score it from states captured with the final "
                           f"layer's (capture_final=True)")
        top, full = _ranked(head, h, max(ks), prev, known) if reads else _ranked(head, h, max(ks))
        hit = top == y[:, None]
        out = torch.stack([hit[:, :k].any(-1) for k in ks], dim=1).cpu()
        sc = scores[key]
        sc.positions += len(y)
        full_hit = full == y[:, None]
        alone = (_ranked(head, h, max(ks))[0] == y[:, None]) if reads else None
        for j, k in enumerate(ks):
            sc.hits[k] += int(out[:, j].sum())
            sc.full_hits[k] = sc.full_hits.get(k, 0) + int(full_hit[:, :k].any(-1).sum())
            if alone is not None:
                sc.noprev_hits[k] = sc.noprev_hits.get(k, 0) + int(alone[:, :k].any(-1).sum())
        sc.outcomes.extend(out.split(sizes))
        if keep_top:
            sc.top.extend(top.cpu().split(sizes))
            sc.targets.extend(y.cpu().split(sizes))
        sc.seconds += time.perf_counter() - t0


def refuse_block_heads_for_capture(heads: dict[tuple[str, int], torch.nn.Module]) -> None:
    """Captured generation keeps the layer-d state of generated positions only; a block head reads the prompt's too."""
    blocks = [f"{lab}@{d}" for (lab, d), h in heads.items() if getattr(h, "block", None) is not None]
    if blocks:
        raise PPDError(f"the block heads {blocks} read the layer-d states of the prompt too, which captured "
                       f"generation does not keep. Fix: measure=teacher_forced")


@torch.no_grad()
def score_captured(model, heads: dict[tuple[str, int], torch.nn.Module], continuations: list[list[int]],
                   states: list[dict[int, torch.Tensor]], ks=KS, progress=None,
                   keep_top: bool = False, chunk: int = 512) -> list[HeadScore]:
    """Score every head on the states ``greedy_continuations(capture_layers=...)`` kept; the targets are the
    generated tokens themselves (each is the final layer's argmax at its position). All prompts' positions are
    scored together, ``chunk`` rows per product: short continuations (SQuAD answers) would otherwise make many
    small, slow products."""
    refuse_block_heads_for_capture(heads)
    scores = _new_scores(model, heads, ks)
    items = [i for i, c in enumerate(continuations) if c]
    start = 0
    while start < len(items):
        group, rows = [], 0
        while start < len(items) and (not group or rows + len(continuations[items[start]]) <= chunk):
            group.append(items[start])
            rows += len(continuations[items[start]])
            start += 1
        hidden = {d: torch.cat([states[i][d] for i in group]) for d in states[group[0]] if d != FINAL}
        if FINAL in states[group[0]]:
            pairs = [previous_states(states[i][FINAL]) for i in group]
            hidden[FINAL] = (torch.cat([p for p, _ in pairs]), torch.cat([k for _, k in pairs]))
        y = torch.tensor([t for i in group for t in continuations[i]], device=model.device)
        _score_positions(scores, heads, hidden, y, ks, keep_top, sizes=[len(continuations[i]) for i in group])
        if progress is not None:
            progress.update(len(group))
    if progress is not None:
        progress.update(len(continuations) - len(items))
    return list(scores.values())


@torch.no_grad()
def score_heads(model, heads: dict[tuple[str, int], torch.nn.Module], prompts: list[list[int]],
                continuations: list[list[int]], ks=KS, batch_size: int = 4, progress=None,
                keep_top: bool = False) -> tuple[list[HeadScore], dict]:
    """Score every head (keyed by (label, layer)) at every generated position of every prompt, from a
    teacher-forced pass over prompt + continuation."""
    scores = _new_scores(model, heads, ks)
    layers = sorted({d for _, d in heads})
    extractor = FrozenBackbone(model, layers)
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
            at = {d: hidden[d][row, pos] for d in layers}
            at[FINAL] = previous_states(final[row, pos])
            for key, head in heads.items():  # a block head reads the whole text up to each position
                if getattr(head, "block", None) is not None:
                    at[key] = head.contextual(hidden[key[1]][row:row + 1, :p - 1 + n])[0, pos]
            _score_positions(scores, heads, at, y, ks, keep_top)
        if progress is not None:
            progress.update(len(idx))
    return list(scores.values()), stats
