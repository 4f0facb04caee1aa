"""The PPD engine's settings and its one error type."""

from __future__ import annotations

from dataclasses import dataclass

from ppd_decode.errors import PPDError


class WorkerError(PPDError):
    """A pipeline worker died, hung or raised; the message says which and why."""


@dataclass
class PPDConfig:
    layer: int | None = None  # d: the split (default: the only head given)
    # Guesses per token, run as one block through layers 1..d. On this CPU a block of 4 costs less than one of 2 or 3
    # (1.4x one token against 1.6x / 1.75x: the BLAS kernels change at 4 rows), so 4 is the default.
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
    # no chains either without a lookup guess (lookup=0) or without guessing (speculate=False). 6 measured best here
    # (docs/benchmarks/ppd_chains.*: 1.51x greedy against 1.43x with 3; docs/benchmarks/decode_chains.*: 3 against 0,
    # 1.34x against 1.17x).
    chain: int = 6
    # B's blocks of 2..min_block-1 rows are padded to min_block rows (stack.pad_block: cheaper on a CPU); 1: never.
    min_block: int = 4
    threads_per_worker: int = 1
    # Pin each worker to its own cores (os.sched_setaffinity; A gets the first threads_per_worker of the cores this
    # process may use, B the next), so neither migrates nor shares a core with the other. Ignored where there are
    # too few cores or no affinity API.
    pin_cores: bool = False
    timeout_s: float = 120.0  # a worker silent this long (per token) counts as hung
    fallback: bool = True  # finish with sequential greedy when a worker fails; False: raise WorkerError
