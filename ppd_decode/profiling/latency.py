"""The compute-latency model of docs/method.md, fed with measured match rates and measured stage timings.

Two deployments:
* stage-pipelined (two workers split at layer d): E[T] = max(T2, T1(k)) + (1 - p_k) * T1miss per token, against
  T_greedy for plain greedy; compute per token = T1(k) + (1 - p_k) * T1miss + T2 busy seconds. T1(k) is worker A's
  work per token (k guesses through layers 1..d, the early head once); T1miss the real token's layers 1..d.
* replicated (k + 1 full-model workers, d >= L/2, one level): E[T] = p*d + (1-p)*L layer times per token;
  compute per token = L + (L - d)(k - p) layer passes.
* stage-pipelined with text chains (``PPDConfig.chain``): the same per B block, with T2 and T1(k) mixed by how often
  a block carries a chain (B's chained block: T2 over the guess + its chain, padded to min_block; A's: T1 over k
  guesses + the chain; each at the chain lengths observed), divided by the tokens each B block decides (1 + accepted
  chain tokens on average). Since A and B run side by side, a block takes the longer of the two: with the observed
  (B chain, A chain) pairs the model averages that maximum block by block (``side_by_side_block_time``).
A discrete-event simulator replays per-position match outcomes through each deployment; it must agree with the
closed forms (tests check within 2%).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ppd_decode.profiling.step_cost import CachedContext, median_time
from ppd_decode.models.packed_linear import unpacked
from ppd_decode.runtime.stack import final_argmax, final_logits, num_layers


# ------------------------------------------------------------------------------------------- closed forms
def stage_pipelined(p: float, t1k: float, t1: float, t2: float, t_greedy: float, chains: dict | None = None) -> dict:
    """``chains`` (text chains): ``b_share`` / ``a_share``, the shares of B's blocks and of A's guess blocks that carry
    a chain, ``t2_chain`` / ``t1k_chain`` their times, ``tokens_per_block``, and optionally ``block_max``
    (``side_by_side_block_time``)."""
    per_block, side_by_side = 1.0, None
    if chains:
        t2 = (1 - chains["b_share"]) * t2 + chains["b_share"] * chains["t2_chain"]
        t1k = (1 - chains["a_share"]) * t1k + chains["a_share"] * chains["t1k_chain"]
        per_block = chains["tokens_per_block"]
        # with ``block_max``: the mean over blocks of max(B's block, A's guess block beside it), which the max of the
        # two means understates when chained and plain blocks meet (a long chained B block beside a short A block)
        side_by_side = chains.get("block_max")
    latency = ((side_by_side if side_by_side is not None else max(t2, t1k)) + (1 - p) * t1) / per_block
    compute = (t1k + (1 - p) * t1 + t2) / per_block
    return {"latency": latency, "speedup": t_greedy / latency, "extra_compute": compute / t_greedy - 1,
            "split_greedy_speedup": t_greedy / (t1 + t2),
            "t2_block": t2, "t1k_block": t1k}  # the mean block times (with chains: plain and chained mixed)


def replicated(p: float, d: int, L: int, k: int) -> dict:
    latency = p * d + (1 - p) * L
    compute = L + (L - d) * (k - p)
    return {"latency": latency, "speedup": L / latency, "extra_compute": compute / L - 1}


# ------------------------------------------------------------------------------------------------ simulator
def simulate_stage_pipelined(outcomes: list[bool], t1k: float, t1: float, t2: float) -> float:
    """Event replay: B runs token i while A runs the k guesses for i + 1; B's decision at the end of its pass either
    releases the matching guess (hit) or makes A run the real token (miss). Returns mean time per token."""
    a_free = t1  # A ran the first real token
    start = t1  # B starts token 0
    t0 = start
    for hit in outcomes:
        b_done = start + t2
        a_done = max(a_free, start) + t1k  # A's guesses for the next token
        decided = b_done
        if hit:
            start = max(decided, a_done)
            a_free = a_done
        else:
            a_free = max(decided, a_done) + t1
            start = a_free
    return (start - t0) / max(1, len(outcomes))


def simulate_replicated(outcomes: list[bool], d: int, L: int, k: int) -> tuple[float, float]:
    """Event replay with k + 1 workers (layer-time units): the pass for token t+1 starts at layer d of token t's pass;
    on a hit it is the next main pass (done L layer times after it started), on a miss the next pass starts when t
    is decided. Returns (mean time per token, mean layer passes of compute per token)."""
    start = 0.0  # start of token t's main pass
    compute = 0.0
    for hit in outcomes:
        decided = start + L
        compute += L  # the main pass; k guesses each run layers 1..L, but a miss wastes them from layer d on
        if hit:
            compute += (L - d) * (k - 1)  # the other k - 1 guess passes ran layers d+1..L of their own for nothing
            start = start + d
        else:
            compute += (L - d) * k
            start = decided
    n = max(1, len(outcomes))
    return start / n, compute / n


# ------------------------------------------------------------------------------------------- stage timings
@dataclass
class StageTimes:
    d: int
    t1: dict[int, float]  # k -> seconds for layers 1..d on k guesses + the early head once (A's work per token)
    t1_miss: float  # layers 1..d on the real token after a miss (the head runs after the hand-off)
    t2: float  # layers d+1..L + final norm + LM head on one token
    greedy: float  # a full one-token forward (plain greedy's step)
    head: float  # the early head alone on one token (its guess: over its shortlist when it has one)
    layer: float  # one decoder layer on one token (tau)
    t2_rows: dict[int, float] | None = None  # rows -> layers d+1..L + final argmax on a block of that many rows
    # The same stage timings taken as the pipeline runs them, each stage beside the other one's work on another core
    # (``stage_load``): A's guess blocks (t1) beside B's block, B's blocks (t2, t2_rows) beside A's guess block. A
    # miss's re-run (t1_miss) runs while B waits, and greedy alone: those are kept from the timings alone.
    beside: "StageTimes | None" = None


def chain_timings(k: int, chain: int, min_block: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What to time for text chains of every length 1..chain: A's guess-block sizes (k guesses + the chain) and B's
    block rows (the guess + the chain, padded to min_block)."""
    lengths = range(1, chain + 1)
    return tuple(k + c for c in lengths), tuple(sorted({max(min_block, 1 + c) for c in lengths}))


