"""What crosses between the PPD workers, and how they connect (torch.distributed, point to point).

Per request, A sends B a header ``[GENERATE, prompt length, max_new_tokens, prefill_chunk]`` (longs), then the
prompt's layer-d states chunk by chunk. Per decoded block B answers ``[count, last token]``: how many tokens it
decided (the accepted part of the chain it verified, then its own argmax). With text chains on, A then sends the
chain for B's next block as ``[m, tokens..., 0...]`` (1 + chain longs) before the block's layer-d states
``[1 + m, H]``. For a head that reads f(t-1), B follows each answer that does not end the request with the final
normed state of the row whose argmax it sent (``[1, H]``, the model's dtype). When a request ends B sends where its
time went (``len(B_PARTS)`` doubles). ``PING`` times the per-token exchange; ``SHUTDOWN`` ends B.
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

class Link:
    """One worker's end of the point-to-point connection. Tensors cross on the wire device, the host for gloo and
    the worker's own GPU for NCCL (whose buffers must be on the device), and are handed to the worker on its compute
    device; on a CPU both are the host and nothing is copied."""

    def __init__(self, dist, peer: int, backend: str, device: torch.device):
        self.dist, self.peer, self.device = dist, peer, torch.device(device)
        self.wire = self.device if backend == "nccl" else torch.device("cpu")

    def send(self, t: torch.Tensor) -> None:
        self.dist.send(t.to(self.wire).contiguous(), dst=self.peer)

    def send_longs(self, values: list[int]) -> None:
        self.send(torch.tensor(values, dtype=torch.long))

    def buffer(self, *shape: int, dtype=torch.long) -> torch.Tensor:
        """A receive buffer on the wire (reused across messages of one shape)."""
        return torch.zeros(*shape, dtype=dtype, device=self.wire)

    def recv_into(self, buf: torch.Tensor) -> torch.Tensor:
        self.dist.recv(buf, src=self.peer)
        return buf

    def recv(self, *shape: int, dtype) -> torch.Tensor:
        """A new message of ``shape``, on the worker's compute device."""
        return self.recv_into(torch.empty(*shape, dtype=dtype, device=self.wire)).to(self.device)


def connect(rank: int, port: int, threads: int, parent: int, pin: bool = False, backend: str = "gloo",
            device="cpu") -> Link:
    import torch.distributed as dist

    watch_parent(parent)
    if pin:
        _pin(rank, threads)
    torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds each rank to its current device
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    return Link(dist, 1 - rank, backend, device)

def ping_from_a(link: Link, n: int, H: int, dtype) -> list[float]:
    """Round trips of exactly what crosses per token (a hidden state out, a token id back)."""
    link.send_longs([PING, n, 0, 0])
    h, y, times = torch.zeros(1, H, dtype=dtype, device=link.device), link.buffer(1), []
    for _ in range(n):
        t = time.perf_counter()
        link.send(h)
        int(link.recv_into(y))  # the token id reaches the host, as A needs it
        times.append(time.perf_counter() - t)
    return times

def prompt_chunks(n: int, chunk: int) -> list[int]:
    """The sizes of the pieces a prompt of ``n`` tokens crosses the split in (both workers cut it the same way)."""
    chunk = chunk or n
    return [min(chunk, n - s) for s in range(0, n, chunk)]

def send_block(link: Link, h: torch.Tensor, chain: list[int], M: int) -> None:
    """Hand B its next block: with text chains on (``M`` > 0) first the chain after the block's first row, as
    [m, tokens..., 0...] (1 + M longs), then the block's layer-d states [1, 1 + m, H]."""
    if M:
        link.send_longs([len(chain)] + chain + [0] * (M - len(chain)))
    link.send(h[0])
