"""How long speculation steps take at each batch size, and the speculation length that pays best.

Su, Giannoula and Pekhimenko (2023): the best speculation length depends on the batch size, because a
verification forward over b rows x (gamma + 1) tokens is nearly free while the hardware has spare compute and
costs in proportion once it has none. We profile the three pieces of a self-speculative step on this machine
(layers 1..d over b rows, the early head over b rows, layers d+1..L with the LM head over b rows x q tokens),
on a grid of b and q with a cached context, and interpolate piecewise-linearly between grid points (linear
extrapolation outside). With a per-token acceptance probability alpha (the head's match rate p_1(d)), a step
that drafts gamma tokens yields (1 - alpha^(gamma+1)) / (1 - alpha) tokens per row in expected value, so

    gamma*(b) = argmax_gamma  b * E[tokens](gamma) / step_time(b, gamma),      gamma = 0 (plain greedy) allowed,

where step_time(b, 0) = lower(b) + upper(b, 1) and step_time(b, gamma) = gamma * (lower(b) + head(b)) +
lower(b) + upper(b, gamma + 1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ppd_decode.profiling.latency import median_time
from ppd_decode.runtime.ragged import RaggedBatch
from ppd_decode.runtime.stack import crop_cache, embed, final_argmax, num_layers

BATCH_SIZES = (1, 2, 4, 8, 16)
QUERY_LENGTHS = (1, 2, 3, 5, 9)  # gamma + 1 for gamma in 0, 1, 2, 4, 8


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys) (sorted xs), extended linearly beyond both ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def expected_tokens(gamma: int, alpha: float) -> float:
    """Tokens a row gains per step: the accepted drafts (each accepted with probability alpha, given the ones
    before) plus the final layer's own next token."""
    alpha = min(max(alpha, 0.0), 1.0)
    return float(gamma + 1) if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass
class CostModel:
    layer: int
    context: int
    batch_sizes: list[int]
    query_lengths: list[int]
    lower: list[float]  # seconds, layers 1..d over b rows x 1 token, per batch size
    head: list[float]  # seconds, the early head over b rows x 1 token
    upper: list[list[float]]  # seconds, layers d+1..L + LM head over b rows x q tokens: [batch size][q]
    device: str = ""
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ evaluation
    def lower_time(self, b: int) -> float:
        return interpolate(self.batch_sizes, self.lower, b)

    def head_time(self, b: int) -> float:
        return interpolate(self.batch_sizes, self.head, b)

    def upper_time(self, b: int, q: int) -> float:
        per_b = [interpolate(self.query_lengths, row, q) for row in self.upper]
        return interpolate(self.batch_sizes, per_b, b)

    def step_time(self, b: int, gamma: int) -> float:
        if gamma == 0:
            return self.lower_time(b) + self.upper_time(b, 1)
        return gamma * (self.lower_time(b) + self.head_time(b)) + self.lower_time(b) + self.upper_time(b, gamma + 1)

    def throughput(self, b: int, gamma: int, alpha: float) -> float:
        """Predicted tokens per second over the batch."""
        return b * expected_tokens(gamma, alpha) / self.step_time(b, gamma)

    def best_gamma(self, b: int, alpha: float, max_gamma: int = 8) -> int:
        return max(range(max_gamma + 1), key=lambda g: (self.throughput(b, g, alpha), -g))

    def table(self, alpha: float, max_gamma: int = 8) -> dict[int, int]:
        return {b: self.best_gamma(b, alpha, max_gamma) for b in self.batch_sizes}

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(asdict(self), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        return cls(**json.loads(Path(path).read_text()))


@torch.no_grad()
def profile(model, head, layer: int, batch_sizes=BATCH_SIZES, query_lengths=QUERY_LENGTHS, context: int = 256,
            repeats: int = 5, progress: bool = False) -> CostModel:
    """Time the pieces of a step with real forwards on a ``context``-token cached prefix, for every batch size."""
    L = num_layers(model)
    dev = model.device
    lower, heads, upper = [], [], []
    sizes = list(batch_sizes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sizes), desc=f"profiling steps (d={layer})", dynamic_ncols=True)
    for b in sizes:
        # The real code path: a ragged batch (4D masks, per-row positions) over a cached random context.
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(10, model.config.vocab_size, (b, context), generator=g).tolist()
        batch = RaggedBatch(model, prompts, pad=0)
        pos = batch.pos[:, None]

        def lower_fn(batch=batch, pos=pos, b=b):
            batch.run(embed(model, torch.randint(10, 100, (b, 1), device=dev)), 0, layer, pos)
            crop_cache(batch.cache, context)

        def upper_fn(q, batch=batch, pos=pos, b=b):
            def fn():
                h = torch.randn(b, q, model.config.hidden_size, device=dev, dtype=model.dtype)
                final_argmax(model, batch.run(h, layer, L, pos + torch.arange(q, device=dev)))
                crop_cache(batch.cache, context)
            return fn

        h1 = torch.randn(b, 1, model.config.hidden_size, device=dev, dtype=model.dtype)
        lower.append(median_time(lower_fn, repeats))
        heads.append(median_time(lambda: head(h1).argmax(-1), repeats))
        upper.append([median_time(upper_fn(q), repeats) for q in query_lengths])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return CostModel(layer=layer, context=context, batch_sizes=sizes, query_lengths=list(query_lengths),
                     lower=lower, head=heads, upper=upper, device=str(dev),
                     meta={"threads": torch.get_num_threads(), "repeats": repeats,
                           "model": getattr(model.config, "_name_or_path", "")})
