"""The PPD engine: real worker processes, token-identical to greedy, and safe when a worker dies or hangs."""

import os
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_strategies import LAYERS, model, reference  # the same float64 tiny models and greedy reference

from ppd_decode import HeadMismatchError, PPDError, PromptTooLongError, load_model
from ppd_decode.models.heads import EarlyExitHead
from ppd_decode.strategies import get_strategy
from ppd_decode.strategies.ppd import A_PARTS, B_PARTS, PPDConfig, PPDEngine, WorkerError


def _head(m, d, noise, seed=0, shortlist=0):
    """A head at layer d with noisy weights; with ``shortlist`` rows, a frequent-rows head that guesses from those."""
    g = torch.Generator().manual_seed(seed)
    if shortlist:
        rows = torch.randperm(m.config.vocab_size, generator=g)[:shortlist].sort().values
        h = EarlyExitHead.from_model(m, d, projection="frequent", rows=rows)
        w = h.row_weight
    else:
        h = EarlyExitHead.from_model(m, d)
        w = h.lm_head.weight
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=g, dtype=torch.float64) * noise)
    return h.materialize()


# (model seed, damping, layer, k, head noise, lookup guesses, shortlist rows, prefill chunk, text chain): well-matched,
# mismatched and random heads, both split points, with and without prompt-lookup guesses, a shortlist and text chains,
# the prompt in chunks or whole
ENGINES = [(0, 0.05, 2, 3, 0.0, 0, 0, 0, 0), (1, 1.0, 1, 2, 1.0, 1, 0, 7, 3), (2, 0.3, 3, 5, 0.05, 2, 64, 1, 0),
           (3, 0.3, 2, 4, 0.0, 1, 32, 16, 2)]


@pytest.fixture(scope="module")
def engines():
    made = []
    for seed, damp, d, k, noise, lookup, short, chunk, chain in ENGINES:
        m = model(seed, damp)
        cfg = PPDConfig(k=k, lookup=lookup, prefill_chunk=chunk, chain=chain)
        made.append((m, PPDEngine(m, _head(m, d, noise, shortlist=short), cfg)))
    for _, e in made:
        e.start()
    yield made
    for _, e in made:
        e.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, len(ENGINES) - 1), prompt=st.lists(st.integers(4, 259), min_size=1, max_size=40),
       n=st.integers(1, 48))
def test_token_identical_to_greedy(engines, which, prompt, n):
    m, eng = engines[which]
    r = eng.generate(prompt, n)
    assert r.tokens == reference(m, prompt, n)
    assert r.stats.fallback is None  # the workers did the work
    assert r.stats.prev_guesses == 0  # these heads read h_d only: B sends no f(t-1)


def test_round_trip_probe(engines):
    t = engines[1][1].round_trip_seconds(50)
    assert 0 < t < 1.0
    m, eng = engines[1]
    assert eng.generate([5, 6], 5).tokens == reference(m, [5, 6], 5)  # the engine serves on after a probe


def test_matches_are_used_when_the_head_is_good(engines):
    m, eng = engines[0]
    r = eng.generate(list(range(10, 30)), 40)
    assert r.tokens == reference(m, list(range(10, 30)), 40)
    assert r.accepted > 0.5 * r.drafted > 0
    # where the time went: each worker's parts add up to its time on the request, which fits in the wall time
    a, b = r.stats.a_time_s, r.stats.b_time_s
    assert set(a) == set(A_PARTS) and set(b) == set(B_PARTS) and min(a.values()) >= 0 and min(b.values()) >= 0
    assert 0 < sum(a.values()) <= r.seconds and 0 < sum(b.values()) <= r.seconds
    assert a["prefill"] > 0 and a["guess_block"] > 0 and a["rank_guesses"] > 0 and b["layers"] > 0
    assert a["miss_rerun"] < a["guess_block"]  # mostly matches: few re-runs
    assert r.stats.a_busy_s == pytest.approx(sum(a.values()) - a["prefill"] - a["wait"])
    assert r.stats.b_wait_s == b["wait"]


def test_lookup_guesses_match_where_the_head_cannot(engines):
    # engines[1] has a random head (it almost never guesses right) and one prompt-lookup guess; a tiny random model's
    # greedy output falls into loops, which the lookup then predicts.
    m, eng = engines[3]
    prompt = [9, 8, 7, 6] * 5
    r = eng.generate(prompt, 48)
    assert r.tokens == reference(m, prompt, 48)
    assert r.accepted >= 10


