"""The PPD engine: exact greedy generation pipelined over two worker processes (docs/method.md, deployment 1).

Worker A holds layers 1..d and the early head; worker B holds layers d+1..L and the final head; each keeps the KV
cache of its own layers, and only hidden states and token ids cross between them (torch.distributed, gloo on CPU).
While B finishes token t, A runs the head's k guesses for token t+1 through its layers as one block of siblings
(each attends to the cached prefix and itself). When B's token arrives: on a match A keeps that guess's cache
entries and hands B its hidden state at once; on a miss A runs the real token. B only ever emits its own argmax,
so the output is the model's greedy output whatever the head.

With text chains (``chain``, on by default) the lookup guess brings the tokens that followed it in the text; when it
is B's token, B verifies guess and chain as one block and emits its own argmax up to the first chain token that
differs, so a copied stretch costs one B step instead of one per token.

The guesses are the head's top ones (over its trained shortlist of frequent tokens, 1/12 of a full projection on
SmolLM2), led by ``lookup`` prompt-lookup guesses: the token that followed the text's last n-gram before.

The driver (the caller's process) starts the workers once; they serve many prompts. A worker that dies or falls
silent never yields a wrong token: the driver stops both workers and finishes the request with plain greedy
decoding from the tokens already decided (or raises ``WorkerError`` with ``fallback=False``).
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass

import torch

from .errors import HeadMismatchError, PPDError
from .exact_argmax import exact_argmax
from .guesses import NextTokenLookup, merge_guesses
from .heads import check_layer
from .procs import Managed, share_with_spawned, watch_parent
from .stack import (cache_len, crop_cache, embed, final_argmax, new_cache, num_layers, pad_block, run_layers,
                    select_cache)
from .strategies.base import DecodeResult, DecodingStrategy, register

SHUTDOWN, GENERATE, PING = 0, 1, 2


class WorkerError(PPDError):
    """A pipeline worker died, hung or raised; the message says which and why."""


@dataclass
class PPDConfig:
    layer: int | None = None  # d: the split (default: the only head given)
    # Guesses per token, run as one block through layers 1..d. On this CPU a block of 4 costs less than one of 2 or 3
    # (1.4x one token against 1.6x / 1.75x: the BLAS kernels change at 4 rows), so 4 is the default.
    k: int = 4
    # Of the k, how many come from prompt lookup (the token that followed the text's last n-gram before; see
    # ppd_decode.guesses); the head fills the rest. 0: the head's top k only, the paper's method.
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(rank: int, threads: int) -> None:
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 * threads:
        os.sched_setaffinity(0, cpus[rank * threads:(rank + 1) * threads])


def _init(rank: int, port: int, threads: int, parent: int, pin: bool = False):
    import torch.distributed as dist

    watch_parent(parent)
    if pin:
        _pin(rank, threads)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    return dist


# --------------------------------------------------------------------------------------------------- worker A
@torch.no_grad()
def _worker_a(model, head, d, cfg: PPDConfig, port, parent, requests, results):
    try:
        dist = _init(0, port, cfg.threads_per_worker, parent, cfg.pin_cores)
        dtype, H = model.dtype, model.config.hidden_size
        results.put(("ready", None))
        while True:
            req = requests.get()
            if req is None:
                dist.send(torch.tensor([SHUTDOWN, 0, 0, 0], dtype=torch.long), dst=1)
                break
            if req[0] == "ping":
                results.put(("pong", _ping_a(dist, req[1], H, dtype)))
                continue
            ids, max_new, eos = req
            _serve_a(model, head, d, cfg, dist, results, ids, max_new, eos)
    except Exception:
        results.put(("error", "worker A (layers 1..d):\n" + traceback.format_exc()))


def _ping_a(dist, n: int, H: int, dtype) -> list[float]:
    """Round trips of exactly what crosses per token (a hidden state out, a token id back)."""
    dist.send(torch.tensor([PING, n, 0, 0], dtype=torch.long), dst=1)
    h, y, times = torch.zeros(1, H, dtype=dtype), torch.zeros(1, dtype=torch.long), []
    for _ in range(n):
        t = time.perf_counter()
        dist.send(h, dst=1)
        dist.recv(y, src=1)
        times.append(time.perf_counter() - t)
    return times


def _prompt_chunks(n: int, chunk: int) -> list[int]:
    """The sizes of the pieces a prompt of ``n`` tokens crosses the split in (both workers cut it the same way)."""
    chunk = chunk or n
    return [min(chunk, n - s) for s in range(0, n, chunk)]


def _guesses(head, h, cfg: PPDConfig, lookup: NextTokenLookup, room: int) -> tuple[list[int], list[int]]:
    """The k guesses for the token after the one whose layer-d state is ``h`` [1, 1, H]: prompt lookup's first, then
    the head's ranking (over its shortlist when it has one: see ``EarlyExitHead.guess``); and the text chain that
    follows the lookup guess (at most ``cfg.chain`` tokens, and at most ``room``: never past max_new_tokens)."""
    if not cfg.speculate:
        return [], []
    ranked = head.guess(h[:, -1], cfg.k)[0].tolist()
    guesses = merge_guesses(lookup.candidates(cfg.lookup), ranked, cfg.k)
    chain: list[int] = []
    if cfg.chain and cfg.lookup and room > 0:
        cont = lookup.continuation(1 + min(cfg.chain, room))
        if cont and guesses[0] == cont[0]:
            chain = cont[1:]
    return guesses, chain


def _send_block(dist, h: torch.Tensor, chain: list[int], M: int) -> None:
    """Hand B its next block: with text chains on (``M`` > 0) first the chain after the block's first row, as
    [m, tokens..., 0...] (1 + M longs), then the block's layer-d states [1, 1 + m, H]."""
    if M:
        dist.send(torch.tensor([len(chain)] + chain + [0] * (M - len(chain)), dtype=torch.long), dst=1)
    dist.send(h[0].contiguous(), dst=1)


