"""The two PPD workers: A (layers 1..d, the early head, the guesses) and B (layers d+1..L, the final argmax)."""

from __future__ import annotations

import random
import time
import traceback

import torch

from ppd_decode.runtime.exact_argmax import exact_argmax
from ppd_decode.runtime.stack import (
    cache_len,
    crop_cache,
    decoder,
    embed,
    eos_ids,
    final_argmax,
    new_cache,
    num_layers,
    pad_block,
    run_layers,
    select_cache,
)
from ppd_decode.runtime.text_guesses import NextTokenLookup, merge_guesses
from ppd_decode.runtime.token_tree import accepted_prefix
from ppd_decode.strategies.ppd.config import PPDConfig
from ppd_decode.strategies.ppd.wire import GENERATE, PING, SHUTDOWN, connect, ping_from_a, prompt_chunks, send_block


def place_stage(model, head, d: int, stage: str, device) -> None:
    """Move what a worker computes with to its device: A the embeddings, layers 1..d and the head; B layers d+1..L,
    the final norm and the LM head. The other stage's weights stay where they were (on a CPU: shared memory, read by
    both processes; a worker on a GPU holds its own stage only). No-op where the weights already are there."""
    m = decoder(model)
    if stage == "A":
        parts = [m.embed_tokens, *m.layers[:d], head, *getattr(head, "_frozen_lm_head", ())]
    else:
        parts = [*m.layers[d:], m.norm, model.lm_head]
    for part in [*parts, m.rotary_emb]:
        part.to(device)


@torch.no_grad()
def worker_a(model, head, d, cfg: PPDConfig, port, parent, requests, results):
    try:
        device = torch.device(cfg.device_a)
        place_stage(model, head, d, "A", device)
        link = connect(0, port, cfg.threads_per_worker, parent, cfg.pin_cores, cfg.backend, device)
        dtype, H = model.dtype, model.config.hidden_size
        results.put(("ready", None))
        while True:
            req = requests.get()
            if req is None:
                link.send_longs([SHUTDOWN, 0, 0, 0])
                break
            if req[0] == "ping":
                results.put(("pong", ping_from_a(link, req[1], H, dtype)))
                continue
            ids, max_new, eos, reference = req
            _serve_a(model, head, d, cfg, link, results, ids, max_new, eos, reference)
    except Exception:
        results.put(("error", "worker A (layers 1..d):\n" + traceback.format_exc()))