def _block_timers(st: StageTimes, k: int, min_block: int):
    """B's block and A's guess block timed at the chain length c they carry (0: none; A's -1: no guess block)."""
    def b_time(c: int) -> float:
        return st.t2 if c == 0 else (st.t2_rows or {})[max(min_block, 1 + c)]

    def a_time(c: int) -> float:
        return 0.0 if c < 0 else st.t1[k + c]

    return b_time, a_time


def chained_block_times(st: StageTimes, k: int, min_block: int,
                        pairs: dict[tuple[int, int], int]) -> tuple[float, float]:
    """The mean time of A's chained guess blocks and of B's chained blocks, each block timed at its own chain length
    (``pairs``: (B's chain length, A's) -> blocks, as ``PPDEngine`` reports them)."""
    b_time, a_time = _block_timers(st, k, min_block)

    def mean(time, side: int) -> float:
        counts = [(key[side], c) for key, c in pairs.items() if key[side] > 0]
        n = sum(c for _, c in counts)
        return sum(c * time(length) for length, c in counts) / n if n else 0.0

    return mean(a_time, 1), mean(b_time, 0)


def side_by_side_block_time(st: StageTimes, k: int, min_block: int, pairs: dict[tuple[int, int], int]) -> float:
    """The mean over B's blocks of the longer of B's block and A's guess block running beside it, each timed at its
    own chain length (``pairs``: (B's chain length, A's; -1: A had no guesses) -> blocks, as ``PPDEngine`` reports
    them; 0: no chain)."""
    b_time, a_time = _block_timers(st, k, min_block)
    n = sum(pairs.values())
    return sum(c * max(b_time(cb), a_time(ca)) for (cb, ca), c in pairs.items()) / n if n else 0.0


def greedy_step_time(step, repeats: int, device=None) -> float:
    """Plain greedy's step as ``generate`` runs it: the model's own linears, not the stack's packed ones
    (packed_linear.py), so that predictions are speed-ups over the benchmark's reference, greedy with ``generate``."""
    with unpacked():
        return median_time(step, repeats, device)


@torch.no_grad()
def measure_stage_times(model, head, d: int, ks=(1, 2, 3, 5, 10), context: int = 300, repeats: int = 20,
                        t2_rows=(), load=None, load_rows: int = 4) -> StageTimes:
    """Real forwards on this machine with a ``context``-token cached prefix. The k guesses run as one batch of k
    tokens (shape-wise the same work as the pipelined worker does). With ``load`` (a ``stage_load.StageLoad``), also
    ``.beside``: A's and B's stages timed again while the helper runs the other stage's work (B's one-token block
    beside A's timings; A's guess block of ``load_rows`` tokens beside B's)."""
    L = num_layers(model)
    dev = model.device
    ctx = CachedContext(model, context, high=model.config.vocab_size)  # the step-cost profiler's cached context

    def timed(fn) -> float:
        return median_time(fn, repeats, dev)

    # What worker A does per token: the k guesses through layers 1..d, and the early head once (for the token B
    # works on). On a miss only the real token's layers sit on the critical path (the head runs after the hand-off).
    def a_stage() -> dict[int, float]:
        return {k: timed(ctx.step(0, d, k, lambda h, k=k: head.guess(h[:, -1], k))) for k in ks}

    def b_stage() -> tuple[float, dict[int, float] | None]:
        final = (lambda h: final_argmax(model, h))
        return timed(ctx.step(d, L, 1, final)), {r: timed(ctx.step(d, L, r, final)) for r in t2_rows} or None

    h1 = torch.randn(1, 1, model.config.hidden_size, device=dev, dtype=model.dtype)
    t2, t2r = b_stage()
    st = StageTimes(d=d, t1=a_stage(), t1_miss=timed(ctx.step(0, d, 1)), t2=t2,
                    greedy=greedy_step_time(ctx.step(0, L, 1, lambda h: final_logits(model, h)), repeats, dev),
                    head=timed(lambda: head.guess(h1[:, -1], 1)), layer=timed(ctx.step(0, 1, 1)), t2_rows=t2r)
    if load is not None:
        load.run(d, L, 1, context)  # B's block beside A's guess blocks
        t1 = a_stage()
        load.run(0, d, load_rows, context)  # A's guess block beside B's blocks
        t2, t2r = b_stage()
        load.idle()
        st.beside = dataclasses.replace(st, t1=t1, t2=t2, t2_rows=t2r)
    return st
