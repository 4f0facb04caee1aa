"""The one clock: wall time of work on a device, right on CPUs and GPUs alike.

On a CPU the work is done when the call returns, so ``time.perf_counter`` around it is the time. On CUDA a call
returns once its kernels are queued; the device is synchronised before the clock starts (so earlier work is not
charged) and before it stops (so this work is), which is what the step-cost profiler, the latency model's stage
times, ``DecodeResult.seconds`` and the benchmarks all read.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def sync(device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPUs, and for None)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Elapsed:
    """Seconds measured by ``stopwatch``; ``seconds`` is set when the block ends."""

    seconds: float = 0.0


@contextmanager
def stopwatch(device=None):
    """``with stopwatch(model.device) as t: ...`` then ``t.seconds``: the block's wall time, device work included."""
    t = Elapsed()
    sync(device)
    t0 = time.perf_counter()
    try:
        yield t
    finally:
        sync(device)
        t.seconds = time.perf_counter() - t0
