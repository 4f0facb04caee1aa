"""How long speculation steps take at each batch size, and the speculation length that pays best.

Su, Giannoula and Pekhimenko (2023): the best speculation length depends on the batch size, because a
verification forward over b rows x (gamma + 1) tokens is nearly free while the hardware has spare compute and
costs in proportion once it has none. The three pieces of a self-speculative step (layers 1..d over b rows,
the early head over b rows, layers d+1..L with the LM head over b rows x q tokens) come from the step-cost
profiler (``step_cost.profile_steps``, on the batched strategies' ragged code path), interpolated between grid
points. With a per-token acceptance probability alpha (the head's match rate p_1(d)), a step
that drafts gamma tokens yields (1 - alpha^(gamma+1)) / (1 - alpha) tokens per row in expected value, so

    gamma*(b) = argmax_gamma  b * E[tokens](gamma) / step_time(b, gamma),      gamma = 0 (plain greedy) allowed,

where step_time(b, 0) = lower(b) + upper(b, 1) and step_time(b, gamma) = gamma * (lower(b) + head(b)) +
lower(b) + upper(b, gamma + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ppd_decode.profiling.step_cost import StepCosts, interpolate, profile_steps

__all__ = ["BATCH_SIZES", "QUERY_LENGTHS", "CostModel", "expected_tokens", "interpolate", "profile"]

BATCH_SIZES = (1, 2, 4, 8, 16)
QUERY_LENGTHS = (1, 2, 3, 5, 9)  # gamma + 1 for gamma in 0, 1, 2, 4, 8


def expected_tokens(gamma: int, alpha: float) -> float:
    """Tokens a row gains per step: the accepted drafts (each accepted with probability alpha, given the ones
    before) plus the final layer's own next token."""
    alpha = min(max(alpha, 0.0), 1.0)
    return float(gamma + 1) if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass
class CostModel:
    """The gamma policy over a profile of step costs (``StepCosts`` with the early head timed on its own)."""

    costs: StepCosts

    @property
    def layer(self) -> int:
        return self.costs.layer

    @property
    def batch_sizes(self) -> list[int]:
        return self.costs.batches

    def step_time(self, b: int, gamma: int) -> float:
        c = self.costs
        if gamma == 0:
            return c.lower_time(b, 1) + c.upper_time(b, 1)
        return gamma * (c.lower_time(b, 1) + c.head_time(b)) + c.lower_time(b, 1) + c.upper_time(b, gamma + 1)

    def throughput(self, b: int, gamma: int, alpha: float) -> float:
        """Predicted tokens per second over the batch."""
        return b * expected_tokens(gamma, alpha) / self.step_time(b, gamma)

    def best_gamma(self, b: int, alpha: float, max_gamma: int = 8) -> int:
        return max(range(max_gamma + 1), key=lambda g: (self.throughput(b, g, alpha), -g))

    def table(self, alpha: float, max_gamma: int = 8) -> dict[int, int]:
        return {b: self.best_gamma(b, alpha, max_gamma) for b in self.batch_sizes}

    def save(self, path: str | Path) -> Path:
        return self.costs.save(path)

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        return cls(StepCosts.load(path))


def profile(model, head, layer: int, batch_sizes=BATCH_SIZES, query_lengths=QUERY_LENGTHS, context: int = 256,
            repeats: int = 5, progress: bool = False) -> CostModel:
    """Profile the pieces of a step with real forwards on a ``context``-token cached prefix, for every batch size."""
    return CostModel(profile_steps(model, head, layer, batches=batch_sizes, lower_rows=(1,),
                                   upper_rows=query_lengths, context=context, repeats=repeats, head_in_lower=False,
                                   ragged=True, progress=progress))
