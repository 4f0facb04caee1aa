"""Heads that read f(t-1) or the text before (block heads) for the strategy tests, and spies that record what a
strategy fed them (a module of its own, so PPD's spawned workers can unpickle it)."""

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


class ForwardSpyHead(EarlyExitHead):
    """Records, row by row, every (h, f(t-1)) its forward is given where f(t-1) is (strategies that rank through
    the whole projection: trees, batched drafting)."""

    spy_path: str = ""

    def forward(self, hidden, prev=None, known=None):
        if prev is not None and self.spy_path:
            path = Path(self.spy_path)
            seen = torch.load(path) if path.is_file() else []
            H = hidden.shape[-1]
            seen.extend(zip(hidden.detach().reshape(-1, H).clone(), prev.detach().reshape(-1, H).clone()))
            torch.save(seen, path)
        return super().forward(hidden, prev, known)


def check_fed_f_prev(m, d: int, sequence: list[int] | list[list[int]], seen) -> int:
    """Every recorded (h, prev) must be (h_d(t), f(t-1)) at some position t of ``sequence`` (prompt + output; or of
    one of several such sequences): prev the final layer's normed state at t-1. Returns how many were checked."""
    sequences = sequence if sequence and isinstance(sequence[0], list) else [sequence]
    with torch.no_grad():
        states = [m(torch.tensor([s]), output_hidden_states=True).hidden_states for s in sequences]
    for h, prev in seen:
        best = min(((float((hs[d][0] - h).abs().amax(-1).min()), hs) for hs in states), key=lambda x: x[0])[1]
        layer, final = best[d][0], best[-1][0]
        t = int((layer - h).abs().amax(-1).argmin())
        assert torch.allclose(layer[t], h, atol=1e-8), "a guess from a state that is not h_d of the sequence"
        assert t > 0 and torch.allclose(final[t - 1], prev, atol=1e-8), f"f(t-1) at t={t} is not the final state"
    return len(seen)


def block_head(m, d: int, seed: int, noise: float = 0.3, cls=EarlyExitHead):
    """A block head at layer d whose decoder layer is the model's layer d+1 with noise on its attention and MLP
    weights (so its output is not the model's own next layer)."""
    g = torch.Generator().manual_seed(seed)
    h = cls.from_model(m, d, block=True)
    with torch.no_grad():
        for name, p in h.block.named_parameters():
            if "proj" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise * p.abs().mean())
    return h.requires_grad_(False)


class BlockSpyHead(EarlyExitHead):
    """Records every batch of rows a strategy feeds a block head's cache while decoding: (first position, the
    layer-d states, the block's outputs); saved to ``spy_path`` as it goes."""

    spy_path: str = ""

    def contextual(self, hidden, cache=None, start=0):
        out = super().contextual(hidden, cache, start)
        if cache is not None and self.spy_path:
            path = Path(self.spy_path)
            seen = torch.load(path) if path.is_file() else []
            seen.append((start, hidden.detach()[0].clone(), out.detach()[0].clone()))
            torch.save(seen, path)
        return out


def check_fed_the_text(m, head, sequence: list[int], seen) -> int:
    """Wherever a fed row is the layer-d state of the final text (prompt + output) at its position (its token and
    everything before it were right), the block's output there must be its output over that text at once: a cache
    holding a rejected guess or draft, or missing a position, gives another. Returns how many rows were checked."""
    with torch.no_grad():
        layer = m(torch.tensor([sequence]), output_hidden_states=True).hidden_states[head.layer][0]
        whole = head.contextual(layer[None])[0]
    checked = 0
    for start, hidden, out in seen:
        for i in range(len(hidden)):
            t = start + i
            if t < len(sequence) and torch.allclose(hidden[i], layer[t], atol=1e-8):
                assert torch.allclose(out[i], whole[t], atol=1e-8), f"the block head's cache was wrong at {t}"
                checked += 1
    return checked
