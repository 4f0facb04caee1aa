"""The other pipeline stage's work, kept running on another core while this process times its own stage.

In the PPD engine worker A's guess block and worker B's block run at the same time on two cores, and on a CPU
they share the memory bus and the last-level cache: both stream their layers' weights (matrix-vector work bound
by memory), so each runs slower beside the other than alone (docs/benchmarking.md). Stage
timings taken with the other core idle therefore make the latency model optimistic. ``StageLoad`` is a helper
process (one thread) that runs decoder layers ``start..end-1`` over a block of ``rows`` tokens in a loop, against a
cached prefix of ``context`` tokens, until told to stop: ``latency.measure_stage_times(..., load=StageLoad(model))``
times A's guess blocks beside B's work and B's blocks beside A's, as the pipeline runs them.

Start it once and switch its work between timings; it exits when closed or when its parent process disappears.
"""

from __future__ import annotations

import os
import queue
import time

import torch

from ppd_decode.runtime.procs import Managed, share_with_spawned, watch_parent
from ppd_decode.runtime.stack import crop_cache, final_argmax, num_layers, random_context, run_layers


@torch.no_grad()
def _serve(model, threads: int, parent: int, commands, replies) -> None:
    watch_parent(parent)
    torch.set_num_threads(threads)
    L = num_layers(model)
    while True:
        cmd = commands.get()
        if cmd is None:
            return
        if cmd == "idle":
            continue
        start, end, rows, context = cmd
        cache = random_context(model, context, high=model.config.vocab_size)
        h = torch.randn(1, rows, model.config.hidden_size, dtype=model.dtype, device=model.device)
        done = 0
        while True:  # until the next command: any command stops the work
            out = run_layers(model, h, start, end, cache, past=context)
            if end == L:  # B's work ends with the final argmax
                final_argmax(model, out)
            crop_cache(cache, context)
            done += 1
            if done == 1:
                replies.put("running")
            try:
                stop = commands.get_nowait()
            except queue.Empty:
                continue
            replies.put(done)  # how many blocks ran: the caller can check that the load was real
            if stop is None:
                return
            break


class StageLoad(Managed):
    """``with StageLoad(model) as load: load.run(start, end, rows, context); ...; blocks = load.idle()``."""

    def __init__(self, model, threads: int = 1, timeout_s: float = 120.0):
        self.model, self.threads, self.timeout_s = model, threads, timeout_s
        self.proc = None
        self.running = False

    def start(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            return
        ctx = torch.multiprocessing.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        share_with_spawned(self.model)  # the helper reads the same weights, as the other worker would
        self.proc = ctx.Process(target=_serve, args=(self.model, self.threads, os.getpid(), self.commands,
                                                     self.replies), daemon=True, name="ppd-stage-load")
        self.proc.start()

    def _reply(self):
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self.replies.get(timeout=0.2)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"the stage-load helper exited (code {self.proc.exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the stage-load helper did not answer for {self.timeout_s:.0f}s") from None

    def run(self, start: int, end: int, rows: int, context: int) -> None:
        """Keep layers ``start..end-1`` busy on ``rows`` tokens (returns once the first block has run)."""
        self.start()
        if self.running:
            self.idle()
        self.commands.put((start, end, rows, context))
        if self._reply() != "running":
            raise RuntimeError("the stage-load helper did not start its work")
        self.running = True

    def idle(self) -> int:
        """Stop the work; returns how many blocks it ran since ``run``."""
        if not self.running:
            return 0
        self.commands.put("idle")
        self.running = False
        return int(self._reply())

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.is_alive():
                self.commands.put(None)  # stops the work too, if any
                self.proc.join(timeout=10)
        finally:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5)
            self.proc, self.running = None, False
