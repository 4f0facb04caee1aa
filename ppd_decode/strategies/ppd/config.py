"""The PPD engine's settings and its one error type."""

from __future__ import annotations

from dataclasses import dataclass, field

from ppd_decode.errors import PPDError
from ppd_decode.strategies.base import Stats


class WorkerError(PPDError):
    """A pipeline worker died, hung or raised; the message says which and why."""


@dataclass
class PPDConfig:
    layer: int | None = None  # d: the split (default: the only head given)
    # Guesses per token, run as one block through layers 1..d. With the packed matmuls a block of up to 4 costs about
    # what one token does (and with MKL's plain weights 4 rows cost less than 2 or 3), so 4 guesses are nearly free.
    k: int = 4
    # Of the k, how many come from prompt lookup (the token that followed the text's last n-gram before; see
    # ppd_decode.runtime.text_guesses); the head fills the rest. 0: the head's top k only, the paper's method.
    lookup: int = 1
    # The prompt crosses the split in chunks of this many tokens, so B prefills chunk i while A prefills chunk i + 1
    # (pipeline parallelism for the prompt; a long prompt's prefill is most of a short answer's time). 0: one piece.
    prefill_chunk: int = 64
    speculate: bool = True  # False: the same two-stage split without guessing (the baseline PPD must beat)
    # Text chains: the lookup guess comes with up to this many tokens that followed it in the text, run on A in the
    # same guess block (after the siblings, each seeing the lookup guess and the chain before it). When the lookup
    # guess is B's token, A hands B the guess and its chain at once and B verifies them as one block: it emits its
    # own argmax after each row up to the first chain token that differs (exact, as in speculative decoding), so a
    # copied stretch of text costs one B step per chain instead of one per token. 0: one token per B step (the paper);
    # no chains either without a lookup guess (lookup=0) or without guessing (speculate=False). Longer chains cost
    # only the rows B verifies at once; 6 measured best (docs/results.md, "Text chains pay").
    chain: int = 6
    # B's blocks of 2..min_block-1 rows are padded to min_block rows (stack.pad_block: cheaper with MKL's plain
    # weights, harmless with the packed ones); 1: never.
    min_block: int = 4
    threads_per_worker: int = 1
    # Pin each worker to its own cores (os.sched_setaffinity; A gets the first threads_per_worker of the cores this
    # process may use, B the next), so neither migrates nor shares a core with the other. Ignored where there are
    # too few cores or no affinity API.
    pin_cores: bool = False
    # Where each stage runs ("cpu", "cuda", "cuda:1"; None: the model's device). Two GPUs: A and B on their own;
    # one GPU: both on it, as two processes sharing the device (their messages staged through the host).
    device_a: str | None = None
    device_b: str | None = None
    # How the stages talk: "nccl" (GPU to GPU, the tensors stay on the devices), "gloo" (through the host), or
    # "auto": nccl between two different GPUs where torch has it, else gloo.
    backend: str = "auto"
    # Benchmarking only (scripts/bench_decode.py --oracle): with a value p, A's guesses come from the greedy reference passed
    # to ``PPDEngine.generate(reference=...)``: the true next token with probability p, else k wrong ones. The head
    # still runs (its cost stays on A's path), its ranking is discarded. Isolates the engine from the head.
    oracle_p: float | None = None
    oracle_seed: int = 0
    timeout_s: float = 120.0  # a worker silent this long (per token) counts as hung
    fallback: bool = True  # finish with sequential greedy when a worker fails; False: raise WorkerError


@dataclass
class PPDStats(Stats):
    """What one request did in the pipeline (summed over requests by ``merge``)."""

    chain_drafted: int = 0  # text-chain tokens handed to B after a matching lookup guess
    chain_accepted: int = 0  # ... of which B's argmax agreed
    chains_sent: int = 0  # B blocks that carried a chain
    chain_blocks: int = 0  # A guess blocks that ran a chain after the siblings
    guess_blocks: int = 0
    prev_guesses: int = 0  # guess rankings whose head read f(t-1) from B (a head that reads it; else 0)
    block_pairs: dict = field(default_factory=dict)  # (B's chain length, A's; -1: no guesses) -> blocks
    a_busy_s: float = 0.0  # the decoding phase's compute and waits, per worker (prefill apart)
    a_wait_s: float = 0.0
    b_busy_s: float = 0.0
    b_wait_s: float = 0.0
    a_time_s: dict = field(default_factory=dict)  # worker A's wall time by part (workers.A_PARTS)
    b_time_s: dict = field(default_factory=dict)  # worker B's (workers.B_PARTS)
    token_times: list = field(default_factory=list)  # seconds from the request's start to each token
    fallback: str | None = None  # why a worker failed, when the request was finished sequentially