def _guess_block(model, d, cache, guesses: list[int], chain: list[int], pos: int) -> torch.Tensor:
    """Layers 1..d over the k sibling guesses for position ``pos`` and, after them, the chain that follows the first
    guess (positions pos+1..): a sibling sees the prefix and itself, a chain row the first guess and the chain up to
    itself. Their cache entries sit in this order after the prefix."""
    x = embed(model, torch.tensor([guesses + chain]))
    if not chain:
        return run_layers(model, x, 0, d, cache, past=pos, siblings=True)
    k, m = len(guesses), len(chain)
    see = torch.eye(k + m, dtype=torch.bool)
    for i in range(m):
        see[k + i, 0] = True
        see[k + i, k:k + i + 1] = True
    position_ids = torch.tensor([[pos] * k + list(range(pos + 1, pos + 1 + m))])
    return run_layers(model, x, 0, d, cache, past=pos, position_ids=position_ids, block_mask=see)


class _Clock:
    """Splits a worker's wall time into named parts: ``lap(part)`` books the time since the previous lap to it, or to
    "prefill" until ``decoding`` is set (when the first new token is decided)."""

    def __init__(self, parts: tuple[str, ...]):
        self.s = dict.fromkeys(parts, 0.0)
        self.t = time.perf_counter()
        self.decoding = False

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.s[part if self.decoding else "prefill"] += now - self.t
        self.t = now


# Where each worker's time goes (the benchmark prints it). "prefill" is everything until the first new token is
# decided, waits included; the other parts split the decoding phase. A: ranking the guesses (head + lookup), the guess
# block through layers 1..d, waiting for B's token, re-running a missed token, keeping or dropping cached guesses,
# sending to B, the rest (handing tokens to the driver, the n-gram index). B: its layers, the final head, sending
# its token, waiting for A.
A_PARTS = ("prefill", "rank_guesses", "guess_block", "wait", "miss_rerun", "cache", "send", "other")
B_PARTS = ("prefill", "layers", "final_head", "send", "wait")


