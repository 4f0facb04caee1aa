"""The one step-cost profiler: how long "layers a..b, plus a head, over [batch, rows] on a cached context" takes here.

Every cost model in ppd reads it: the gamma policy of batched self-speculation (``gamma.CostModel``), the dynamic
tree sizes (``strategies.tree_speculative``, ``strategies.batched_tree``) and the latency model's stage timings
(``latency.measure_stage_times``). One timer (``median_time``: a warm-up call, then the median of the repeats,
synchronised with the device where work is asynchronous), one result type (``StepCosts``), one cache (per model,
held weakly, so a model freed and another allocated at its address never inherits its timings; within a model,
keyed by the head's kind and weight shapes and by the grid, so heads that cost alike share a profile).
"""

from __future__ import annotations

import json
import statistics
import threading
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ppd_decode.runtime.ragged import RaggedBatch
from ppd_decode.runtime.stack import crop_cache, embed, final_argmax, num_layers, random_context, run_layers
from ppd_decode.runtime.timing import stopwatch, sync


def median_time(fn, repeats: int, device=None) -> float:
    """Seconds ``fn()`` takes: one warm-up call, then the median over ``repeats`` calls. On CUDA the device is
    synchronised around each call, so the time is the GPU's work, not the kernel launches."""
    fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        with stopwatch(device) as t:
            fn()
        ts.append(t.seconds)
    return statistics.median(ts)


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys) (sorted xs), extended linearly beyond both ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class StepCosts:
    """Seconds of the two halves of a step split at ``layer``, on a cached context of ``context`` tokens, by live
    batch size b and new rows q per batch row: ``lower`` = layers 1..d (with the early head's argmax when
    ``head_in_lower``), ``upper`` = layers d+1..L and the final argmax; ``head`` = the early head alone on b x 1.
    Interpolated between grid points, extended linearly beyond them."""

    layer: int
    context: int
    batches: list[int]
    lower_rows: list[int]
    lower: list[list[float]]  # [batch][lower_rows]
    upper_rows: list[int]
    upper: list[list[float]]  # [batch][upper_rows]
    head: list[float] = field(default_factory=list)  # [batch]; empty when the head is timed inside ``lower``
    head_in_lower: bool = True
    meta: dict = field(default_factory=dict)

    @classmethod
    def grid(cls, rows: list[int], lower: list, upper: list, batches: list[int] = (1,), **kw) -> "StepCosts":
        """Costs on one grid of rows for both halves; ``lower``/``upper`` per batch size, or flat for one batch."""
        nest = (lambda t: [list(t)]) if not isinstance(lower[0], (list, tuple)) else (lambda t: [list(r) for r in t])
        return cls(layer=kw.pop("layer", 0), context=kw.pop("context", 0), batches=list(batches),
                   lower_rows=list(rows), lower=nest(lower), upper_rows=list(rows), upper=nest(upper), **kw)

    def _at(self, rows: list[int], table: list[list[float]], b: int, q: int) -> float:
        return interpolate(self.batches, [interpolate(rows, t, q) for t in table], b)

    def lower_time(self, b: int, q: int = 1) -> float:
        return self._at(self.lower_rows, self.lower, b, q)

    def upper_time(self, b: int, q: int = 1) -> float:
        return self._at(self.upper_rows, self.upper, b, q)

    def head_time(self, b: int) -> float:
        return interpolate(self.batches, self.head, b) if self.head else 0.0

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(asdict(self), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> "StepCosts":
        return cls(**json.loads(Path(path).read_text()))


class CachedContext:
    """``batch`` rows of ``context`` random tokens in a KV cache (a ``RaggedBatch`` when ``ragged``: the batched
    strategies' code path, with 4D masks and per-row positions), on which ``step`` runs a block and crops it back."""

    def __init__(self, model, context: int, batch: int = 1, ragged: bool = False, high: int = 100):
        self.model, self.context, self.batch = model, context, batch
        self.dev = model.device
        if ragged:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(10, model.config.vocab_size, (batch, context), generator=g).tolist()
            self.ragged = RaggedBatch(model, prompts, pad=0)
            self.cache = self.ragged.cache
        else:
            self.ragged = None
            self.cache = random_context(model, context, batch=batch, high=high)

    def step(self, start: int, end: int, rows: int, finish=None):
        """A callable: layers ``start..end-1`` over [batch, rows] new positions (token embeddings from layer 0, random
        hidden states above it), then ``finish(hidden)`` (a head's argmax, the final argmax), then the cache cropped
        back to the context."""
        m, b = self.model, self.batch

        def fn():
            if start == 0:
                h = embed(m, torch.randint(10, 100, (b, rows), device=self.dev))
            else:
                h = torch.randn(b, rows, m.config.hidden_size, device=self.dev, dtype=m.dtype)
            if self.ragged is not None:
                out = self.ragged.run(h, start, end, self.ragged.pos[:, None] + torch.arange(rows, device=self.dev))
            else:
                out = run_layers(m, h, start, end, self.cache, past=self.context)
            result = finish(out) if finish is not None else out
            crop_cache(self.cache, self.context)
            return result
        return fn


_PROFILES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@torch.no_grad()
def profile_steps(model, head, layer: int, batches=(1,), lower_rows=(1,), upper_rows=(1,), context: int = 256,
                  repeats: int = 3, head_in_lower: bool = True, ragged: bool = False,
                  progress: bool = False) -> StepCosts:
    """Time the two halves of a step split at ``layer`` on this machine, for every batch size and row count (once
    per model, head and grid in this process: later calls read the cache). ``head_in_lower=False`` times the early
    head on its own (``StepCosts.head``) instead of inside the lower half."""
    key = (layer, _shape_of(head), tuple(batches), tuple(lower_rows), tuple(upper_rows), context, repeats,
           head_in_lower, ragged, torch.get_num_threads())
    with _LOCK:
        per_model = _PROFILES.setdefault(model, {})
        if key in per_model:
            return per_model[key]
    L, dev = num_layers(model), model.device
    # the head as decoding calls it: its guesses, over its shortlist where it has one (not the whole projection)
    early = (lambda h: head.guess(h, 1)) if head_in_lower else None
    final = (lambda h: final_argmax(model, h))
    lower, upper, heads = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc=f"profiling steps (d={layer})", dynamic_ncols=True)
    for b in batches:
        ctx = CachedContext(model, context, batch=b, ragged=ragged)
        lower.append([median_time(ctx.step(0, layer, q, early), repeats, dev) for q in lower_rows])
        upper.append([median_time(ctx.step(layer, L, q, final), repeats, dev) for q in upper_rows])
        if not head_in_lower:
            h1 = torch.randn(b, 1, model.config.hidden_size, device=dev, dtype=model.dtype)
            heads.append(median_time(lambda: head.guess(h1, 1), repeats, dev))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    costs = StepCosts(layer=layer, context=context, batches=list(batches), lower_rows=list(lower_rows), lower=lower,
                      upper_rows=list(upper_rows), upper=upper, head=heads, head_in_lower=head_in_lower,
                      meta={"threads": torch.get_num_threads(), "repeats": repeats, "ragged": ragged,
                            "device": str(dev), "model": getattr(model.config, "_name_or_path", "")})
    with _LOCK:
        _PROFILES.setdefault(model, {})[key] = costs
    return costs


def _shape_of(head) -> tuple:
    """What a head's cost depends on: its kind and the shapes of its weights (heads alike in both cost alike)."""
    if head is None:
        return ()
    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in head.named_parameters())
    return type(head).__name__, params, tuple((n, tuple(b.shape)) for n, b in head.named_buffers())
