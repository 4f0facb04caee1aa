"""Heads that read f(t-1) for the strategy tests, and a spy that records what a strategy fed it (a module of its own,
so PPD's spawned workers can unpickle it)."""

from pathlib import Path

import torch

from ppd_decode.models.heads import EarlyExitHead


def prev_head(m, d: int, seed: int, noise: float = 0.0, mix: float = 0.3, cls=EarlyExitHead):
    """The logit lens at layer d plus a random f(t-1) term and stand-in (``mix``) and noisy rows (``noise``)."""
    g = torch.Generator().manual_seed(seed)
    h = cls.from_model(m, d, reads_prev=True)
    with torch.no_grad():
        for p in (h.prev_proj.weight, h.prev_null):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * mix)
        h.lm_head.weight.add_(torch.randn(h.lm_head.weight.shape, generator=g, dtype=h.lm_head.weight.dtype) * noise)
    return h


class SpyHead(EarlyExitHead):
    """Records every (h, f(t-1)) it is asked to guess from where f(t-1) was given; saved to ``spy_path`` as it goes."""

    spy_path: str = ""

    def _record(self, hidden, prev):
        if prev is not None and self.spy_path:
            path = Path(self.spy_path)
            seen = torch.load(path) if path.is_file() else []
            seen.append((hidden.detach().reshape(-1).clone(), prev.detach().reshape(-1).clone()))
            torch.save(seen, path)

    def guess(self, hidden, k, prev=None):
        self._record(hidden, prev)
        return super().guess(hidden, k, prev)

    def guess_with_confidence(self, hidden, prev=None):
        self._record(hidden, prev)
        return super().guess_with_confidence(hidden, prev)


def check_fed_f_prev(m, d: int, sequence: list[int], seen) -> int:
    """Every recorded (h, prev) must be (h_d(t), f(t-1)) at some position t of ``sequence`` (prompt + output): prev
    the final layer's normed state at t-1. Returns how many were checked."""
    with torch.no_grad():
        hs = m(torch.tensor([sequence]), output_hidden_states=True).hidden_states
    layer, final = hs[d][0], hs[-1][0]
    for h, prev in seen:
        t = int((layer - h).abs().amax(-1).argmin())
        assert torch.allclose(layer[t], h, atol=1e-8), "a guess from a state that is not h_d of the sequence"
        assert t > 0 and torch.allclose(final[t - 1], prev, atol=1e-8), f"f(t-1) at t={t} is not the final state"
    return len(seen)