def _busy(parts: dict) -> float:
    return sum(v for k, v in parts.items() if k not in ("prefill", "wait"))


def _serve_a(model, head, d, cfg, dist, results, ids, max_new, eos):
    n = len(ids)
    clock = _Clock(A_PARTS)
    cache = new_cache(model)
    lookup = NextTokenLookup()
    lookup.extend(ids)
    M = cfg.chain
    dist.send(torch.tensor([GENERATE, n, max_new, cfg.prefill_chunk], dtype=torch.long), dst=1)
    s = 0
    for size in _prompt_chunks(n, cfg.prefill_chunk):
        h = run_layers(model, embed(model, torch.tensor([ids[s:s + size]])), 0, d, cache, past=s)
        dist.send(h[0].contiguous(), dst=1)
        s += size
    clock.lap("prefill")
    guesses, chain = _guesses(head, h, cfg, lookup, room=max_new - 2)
    clock.lap("rank_guesses")
    # pos: where B's next token goes if B accepts all of `sent` (the chain it is verifying, after the block's first
    # row); `undo` takes `sent` back out of the lookup index when B rejects part of it.
    pos, emitted, matches, guessed = n, 0, 0, 0
    sent: list[int] = []
    undo: list = []
    chain_drafted = chain_accepted = chain_blocks = chains_sent = guess_blocks = 0
    # (chain B verifies, chain in A's guess block meanwhile; -1: A had no guesses) -> blocks: the latency model times
    # each block at its own chain length, and since the two run side by side, a block takes the longer of the two
    block_pairs: dict[tuple[int, int], int] = {}
    reply = torch.zeros(2, dtype=torch.long)
    while True:
        # B is finishing the token at `pos`; run the guesses for it through layers 1..d meanwhile.
        pair = (len(sent), len(chain) if guesses else -1)
        block_pairs[pair] = block_pairs.get(pair, 0) + 1
        if guesses:
            hg = _guess_block(model, d, cache, guesses, chain, pos)
            guess_blocks += 1
            chain_blocks += bool(chain)
            clock.lap("guess_block")
        dist.recv(reply, src=1)
        clock.lap("wait")
        clock.decoding = True
        count, tok = reply.tolist()  # how many tokens B decided (the accepted part of `sent`, then its own), the last
        a = count - 1
        decided = sent[:a] + [tok]
        chain_accepted += a
        pos -= len(sent) - a  # where `tok` goes
        for t in decided:
            emitted += 1
            if t in eos or emitted >= max_new:
                for u in decided:
                    results.put(("token", u))
                b = torch.zeros(len(B_PARTS), dtype=torch.float64)
                dist.recv(b, src=1)  # where B's time went for this request
                clock.lap("other")
                a_s, b_s = clock.s, dict(zip(B_PARTS, b.tolist()))
                results.put(("done", {"matches": matches, "guessed": guessed,
                                      "chain_drafted": chain_drafted, "chain_accepted": chain_accepted,
                                      "chains_sent": chains_sent, "chain_blocks": chain_blocks,
                                      "guess_blocks": guess_blocks, "block_pairs": block_pairs,
                                      "a_time_s": a_s, "b_time_s": b_s,
                                      # the decoding phase's compute and waits (prefill apart)
                                      "a_wait_s": a_s["wait"], "a_busy_s": _busy(a_s),
                                      "b_wait_s": b_s["wait"], "b_busy_s": _busy(b_s)}))
                return
        if guesses:
            guessed += 1
        full = a == len(sent)  # else the guesses were for a position B's token does not sit at
        if guesses and full and tok in guesses:
            j = guesses.index(tok)
            nxt = chain if j == 0 else []
            rows = [j] + [len(guesses) + i for i in range(len(nxt))]
            h = hg[:, rows]
            _send_block(dist, h, nxt, M)  # B first; the cache can be tidied while B computes
            clock.lap("send")
            select_cache(cache, pos, [pos + r for r in rows], range(d))  # keep the matching sibling (and chain)
            matches += 1
            clock.lap("cache")
        else:
            nxt = []
            if guesses or not full:
                crop_cache(cache, pos, range(d))
                clock.lap("cache")
            h = run_layers(model, embed(model, torch.tensor([[tok]])), 0, d, cache, past=pos)
            clock.lap("miss_rerun")
            _send_block(dist, h, nxt, M)
            clock.lap("send")
        for t in decided:
            results.put(("token", t))  # after the send: B is waiting, the driver can
        if sent:
            lookup.rollback(len(lookup.tokens) - len(sent), undo)
        lookup.extend(decided)
        if nxt:
            lookup.extend(nxt, undo)  # guessed text, for guessing past it
        chain_drafted += len(nxt)
        chains_sent += bool(nxt)
        sent = nxt
        pos += 1 + len(nxt)
        clock.lap("other")
        # The guesses for the token after B's block, made off B's critical path.
        guesses, chain = _guesses(head, h, cfg, lookup, room=max_new - emitted - len(sent) - 2)
        clock.lap("rank_guesses")


