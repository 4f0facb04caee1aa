"""The PPD driver: starts the two workers once, serves many prompts, and never yields a wrong token.

A worker that dies or falls silent never yields a wrong token: the driver stops both workers and finishes the
request with plain greedy decoding from the tokens already decided (or raises ``WorkerError`` with
``fallback=False``). A bad request is refused before any worker starts.
"""

from __future__ import annotations

import os
import queue
import sys
import time

import torch

from ppd_decode.errors import HeadMismatchError, PPDError
from ppd_decode.models.heads import F_PREV, H_D, H_PREFIX, check_layer
from ppd_decode.runtime.procs import Managed, share_with_spawned
from ppd_decode.runtime.stack import eos_ids, num_layers
from ppd_decode.strategies.base import DecodeResult, DecodingStrategy, pick_head, register
from ppd_decode.strategies.ppd import report
from ppd_decode.strategies.ppd.config import PPDConfig, PPDStats, WorkerError
from ppd_decode.strategies.ppd.wire import free_port
from ppd_decode.strategies.ppd.workers import worker_a, worker_b


class PPDEngine(Managed):
    """Start once, serve many prompts: ``engine.generate(ids, max_new_tokens, on_token=print)``."""

    def __init__(self, model, head, config: PPDConfig | None = None):
        self.model, self.head = model, head
        self.cfg = config or PPDConfig()
        L = num_layers(model)
        if self.cfg.layer is None:
            self.cfg.layer = head.layer
        check_layer(model, self.cfg.layer)
        if head.layer != self.cfg.layer:
            raise HeadMismatchError(f"the head reads layer {head.layer}, not the split layer {self.cfg.layer}")
        lm = head.lm_head
        if lm.in_features != model.config.hidden_size or lm.out_features != model.get_output_embeddings().out_features:
            raise HeadMismatchError(
                f"the head maps {lm.in_features} -> {lm.out_features}, this model needs {model.config.hidden_size} -> "
                f"{model.get_output_embeddings().out_features}: it was trained for another model")
        if self.cfg.k < 1:
            raise PPDError(f"k must be >= 1 guesses per token, got {self.cfg.k}")
        if self.cfg.k > lm.out_features:
            raise PPDError(f"k={self.cfg.k} exceeds the vocabulary ({lm.out_features})")
        if self.cfg.prefill_chunk < 0:
            raise PPDError(f"prefill_chunk must be >= 0 tokens (0: the whole prompt at once), got {self.cfg.prefill_chunk}")
        if not 0 <= self.cfg.lookup <= self.cfg.k:
            raise PPDError(f"lookup={self.cfg.lookup} guesses must be between 0 and k={self.cfg.k}")
        if self.cfg.chain < 0:
            raise PPDError(f"chain must be >= 0 tokens (0: no text chains), got {self.cfg.chain}")
        if not (self.cfg.lookup and self.cfg.speculate):
            self.cfg.chain = 0  # a chain follows the lookup guess: none to follow
        if self.cfg.min_block < 1:
            raise PPDError(f"min_block must be >= 1 (1: no padding), got {self.cfg.min_block}")
        self._resolve_devices()
        if self.cfg.oracle_p is not None:
            if not 0.0 <= self.cfg.oracle_p <= 1.0:
                raise PPDError(f"oracle_p={self.cfg.oracle_p} must be a probability in [0, 1]")
            self.cfg.lookup = self.cfg.chain = 0  # the oracle is the only guess source
        self.L = L
        self.eos = eos_ids(model)
        self.procs: list = []

    def _resolve_devices(self) -> None:
        """Fill in each stage's device and the backend (see PPDConfig), refusing what cannot run here."""
        c = self.cfg
        devs = []
        for name in ("device_a", "device_b"):
            try:
                dev = torch.device(getattr(c, name) or self.model.device)
            except (RuntimeError, TypeError) as e:
                raise PPDError(f"{name}={getattr(c, name)!r} is not a device ({e}). Fix: cpu, cuda or cuda:N") from None
            if dev.type == "cuda":
                if not torch.cuda.is_available():
                    raise PPDError(f"{name}={dev} but this torch sees no GPU. Fix: {name}=cpu, or install a CUDA "
                                   f"build of torch (README, GPU install)")
                dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
                if dev.index >= torch.cuda.device_count():
                    raise PPDError(f"{name}={dev}: this machine has {torch.cuda.device_count()} GPU(s). "
                                   f"Fix: cuda:0..cuda:{torch.cuda.device_count() - 1}")
            elif dev.type != "cpu":
                raise PPDError(f"{name}={dev}: the PPD engine runs on cpu or cuda devices")
            devs.append(dev)
            setattr(c, name, str(dev))
        two_gpus = all(d.type == "cuda" for d in devs) and devs[0] != devs[1]
        if c.backend == "auto":
            c.backend = "nccl" if two_gpus and torch.distributed.is_nccl_available() else "gloo"
        if c.backend not in ("gloo", "nccl"):
            raise PPDError(f"backend={c.backend!r}; use auto, gloo or nccl")
        if c.backend == "nccl" and not two_gpus:
            raise PPDError(f"backend=nccl needs the two stages on two different GPUs (got {devs[0]} and {devs[1]}; "
                           f"NCCL cannot connect two processes on one device). Fix: backend=gloo or auto")

    # -- lifecycle
    def start(self) -> None:
        if self.alive():
            return
        self.close()
        ctx = torch.multiprocessing.get_context("spawn")
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        port, parent = free_port(), os.getpid()
        share_with_spawned(self.model)
        share_with_spawned(self.head)  # (a block head's layer is a copy of the model's, capture hooks included)
        a = ctx.Process(target=worker_a, args=(self.model, self.head, self.cfg.layer, self.cfg, port, parent,
                                                self.requests, self.results), daemon=True, name="ppd-stage-A")
        b = ctx.Process(target=worker_b, args=(self.model, self.cfg.layer, self.cfg, port, parent, self.results,
                                                bool(getattr(self.head, "reads_prev", False))),
                        daemon=True, name="ppd-stage-B")
        a.start()
        b.start()
        self.procs = [a, b]
        kind, msg = self._next(timeout=self.cfg.timeout_s + 60)
        if kind != "ready":
            self.close()
            hint = ""
            if kind == "dead" and getattr(sys.modules["__main__"], "__file__", None):
                # spawn imports the main script again in each worker: unguarded, it builds an engine there too
                hint = (". If the workers' traceback above says a process was started before bootstrapping finished, "
                        "the script that builds the engine has no `if __name__ == \"__main__\":` guard and the "
                        "spawned workers import it again. Fix: build and run the engine under that guard")
            raise WorkerError(f"pipeline workers failed to start: {msg}{hint}")

    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        if not self.procs:
            return
        try:
            if self.alive():
                self.requests.put(None)
                for p in self.procs:
                    p.join(timeout=5)
        finally:
            for p in self.procs:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
            self.procs = []

    def round_trip_seconds(self, n: int = 200) -> float:
        """Median time of one hidden-state-out, token-back exchange between the workers (per-token communication)."""
        import statistics

        self.start()
        self.requests.put(("ping", n))
        kind, msg = self._next(self.cfg.timeout_s)
        if kind != "pong":
            self.close()
            raise WorkerError(f"communication probe failed: {msg}")
        return statistics.median(msg[n // 10:])  # the first exchanges warm the connection up

    # -- requests
    def _next(self, timeout: float):
        """The next message from the workers; ('dead', why) when one died or stayed silent past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    return "dead", f"{', '.join(dead)} exited (code {[p.exitcode for p in self.procs]})"
                if time.monotonic() > deadline:
                    return "dead", f"no answer from the workers for {timeout:.0f}s (hung)"

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, on_token=None,
                 reference: list[int] | None = None) -> DecodeResult:
        """``reference``: the greedy continuation, for the oracle guess source only (``PPDConfig.oracle_p``)."""
        ids = [int(t) for t in ids]
        if (reference is None) != (self.cfg.oracle_p is None):
            raise PPDError("the oracle guess source (oracle_p) needs the greedy reference, and only it takes one: "
                           "pass reference=<greedy tokens> with oracle_p set, neither without")
        out: list[int] = []
        res = DecodeResult(out, stats=PPDStats())
        times = []
        t0 = time.perf_counter()
        failure = None
        try:
            self.start()
            self.requests.put((ids, max_new_tokens, self.eos, reference))
            while True:
                kind, msg = self._next(self.cfg.timeout_s)
                if kind == "token":
                    out.append(msg)
                    times.append(time.perf_counter() - t0)
                    if on_token:
                        on_token(msg)
                elif kind == "done":
                    res.accepted, res.drafted = msg["matches"], msg["guessed"]
                    # the chains, and where each worker's time went: computing, or waiting on the other one
                    for k in ("chain_drafted", "chain_accepted", "chains_sent", "chain_blocks", "guess_blocks",
                              "prev_guesses", "block_pairs", "a_busy_s", "a_wait_s", "b_busy_s", "b_wait_s", "a_time_s",
                              "b_time_s"):
                        setattr(res.stats, k, msg[k])
                    break
                else:
                    failure = msg
                    break
        except WorkerError as e:
            failure = str(e)
        res.steps = len(out) - res.stats.chain_accepted  # B's blocks: one per token bar accepted chains
        res.stats.token_times = times
        if failure is not None:
            self.close()  # never reuse a pipeline in an unknown state
            if not self.cfg.fallback:
                raise WorkerError(f"PPD pipeline failed after {len(out)} tokens: {failure}")
            res.stats.fallback = failure
            self._finish_sequentially(ids, out, max_new_tokens, on_token)
        res.seconds = time.perf_counter() - t0
        return res

    def _finish_sequentially(self, ids, out, max_new_tokens, on_token) -> None:
        """Plain greedy from the tokens already decided (all of them exact), in this process."""
        if out and (out[-1] in self.eos or len(out) >= max_new_tokens):
            return
        x = torch.tensor([ids + out])
        rest = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens - len(out),
                                   do_sample=False, pad_token_id=self.model.generation_config.pad_token_id)
        for t in rest[0, x.shape[1]:].tolist():
            out.append(t)
            if on_token:
                on_token(t)

@register
class PPD(DecodingStrategy):
    """Predictive pipelined decoding on two worker processes (see PPDEngine)."""

    name = "ppd"
    Config = PPDConfig
    Stats = PPDStats
    needs_heads = True
    spawns_workers = True
    # B sends f(t-1) with its token; A's head reads it for the next guesses. A block head reads the layer-d states
    # A computes anyway: the prompt's and each accepted position's (the rows A sends to B)
    head_inputs = (H_D, F_PREV, H_PREFIX)

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        layer, head = pick_head(self, self.config.layer)
        self.config.layer = layer
        self.engine = PPDEngine(model, head, self.config)  # validates before any worker starts
        self._stage_times: list = []  # the benchmark's probes (report.probe)
        self._load = None  # the other stage's work while a stage is timed (profiling.stage_load), made on demand

    def _generate(self, ids, max_new_tokens, reference=None):
        return self.engine.generate(ids.tolist(), max_new_tokens, reference=reference)

    def wants_reference(self) -> bool:
        return self.config.oracle_p is not None

    def probe(self, prompt_len: int, max_new_tokens: int) -> None:
        report.probe(self, prompt_len, max_new_tokens)

    def summary(self, totals) -> dict:
        return report.summary(self, totals)

    def close(self):
        self.engine.close()
        if self._load is not None:
            self._load.close()
            self._load = None
