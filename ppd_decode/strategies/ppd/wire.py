"""What crosses between the PPD workers, and how they connect (torch.distributed, point to point).

Per request, A sends B a header ``[GENERATE, prompt length, max_new_tokens, prefill_chunk]`` (longs), then the
prompt's layer-d states chunk by chunk. Per decoded block B answers ``[count, last token]``: how many tokens it
decided (the accepted part of the chain it verified, then its own argmax). With text chains on, A then sends the
chain for B's next block as ``[m, tokens..., 0...]`` (1 + chain longs) before the block's layer-d states
``[1 + m, H]``. When a request ends B sends where its time went (``len(B_PARTS)`` doubles). ``PING`` times the
per-token exchange; ``SHUTDOWN`` ends B.
"""

from __future__ import annotations

import os
import socket
import time

import torch

from ppd_decode.runtime.procs import watch_parent

SHUTDOWN, GENERATE, PING = 0, 1, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _pin(rank: int, threads: int) -> None:
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 * threads:
        os.sched_setaffinity(0, cpus[rank * threads:(rank + 1) * threads])

def connect(rank: int, port: int, threads: int, parent: int, pin: bool = False):
    import torch.distributed as dist

    watch_parent(parent)
    if pin:
        _pin(rank, threads)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    return dist

def ping_from_a(dist, n: int, H: int, dtype) -> list[float]:
    """Round trips of exactly what crosses per token (a hidden state out, a token id back)."""
    dist.send(torch.tensor([PING, n, 0, 0], dtype=torch.long), dst=1)
    h, y, times = torch.zeros(1, H, dtype=dtype), torch.zeros(1, dtype=torch.long), []
    for _ in range(n):
        t = time.perf_counter()
        dist.send(h, dst=1)
        dist.recv(y, src=1)
        times.append(time.perf_counter() - t)
    return times

def prompt_chunks(n: int, chunk: int) -> list[int]:
    """The sizes of the pieces a prompt of ``n`` tokens crosses the split in (both workers cut it the same way)."""
    chunk = chunk or n
    return [min(chunk, n - s) for s in range(0, n, chunk)]

def send_block(dist, h: torch.Tensor, chain: list[int], M: int) -> None:
    """Hand B its next block: with text chains on (``M`` > 0) first the chain after the block's first row, as
    [m, tokens..., 0...] (1 + M longs), then the block's layer-d states [1, 1 + m, H]."""
    if M:
        dist.send(torch.tensor([len(chain)] + chain + [0] * (M - len(chain)), dtype=torch.long), dst=1)
    dist.send(h[0].contiguous(), dst=1)