# --------------------------------------------------------------------------------------------------- worker B
@torch.no_grad()
def _worker_b(model, d, cfg: PPDConfig, port, parent, results):
    try:
        dist = _init(1, port, cfg.threads_per_worker, parent, cfg.pin_cores)
        L, H, dtype = num_layers(model), model.config.hidden_size, model.dtype
        exact_argmax(model)  # its half-size copies of the LM head are built once, before any request
        header = torch.zeros(4, dtype=torch.long)
        eos = _eos(model)
        M = cfg.chain
        while True:
            dist.recv(header, src=0)
            cmd, n, max_new, chunk = header.tolist()
            if cmd == SHUTDOWN:
                break
            if cmd == PING:
                h, y = torch.empty(1, H, dtype=dtype), torch.zeros(1, dtype=torch.long)
                for _ in range(n):
                    dist.recv(h, src=0)
                    dist.send(y, dst=0)
                continue
            cache = new_cache(model)
            emitted = 0
            clock = _Clock(B_PARTS)
            chain_msg = torch.zeros(1 + M, dtype=torch.long)  # A's chain before each block: [m, tokens...]

            def recv(rows: int) -> torch.Tensor:
                """The next hidden states from A, the time spent waiting for them counted."""
                h = torch.empty(rows, H, dtype=dtype)
                clock.lap("send")  # (B only sends between receives)
                dist.recv(h, src=0)
                clock.lap("wait")
                return h

            *first, last = _prompt_chunks(n, chunk)
            for size in first:  # the prompt's last chunk runs in the loop below, with the final head
                h = recv(size)
                run_layers(model, h[None], d, L, cache)
                clock.lap("layers")
            h = recv(last)
            chain: list[int] = []  # the chain A sent after the block's first row, to verify
            while True:
                base, q = cache_len(cache, d), h.shape[0]
                block = pad_block(h[None], cfg.min_block) if chain else h[None]
                hb = run_layers(model, block, d, L, cache)
                clock.lap("layers")
                targets = final_argmax(model, hb[0, q - 1 - len(chain):q]).tolist()  # after the first row, ...
                clock.lap("final_head")
                clock.decoding = True
                a = 0
                while a < len(chain) and chain[a] == targets[a]:
                    a += 1
                count, stop = 0, False
                for t in targets[:a + 1]:
                    count += 1
                    emitted += 1
                    if t in eos or emitted >= max_new:
                        stop = True
                        break
                if block.shape[1] != q - len(chain) + a:
                    crop_cache(cache, base + q - len(chain) + a)  # the rejected chain rows and the padding
                dist.send(torch.tensor([count, targets[count - 1]], dtype=torch.long), dst=0)
                if stop:
                    clock.lap("send")
                    dist.send(torch.tensor([clock.s[p] for p in B_PARTS], dtype=torch.float64), dst=0)
                    break
                if M:
                    clock.lap("send")
                    dist.recv(chain_msg, src=0)
                    clock.lap("wait")
                    chain = chain_msg[1:1 + int(chain_msg[0])].tolist()
                h = recv(1 + len(chain))
    except Exception:
        results.put(("error", "worker B (layers d+1..L):\n" + traceback.format_exc()))