def test_text_chains_decide_several_tokens_per_b_step(engines):
    """engines[1] sends B the lookup guess with up to 3 tokens that followed it in the text; where the output loops,
    B accepts chains, so it decides more tokens than it runs blocks; the same engine without chains does not."""
    m, eng = engines[1]
    prompt = [9, 8, 7, 6] * 5
    r = eng.generate(prompt, 48)
    assert r.tokens == reference(m, prompt, 48)
    assert 5 <= r.stats.chain_accepted <= r.stats.chain_drafted
    # one B block per token it decided on its own: all but the accepted chain tokens (the last block ends the request)
    assert r.drafted == len(r.tokens) - 1 - r.stats.chain_accepted == r.steps - 1
    # (B's chain, A's chain beside it) for every B block, which the latency model times blocks by: they add up to the
    # counts
    pairs = r.stats.block_pairs
    assert sum(pairs.values()) == r.steps
    assert sum(c for (b, a), c in pairs.items() if b) == r.stats.chains_sent
    assert sum(b * c for (b, a), c in pairs.items()) == r.stats.chain_drafted
    assert sum(c for (b, a), c in pairs.items() if a > 0) == r.stats.chain_blocks
    assert sum(c for (b, a), c in pairs.items() if a >= 0) == r.stats.guess_blocks
    assert {b for b, a in pairs} <= {0, 1, 2, 3} and {a for b, a in pairs} <= {-1, 0, 1, 2, 3}
    seed, damp, d, k, noise, lookup, short, chunk, _ = ENGINES[1]
    with PPDEngine(m, _head(m, d, noise), PPDConfig(k=k, lookup=lookup, prefill_chunk=chunk, chain=0)) as plain:
        p = plain.generate(prompt, 48)
    assert p.tokens == r.tokens and p.stats.chain_drafted == 0
    assert p.drafted == len(p.tokens) - 1 > r.drafted  # without chains, one B block per token


def test_a_head_that_reads_f_prev_gets_it_from_b(tmp_path):
    """B sends f(t-1) with its token; A's head reads it for its next guesses (never after a chain, whose states B
    has not finished): exact, and each f(t-1) the head saw is the final normed state before its position."""
    from prev_heads import SpyHead, check_fed_f_prev, prev_head

    m = model(2, 0.3)
    head = prev_head(m, 2, 1, cls=SpyHead)
    head.spy_path = str(tmp_path / "seen.pt")
    prompts = [[9, 8, 7, 6] * 4, list(range(40, 60))]
    with PPDEngine(m, head.materialize(), PPDConfig(k=3, lookup=1, chain=3)) as eng:
        for i, prompt in enumerate(prompts):
            r = eng.generate(prompt, 40)
            assert r.tokens == reference(m, prompt, 40) and r.stats.fallback is None
            assert 0 < r.stats.prev_guesses < len(r.tokens)  # not after the prompt (nor after chains)
            seen = torch.load(tmp_path / "seen.pt")
            (tmp_path / "seen.pt").unlink()
            assert check_fed_f_prev(m, 2, prompt + r.tokens, seen) == r.stats.prev_guesses


def test_a_block_head_reads_the_text_a_sends(tmp_path):
    """A feeds its block head every row it sends B (the prompt's, each decided token's, each chain's), and B's
    rejections drop what followed: exact, and wherever A fed the text's own layer-d state the block's output is the
    one over the final text. The head reads f(t-1) as well: both inputs at once."""
    from prev_heads import BlockSpyHead, block_head, check_fed_the_text

    m = model(2, 0.3)
    head = block_head(m, 2, 1, cls=BlockSpyHead)
    head.reads_prev = True
    head.prev_proj = torch.nn.Linear(m.config.hidden_size, m.config.hidden_size, bias=False, dtype=m.dtype)
    head.prev_null = torch.nn.Parameter(torch.randn(m.config.hidden_size, dtype=m.dtype) * 0.3)
    head.requires_grad_(False)
    head.spy_path = str(tmp_path / "seen.pt")
    prompts = [[11, 12, 13, 14] * 5, list(range(40, 60))]  # (the first repeats itself: chains)
    with PPDEngine(m, head.materialize(), PPDConfig(k=3, lookup=1, chain=3, prefill_chunk=7)) as eng:
        for i, prompt in enumerate(prompts):
            r = eng.generate(prompt, 40)
            assert r.tokens == reference(m, prompt, 40) and r.stats.fallback is None
            assert r.stats.prev_guesses > 0 and (r.stats.chain_drafted > 0 or i)
            seen = torch.load(tmp_path / "seen.pt")
            (tmp_path / "seen.pt").unlink()
            assert check_fed_the_text(m, head, prompt + r.tokens, seen) >= len(prompt) + len(r.tokens) - 1