def _guesses(head, h, cfg: PPDConfig, lookup: NextTokenLookup, room: int,
             prev: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """The k guesses for the token after the one whose layer-d state is ``h`` [1, 1, H]: prompt lookup's first, then
    the head's ranking (over its shortlist when it has one: see ``EarlyExitHead.guess``; ``prev`` is f(t-1) for a
    head that reads it, None where unknown); and the text chain that follows the lookup guess (at most ``cfg.chain``
    tokens, and at most ``room``: never past max_new_tokens)."""
    if not cfg.speculate:
        return [], []
    ranked = head.guess(h[:, -1], cfg.k, prev)[0].tolist()
    guesses = merge_guesses(lookup.candidates(cfg.lookup), ranked, cfg.k)
    chain: list[int] = []
    if cfg.chain and cfg.lookup and room > 0:
        cont = lookup.continuation(1 + min(cfg.chain, room))
        if cont and guesses[0] == cont[0]:
            chain = cont[1:]
    return guesses, chain

def _guess_block(model, d, cache, guesses: list[int], chain: list[int], pos: int) -> torch.Tensor:
    """Layers 1..d over the k sibling guesses for position ``pos`` and, after them, the chain that follows the first
    guess (positions pos+1..): a sibling sees the prefix and itself, a chain row the first guess and the chain up to
    itself. Their cache entries sit in this order after the prefix."""
    dev = model.model.embed_tokens.weight.device
    x = embed(model, torch.tensor([guesses + chain], device=dev))
    if not chain:
        return run_layers(model, x, 0, d, cache, past=pos, siblings=True)
    k, m = len(guesses), len(chain)
    see = torch.eye(k + m, dtype=torch.bool)
    for i in range(m):
        see[k + i, 0] = True
        see[k + i, k:k + i + 1] = True
    position_ids = torch.tensor([[pos] * k + list(range(pos + 1, pos + 1 + m))], device=dev)
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

class _Oracle:
    """Guesses from the greedy reference (benchmarking only): the true token with probability p, else k wrong ones."""

    def __init__(self, reference: list[int], p: float, seed: int, vocab: int):
        self.reference, self.p, self.vocab = reference, p, vocab
        self.rng = random.Random(seed)

    def guesses(self, index: int, k: int) -> list[int]:
        true = self.reference[index] if index < len(self.reference) else 0
        wrong = [(true + 1 + j) % self.vocab for j in range(k)]
        return [true] + wrong[:k - 1] if self.rng.random() < self.p else wrong


def _serve_a(model, head, d, cfg, link, results, ids, max_new, eos, reference=None):
    n = len(ids)
    clock = _Clock(A_PARTS)
    cache = new_cache(model)
    ctx = head.context()  # a block head's own cache: fed every row A sends to B (the text B verifies)
    lookup = NextTokenLookup()
    lookup.extend(ids)
    M = cfg.chain
    dev = link.device
    link.send_longs([GENERATE, n, max_new, cfg.prefill_chunk])
    s = 0
    for size in prompt_chunks(n, cfg.prefill_chunk):
        h = run_layers(model, embed(model, torch.tensor([ids[s:s + size]], device=dev)), 0, d, cache, past=s)
        link.send(h[0])
        hc = ctx.read(h, s)
        s += size
    clock.lap("prefill")
    oracle = None if reference is None else _Oracle(reference, cfg.oracle_p, cfg.oracle_seed, head.lm_head.out_features)
    guesses, chain = _guesses(head, hc, cfg, lookup, room=max_new - 2)
    if oracle is not None and guesses:
        guesses = oracle.guesses(0, cfg.k)
    clock.lap("rank_guesses")
    # pos: where B's next token goes if B accepts all of `sent` (the chain it is verifying, after the block's first
    # row); `undo` takes `sent` back out of the lookup index when B rejects part of it.
    pos, emitted, matches, guessed = n, 0, 0, 0
    sent: list[int] = []
    undo: list = []
    chain_drafted = chain_accepted = chain_blocks = chains_sent = guess_blocks = prev_guesses = 0
    # (chain B verifies, chain in A's guess block meanwhile; -1: A had no guesses) -> blocks: the latency model times
    # each block at its own chain length, and since the two run side by side, a block takes the longer of the two
    block_pairs: dict[tuple[int, int], int] = {}
    reply = link.buffer(2)
    # f(t-1): B's final normed state of the row that produced its token, sent after the token for a head that reads it
    fprev = None
    while True:
        # B is finishing the token at `pos`; run the guesses for it through layers 1..d meanwhile.
        pair = (len(sent), len(chain) if guesses else -1)
        block_pairs[pair] = block_pairs.get(pair, 0) + 1
        if guesses:
            hg = _guess_block(model, d, cache, guesses, chain, pos)
            guess_blocks += 1
            chain_blocks += bool(chain)
            clock.lap("guess_block")
        link.recv_into(reply)
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
                b = link.recv(len(B_PARTS), dtype=torch.float64)  # where B's time went for this request
                clock.lap("other")
                a_s, b_s = clock.s, dict(zip(B_PARTS, b.tolist()))
                results.put(("done", {"matches": matches, "guessed": guessed,
                                      "chain_drafted": chain_drafted, "chain_accepted": chain_accepted,
                                      "chains_sent": chains_sent, "chain_blocks": chain_blocks,
                                      "guess_blocks": guess_blocks, "block_pairs": block_pairs,
                                      "prev_guesses": prev_guesses,
                                      "a_time_s": a_s, "b_time_s": b_s,
                                      # the decoding phase's compute and waits (prefill apart)
                                      "a_wait_s": a_s["wait"], "a_busy_s": _busy(a_s),
                                      "b_wait_s": b_s["wait"], "b_busy_s": _busy(b_s)}))
                return
        if head.reads_prev:  # (B sends it unless this request has ended, as A has just checked)
            fprev = link.recv(1, model.config.hidden_size, dtype=model.dtype)
            clock.lap("wait")
        if guesses:
            guessed += 1
        full = a == len(sent)  # else the guesses were for a position B's token does not sit at
        if guesses and full and tok in guesses:
            j = guesses.index(tok)
            nxt = chain if j == 0 else []
            rows = [j] + [len(guesses) + i for i in range(len(nxt))]
            h = hg[:, rows]
            send_block(link, h, nxt, M)  # B first; the cache can be tidied while B computes
            clock.lap("send")
            select_cache(cache, pos, [pos + r for r in rows], range(d))  # keep the matching sibling (and chain)
            matches += 1
            clock.lap("cache")
        else:
            nxt = []
            if guesses or not full:
                crop_cache(cache, pos, range(d))
                clock.lap("cache")
            h = run_layers(model, embed(model, torch.tensor([[tok]], device=dev)), 0, d, cache, past=pos)
            clock.lap("miss_rerun")
            send_block(link, h, nxt, M)
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
        at = pos  # h's rows sit at positions at..at+len(nxt)
        pos += 1 + len(nxt)
        clock.lap("other")
        # The guesses for the token after B's block, made off B's critical path.
        # f(t-1) is B's row before `h`'s token when that is B's own token; after a chain it is unknown
        prev = fprev if fprev is not None and not nxt else None
        prev_guesses += prev is not None and cfg.speculate
        # (a block head reads h after the accepted text; rows fed before at `at` or later were rejected guesses)
        guesses, chain = _guesses(head, ctx.read(h, at), cfg, lookup, room=max_new - emitted - len(sent) - 2,
                                  prev=prev)
        if oracle is not None and guesses:
            guesses = oracle.guesses(emitted, cfg.k)  # the token after the `emitted` decided so far
        clock.lap("rank_guesses")

@torch.no_grad()
def worker_b(model, d, cfg: PPDConfig, port, parent, results, send_prev: bool = False):
    try:
        device = torch.device(cfg.device_b)
        place_stage(model, None, d, "B", device)
        link = connect(1, port, cfg.threads_per_worker, parent, cfg.pin_cores, cfg.backend, device)
        L, H, dtype = num_layers(model), model.config.hidden_size, model.dtype
        exact_argmax(model)  # its half-size copies of the LM head are built once, before any request
        header = link.buffer(4)
        eos = eos_ids(model)
        M = cfg.chain
        while True:
            cmd, n, max_new, chunk = link.recv_into(header).tolist()
            if cmd == SHUTDOWN:
                break
            if cmd == PING:
                h, y = link.buffer(1, H, dtype=dtype), torch.zeros(1, dtype=torch.long)
                for _ in range(n):
                    link.recv_into(h)
                    link.send(y)
                continue
            cache = new_cache(model)
            emitted = 0
            clock = _Clock(B_PARTS)
            chain_msg = link.buffer(1 + M)  # A's chain before each block: [m, tokens...]

            def recv(rows: int) -> torch.Tensor:
                """The next hidden states from A, the time spent waiting for them counted."""
                clock.lap("send")  # (B only sends between receives)
                h = link.recv(rows, H, dtype=dtype)
                clock.lap("wait")
                return h

            *first, last = prompt_chunks(n, chunk)
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
                a = accepted_prefix(chain, targets)
                count, stop = 0, False
                for t in targets[:a + 1]:
                    count += 1
                    emitted += 1
                    if t in eos or emitted >= max_new:
                        stop = True
                        break
                if block.shape[1] != q - len(chain) + a:
                    crop_cache(cache, base + q - len(chain) + a)  # the rejected chain rows and the padding
                link.send_longs([count, targets[count - 1]])
                if send_prev and not stop:  # f(t-1) for A's head: the row whose argmax was just sent
                    row = q - 1 - len(chain) + count - 1
                    link.send(decoder(model).norm(hb[0, row:row + 1]))
                if stop:
                    clock.lap("send")
                    link.send(torch.tensor([clock.s[p] for p in B_PARTS], dtype=torch.float64))
                    break
                if M:
                    clock.lap("send")
                    link.recv_into(chain_msg)
                    clock.lap("wait")
                    chain = chain_msg[1:1 + int(chain_msg[0])].tolist()
                h = recv(1 + len(chain))
    except Exception:
        results.put(("error", "worker B (layers d+1..L):\n" + traceback.format_exc()))