def _eos(model) -> set[int]:
    e = model.generation_config.eos_token_id
    e = model.config.eos_token_id if e is None else e
    return set([e] if isinstance(e, int) else (e or []))


# ----------------------------------------------------------------------------------------------------- driver
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
        if model.device.type != "cpu":
            raise PPDError("the PPD engine runs its workers on CPU processes for now; use device='cpu'")
        self.L = L
        self.eos = _eos(model)
        self.procs: list = []

    # -- lifecycle
    def start(self) -> None:
        if self.alive():
            return
        self.close()
        ctx = torch.multiprocessing.get_context("spawn")
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        port, parent = _free_port(), os.getpid()
        share_with_spawned(self.model)
        self.head.share_memory()
        a = ctx.Process(target=_worker_a, args=(self.model, self.head, self.cfg.layer, self.cfg, port, parent,
                                                self.requests, self.results), daemon=True, name="ppd-stage-A")
        b = ctx.Process(target=_worker_b, args=(self.model, self.cfg.layer, self.cfg, port, parent, self.results),
                        daemon=True, name="ppd-stage-B")
        a.start()
        b.start()
        self.procs = [a, b]
        kind, msg = self._next(timeout=self.cfg.timeout_s + 60)
        if kind != "ready":
            self.close()
            raise WorkerError(f"pipeline workers failed to start: {msg}")

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
    def generate(self, ids: list[int], max_new_tokens: int, on_token=None) -> DecodeResult:
        ids = [int(t) for t in ids]
        out: list[int] = []
        res = DecodeResult(out)
        times = []
        t0 = time.perf_counter()
        failure = None
        try:
            self.start()
            self.requests.put((ids, max_new_tokens, self.eos))
            while True:
                kind, msg = self._next(self.cfg.timeout_s)
                if kind == "token":
                    out.append(msg)
                    times.append(time.perf_counter() - t0)
                    if on_token:
                        on_token(msg)
                elif kind == "done":
                    res.accepted, res.drafted = msg["matches"], msg["guessed"]
                    if self.cfg.chain:
                        res.extra.update({k: msg[k] for k in ("chain_drafted", "chain_accepted", "chains_sent",
                                                              "chain_blocks", "guess_blocks", "block_pairs")})
                    # Where each worker's time went: computing, or waiting on the other one.
                    res.extra.update({k: msg[k] for k in ("a_busy_s", "a_wait_s", "b_busy_s", "b_wait_s",
                                                          "a_time_s", "b_time_s")})
                    break
                else:
                    failure = msg
                    break
        except WorkerError as e:
            failure = str(e)
        res.steps = len(out) - res.extra.get("chain_accepted", 0)  # B's blocks: one per token bar accepted chains
        res.extra["token_times"] = times
        if failure is not None:
            self.close()  # never reuse a pipeline in an unknown state
            if not self.cfg.fallback:
                raise WorkerError(f"PPD pipeline failed after {len(out)} tokens: {failure}")
            res.extra["fallback"] = failure
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
    needs_heads = True
    spawns_workers = True

    def __init__(self, model, config=None, heads=None, tokenizer=None):
        super().__init__(model, config, heads, tokenizer)
        from .strategies.self_speculative import pick_head

        layer, head = pick_head(self, self.config.layer)
        self.config.layer = layer
        self.engine = PPDEngine(model, head, self.config)  # validates before any worker starts

    def _generate(self, ids, max_new_tokens):
        return self.engine.generate(ids.tolist(), max_new_tokens)

    def close(self):
        self.engine.close()