def test_split_without_speculation_is_exact_too():
    m = model(0, 0.3)
    # a model asked for its hidden states carries transformers' capture hooks, which do not pickle: the engine drops
    # them before its workers start, and the model still answers such calls afterwards
    m(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    with PPDEngine(m, _head(m, 2, 0.0), PPDConfig(k=2, speculate=False)) as eng:
        r = eng.generate([7, 8, 9], 30)
    assert r.tokens == reference(m, [7, 8, 9], 30) and r.accepted == 0
    a = r.stats.a_time_s  # every token is a "miss": A runs it after B's answer, and no time goes to guess blocks
    assert a["guess_block"] == a["cache"] == 0 and a["miss_rerun"] > 0
    assert len(m(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states) == LAYERS + 1


@pytest.mark.parametrize("chain", [0, 3])
def test_eos_stops_generation_like_generate(chain):
    m0 = model(1, 0.3)
    ref = reference(m0, [5, 6, 7], 100)
    m, _ = load_model("tiny-random:layers=4,seed=1", dtype="float64")
    m.load_state_dict(m0.state_dict())
    m.generation_config.eos_token_id = ref[20]
    want = reference(m, [5, 6, 7], 100)
    with PPDEngine(m, _head(m, 2, 0.0), PPDConfig(k=2, chain=chain)) as eng:
        assert eng.generate([5, 6, 7], 100).tokens == want and len(want) < 100
        loop = [5, 6, 7] + ref[:20]  # the text holds the run up to EOS: chains reach it
        assert eng.generate(loop, 100).tokens == reference(m, loop, 100)


def _pids(eng):
    return [p.pid for p in eng.procs]


def _gone(pid):
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True


@pytest.mark.parametrize("stage", [0, 1])
def test_a_worker_killed_mid_generation_never_costs_a_wrong_token(stage):
    m = model(0, 0.3)
    eng = PPDEngine(m, _head(m, 2, 0.0), PPDConfig(k=2))
    eng.start()
    pids = _pids(eng)
    killed = []

    def kill_after_five(tok, seen=[]):
        seen.append(tok)
        if len(seen) == 5:
            os.kill(pids[stage], signal.SIGKILL)
            killed.append(True)

    prompt = list(range(20, 45))
    r = eng.generate(prompt, 60, on_token=kill_after_five)
    assert killed and r.tokens == reference(m, prompt, 60)
    # the reason is reported: the dead worker's exit, or its peer's error about the broken connection
    assert any(w in r.stats.fallback for w in ("exited", "hung", "worker A", "worker B"))
    assert all(_gone(p) for p in pids)  # both workers stopped, none orphaned
    # the next request starts fresh workers
    r2 = eng.generate(prompt, 10)
    assert r2.tokens == reference(m, prompt, 10) and r2.stats.fallback is None
    new = _pids(eng)
    eng.close()
    time.sleep(0.2)
    assert all(_gone(p) for p in new)


def test_a_hung_worker_times_out_and_without_fallback_raises():
    m = model(0, 0.3)
    eng = PPDEngine(m, _head(m, 2, 0.0), PPDConfig(k=2, timeout_s=3, fallback=False))
    eng.start()
    pids = _pids(eng)
    os.kill(pids[1], signal.SIGSTOP)  # B hangs
    with pytest.raises(WorkerError, match="hung"):
        eng.generate([5, 6, 7], 20)
    time.sleep(0.2)
    assert all(_gone(p) for p in pids)


def test_a_script_without_the_main_guard_fails_fast_and_names_the_fix(tmp_path):
    """spawn imports the main script again in each worker; unguarded, the script builds an engine there too. The
    user gets the guard as the fix, not a hang or a bare exit code."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from ppd_decode import load_model\n"
        "from ppd_decode.models.heads import EarlyExitHead\n"
        "from ppd_decode.strategies.ppd import PPDConfig, PPDEngine\n"
        "m, _ = load_model('tiny-random:layers=4,seed=0')\n"
        "PPDEngine(m, EarlyExitHead.from_model(m, 2).materialize(), PPDConfig(k=2)).start()\n")
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and time.monotonic() - t < 120
    assert "WorkerError" in r.stderr and 'if __name__ == "__main__":` guard' in r.stderr, r.stderr[-2000:]


def test_bad_requests_are_refused_before_workers_start():
    m = model(0, 1.0)
    with pytest.raises(PPDError, match="k must be >= 1"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(k=0))
    with pytest.raises(PPDError, match="prefill_chunk must be >= 0"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(prefill_chunk=-1))
    with pytest.raises(PPDError, match="lookup=3 guesses must be between 0 and k=2"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(k=2, lookup=3))
    with pytest.raises(PPDError, match="chain must be >= 0"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(chain=-1))
    assert PPDEngine(m, _head(m, 2, 0.0), PPDConfig(chain=3, lookup=0)).cfg.chain == 0  # nothing to chain after
    with pytest.raises(HeadMismatchError, match=r"choose d in 1\.\.3"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(layer=4))
    other, _ = load_model("tiny-random:layers=4,hidden=32,heads=2,kv_heads=1", dtype="float64")
    with pytest.raises(HeadMismatchError, match="another model"):
        PPDEngine(m, EarlyExitHead.from_model(other, 2), PPDConfig())
    s = get_strategy("ppd")(m, heads={2: _head(m, 2, 0.0)})
    for bad, err in (([], "empty prompt"), ([5] * 600, "context of 512")):
        with pytest.raises((PPDError, PromptTooLongError), match=err):
            s.generate(bad, 10)
    assert s.engine.procs == []  # nothing was started


def test_devices_and_backend_are_resolved_and_refused_with_the_fix(monkeypatch):
    m = model(0, 1.0)
    eng = PPDEngine(m, _head(m, 2, 0.0), PPDConfig())
    assert (eng.cfg.device_a, eng.cfg.device_b, eng.cfg.backend) == ("cpu", "cpu", "gloo")  # auto on a CPU: gloo
    with pytest.raises(PPDError, match="backend=nccl needs the two stages on two different GPUs"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(backend="nccl"))
    with pytest.raises(PPDError, match="use auto, gloo or nccl"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(backend="mpi"))
    with pytest.raises(PPDError, match="runs on cpu or cuda"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(device_b="meta"))
    with pytest.raises(PPDError, match="not a device"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(device_a="gpu0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PPDError, match="sees no GPU. Fix: device_a=cpu"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(device_a="cuda:0"))
    # two GPUs (as torch would report them): nccl is picked, and stays off for two stages on one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    two = PPDEngine(m, _head(m, 2, 0.0), PPDConfig(device_a="cuda:0", device_b="cuda:1"))
    assert (two.cfg.device_a, two.cfg.device_b, two.cfg.backend) == ("cuda:0", "cuda:1", "nccl")
    one = PPDEngine(m, _head(m, 2, 0.0), PPDConfig(device_a="cuda:1", device_b="cuda:1"))
    assert one.cfg.backend == "gloo"
    with pytest.raises(PPDError, match="this machine has 2 GPU"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(device_a="cuda:2"))


def test_each_worker_places_only_its_own_stage():
    """A: embeddings, layers 1..d and the head; B: layers d+1..L, the final norm and the LM head (checked by moving
    them to the meta device, which any machine has)."""
    import copy

    from ppd_decode.strategies.ppd.workers import place_stage

    m = model(0, 1.0)
    for stage in ("A", "B"):
        mm = copy.deepcopy(m)
        head = _head(mm, 2, 0.0)
        place_stage(mm, head if stage == "A" else None, 2, stage, "meta")
        on_meta = [i for i, layer in enumerate(mm.model.layers) if layer.self_attn.q_proj.weight.is_meta]
        assert on_meta == ([0, 1] if stage == "A" else [2, 3])
        assert mm.model.norm.weight.is_meta == (stage == "B")
        if stage == "A":
            assert head.lm_head.weight.is_meta and mm.model.embed_tokens.weight.is_meta


def test_the_oracle_guess_source_matches_as_often_as_asked():
    """Benchmarking's oracle: about p of A's guess rounds hold the true token (p = 0 and 1: tests/test_bench.py);
    the output is greedy's whatever p."""
    m = model(1, 1.0)
    prompt = list(range(20, 36))
    ref = reference(m, prompt, 60)
    with PPDEngine(m, _head(m, 2, 1.0), PPDConfig(k=3, oracle_p=0.5, lookup=1, chain=3)) as eng:
        assert (eng.cfg.lookup, eng.cfg.chain) == (0, 0)  # the oracle is the only guess source
        r = eng.generate(prompt, 60, reference=ref)
        assert r.tokens == ref and r.stats.fallback is None
        assert 0.3 < r.accepted / r.drafted < 0.7
        with pytest.raises(PPDError, match="needs the greedy reference"):
            eng.generate(prompt, 4)
    with pytest.raises(PPDError, match="oracle_p=1.5 must be a probability"):
        PPDEngine(m, _head(m, 2, 0.0), PPDConfig(oracle_p=1.5))
