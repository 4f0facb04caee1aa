import random
import time

import pytest
import torch

from ppd_decode import PPDError, load_model
from ppd_decode.evaluation.match_rate import KS, greedy_continuations, score_captured, score_heads
from ppd_decode.models.heads import EarlyExitHead
from ppd_decode.profiling.latency import (
    StageTimes,
    chain_timings,
    chained_block_times,
    measure_stage_times,
    replicated,
    side_by_side_block_time,
    simulate_replicated,
    simulate_stage_pipelined,
    stage_pipelined,
)


@pytest.fixture(scope="module")
def m64():
    return load_model("tiny-random:layers=4,seed=2", dtype="float64")[0]


PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 12, list(range(100, 107))]


def test_batched_left_padded_generation_is_exactly_greedy(m64):
    conts = greedy_continuations(m64, PROMPTS, 24, batch_size=3)
    for p, c in zip(PROMPTS, conts):
        ref = m64.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
        assert c == ref


def test_scores_match_a_direct_computation(m64):
    conts = greedy_continuations(m64, PROMPTS, 16)
    heads = {("lens", d): EarlyExitHead.from_model(m64, d) for d in (1, 3)}
    scores, stats = score_heads(m64, heads, PROMPTS, conts, batch_size=3)
    assert stats["teacher_forced_disagreements"] == 0 and stats["positions"] == sum(map(len, conts))
    for sc in scores:
        hits = {k: 0 for k in KS}
        for p, c in zip(PROMPTS, conts):
            with torch.no_grad():
                hs = m64(torch.tensor([p + c]), output_hidden_states=True).hidden_states
                logits = heads[(sc.label, sc.layer)](hs[sc.layer][0, len(p) - 1:len(p) - 1 + len(c)])
            for k in KS:
                hits[k] += sum(t in row for t, row in zip(c, logits.topk(k, -1).indices.tolist()))
        assert sc.hits == hits
        assert all(sc.rate(a) <= sc.rate(b) for a, b in zip(KS, KS[1:]))  # top-k grows with k
    assert scores[1].rate(1) > scores[0].rate(1)  # layer 3 is closer to the final layer than layer 1
    # the states kept during generation give the same scores, with no second pass
    conts2, states = greedy_continuations(m64, PROMPTS, 16, batch_size=3, capture_layers=[1, 3])
    assert conts2 == conts and [len(s[1]) for s in states] == list(map(len, conts))
    captured = score_captured(m64, heads, conts2, states)
    for a, b in zip(scores, captured):
        assert (a.label, a.layer, a.hits, a.positions) == (b.label, b.layer, b.hits, b.positions)
        assert all(torch.equal(x, y) for x, y in zip(a.outcomes, b.outcomes))


def test_a_shortlist_head_is_scored_with_the_ranking_decoding_uses(m64):
    """A frequent-rows head guesses from its trained rows; the match rate must be the rate of those guesses (what
    PPD and self-speculation see), with the full-vocabulary ranking kept beside it."""
    conts, states = greedy_continuations(m64, PROMPTS, 16, batch_size=4, capture_layers=[2])
    targets = {t for c in conts for t in c}
    rows = torch.tensor(sorted(set(range(0, 300, 3)) - targets))  # no target among the rows: the shortlist misses
    head = EarlyExitHead.from_model(m64, 2, projection="frequent", rows=rows).materialize()
    sc = score_captured(m64, {("h", 2): head}, conts, states)[0]
    hs = torch.cat([st[2] for st in states])
    y = torch.tensor([t for c in conts for t in c])
    with torch.no_grad():
        guess, full = head.guess(hs, max(KS)), head(hs).topk(max(KS), -1).indices
    for k in KS:
        assert sc.hits[k] == int((guess[:, :k] == y[:, None]).any(-1).sum())
        assert sc.full_hits[k] == int((full[:, :k] == y[:, None]).any(-1).sum())
    # the two rankings differ on this head, so the test tells them apart
    assert sc.hits[max(KS)] == 0 < sc.full_hits[max(KS)]


def test_a_head_that_reads_f_prev_is_given_it_as_the_pipeline_would(m64):
    """f(t-1) at each generated position is the final normed state that produced the previous generated token
    (unknown at the first); captured during generation and from the teacher-forced pass alike."""
    from prev_heads import prev_head

    head = prev_head(m64, 2, 0, mix=1.0)
    heads = {("h", 2): head}
    conts, states = greedy_continuations(m64, PROMPTS, 16, batch_size=3, capture_layers=[2], capture_final=True)
    captured = score_captured(m64, heads, conts, states)[0]
    taught, _ = score_heads(m64, heads, PROMPTS, conts, batch_size=3)
    assert (captured.hits, captured.noprev_hits) == (taught[0].hits, taught[0].noprev_hits)
    hits = {k: 0 for k in KS}
    alone = {k: 0 for k in KS}
    for p, c in zip(PROMPTS, conts):
        with torch.no_grad():
            hs = m64(torch.tensor([p + c]), output_hidden_states=True).hidden_states
            at = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            known = torch.arange(len(c)) > 0
            with_f = head(hs[2][0, at], hs[-1][0, at - 1], known).topk(max(KS), -1).indices
            without = head(hs[2][0, at]).topk(max(KS), -1).indices
        for k in KS:
            hits[k] += sum(t in row[:k] for t, row in zip(c, with_f.tolist()))
            alone[k] += sum(t in row[:k] for t, row in zip(c, without.tolist()))
    assert captured.hits == hits and captured.noprev_hits == alone and hits != alone
    with pytest.raises(PPDError, match="capture_final=True"):
        score_captured(m64, heads, *greedy_continuations(m64, PROMPTS, 4, capture_layers=[2]))


def test_a_block_head_is_scored_over_the_whole_text(m64):
    """Untrained, a block head at d is the model's layer d+1 and then the lens: scored teacher-forced (its layer
    reads the prompt too) it must score as the lens at d+1 does; captured states (generated positions only) are
    refused with the fix."""
    conts = greedy_continuations(m64, PROMPTS, 16)
    block, _ = score_heads(m64, {("b", 2): EarlyExitHead.from_model(m64, 2, block=True)}, PROMPTS, conts)
    lens, _ = score_heads(m64, {("lens", 3): EarlyExitHead.from_model(m64, 3)}, PROMPTS, conts)
    alone, _ = score_heads(m64, {("lens", 2): EarlyExitHead.from_model(m64, 2)}, PROMPTS, conts)
    assert block[0].hits == lens[0].hits != alone[0].hits
    with pytest.raises(PPDError, match="measure=teacher_forced"):
        score_captured(m64, {("b", 2): EarlyExitHead.from_model(m64, 2, block=True)},
                       *greedy_continuations(m64, PROMPTS, 4, capture_layers=[2]))


def test_captured_states_are_the_teacher_forced_states(m64):
    conts, states = greedy_continuations(m64, PROMPTS, 12, batch_size=4, capture_layers=[2])
    for p, c, st in zip(PROMPTS, conts, states):
        with torch.no_grad():
            hs = m64(torch.tensor([p + c]), output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(st[2], hs[len(p) - 1:len(p) - 1 + len(c)])


def test_k_beyond_the_vocabulary_is_refused(m64):
    with pytest.raises(PPDError, match="larger than the vocabulary"):
        score_heads(m64, {("lens", 1): EarlyExitHead.from_model(m64, 1)}, PROMPTS, [[1]] * 4, ks=(1, 1000))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0])
def test_stage_pipelined_simulator_agrees_with_closed_form(p):
    rng = random.Random(0)
    outcomes = [rng.random() < p for _ in range(5000)]
    p_hat = sum(outcomes) / len(outcomes)
    for t1k, t1, t2 in [(1.0, 0.8, 1.0), (1.5, 1.0, 1.0), (0.5, 0.4, 1.2)]:
        sim = simulate_stage_pipelined(outcomes, t1k, t1, t2)
        closed = stage_pipelined(p_hat, t1k, t1, t2, t_greedy=t1 + t2)["latency"]
        assert sim == pytest.approx(closed, rel=0.02)


@pytest.mark.parametrize("p", [0.2, 0.9])
def test_replicated_simulator_agrees_with_closed_form(p):
    rng = random.Random(1)
    outcomes = [rng.random() < p for _ in range(5000)]
    p_hat = sum(outcomes) / len(outcomes)
    lat, comp = simulate_replicated(outcomes, d=30, L=40, k=3)
    cf = replicated(p_hat, 30, 40, 3)
    assert lat == pytest.approx(cf["latency"], rel=0.02)
    assert comp / 40 - 1 == pytest.approx(cf["extra_compute"], rel=0.02)


def test_closed_form_limits():
    # d = L/2 and T1 = T2: speedup 1 / (1 - p/2) (method.md)
    for p in (0.0, 0.5, 1.0):
        r = stage_pipelined(p, 1.0, 1.0, 1.0, t_greedy=2.0)
        assert r["speedup"] == pytest.approx(1 / (1 - p / 2))
    assert replicated(1.0, 20, 40, 1)["speedup"] == pytest.approx(2.0)


def test_stage_times_are_measured(m64):
    t = measure_stage_times(m64, EarlyExitHead.from_model(m64, 2), d=2, ks=(1, 3), context=16, repeats=3)
    assert set(t.t1) == {1, 3} and all(v > 0 for v in t.t1.values()) and t.t2 > 0 and t.greedy > 0
    assert t.t2_rows is None
    t = measure_stage_times(m64, EarlyExitHead.from_model(m64, 2), d=2, ks=(1,), context=16, repeats=3, t2_rows=(4,))
    assert set(t.t2_rows) == {4} and t.t2_rows[4] > 0
    assert t.beside is None


def test_stage_times_beside_the_other_stage(m64):
    from ppd_decode.profiling.stage_load import StageLoad

    m64(torch.tensor([[5, 6, 7]]), output_hidden_states=True)  # transformers' hooks, which do not pickle: dropped
    with StageLoad(m64) as load:
        # the helper really runs the work it is given, until told to stop, and can be given other work
        load.run(0, 2, 3, 16)
        time.sleep(0.3)
        assert load.idle() > 1
        assert load.idle() == 0  # nothing running
        t = measure_stage_times(m64, EarlyExitHead.from_model(m64, 2), d=2, ks=(1, 3), context=16, repeats=3,
                                t2_rows=(4,), load=load, load_rows=3)
        proc = load.proc
        assert proc.is_alive() and not load.running
    assert not proc.is_alive()  # closed: no helper left behind
    b = t.beside
    assert set(b.t1) == {1, 3} and all(v > 0 for v in b.t1.values()) and b.t2 > 0 and set(b.t2_rows) == {4}
    # a miss's re-run (B waits) and greedy run alone in the pipeline: kept from the timings alone
    assert (b.t1_miss, b.greedy, b.head, b.d) == (t.t1_miss, t.greedy, t.head, t.d) and b.beside is None


def test_text_chains_in_the_stage_pipelined_model():
    # no chain ever sent: the per-token model
    none = {"b_share": 0.0, "a_share": 0.0, "t2_chain": 9.0, "t1k_chain": 9.0, "tokens_per_block": 1.0}
    assert stage_pipelined(0.6, 1.0, 0.8, 1.2, 3.0, none) == stage_pipelined(0.6, 1.0, 0.8, 1.2, 3.0)
    # half of B's blocks carry a chain costing 1.6 instead of 1.2, all of A's cost 1.3 instead of 1.0, and a block
    # decides 1.5 tokens: (max(1.4, 1.3) + 0.4 * 0.8) / 1.5 per token
    chains = {"b_share": 0.5, "a_share": 1.0, "t2_chain": 1.6, "t1k_chain": 1.3, "tokens_per_block": 1.5}
    r = stage_pipelined(0.6, 1.0, 0.8, 1.2, 3.0, chains)
    assert r["latency"] == pytest.approx((1.4 + 0.4 * 0.8) / 1.5)
    assert r["speedup"] == pytest.approx(3.0 / r["latency"])


def test_chained_blocks_are_timed_at_their_own_lengths():
    # chains up to 6 after k=4 guesses: A's blocks of 5..10 rows, B's of 2..7 rows padded to 4
    assert chain_timings(4, 6, 4) == ((5, 6, 7, 8, 9, 10), (4, 5, 6, 7))
    assert chain_timings(4, 0, 4) == ((), ())
    st = StageTimes(d=2, t1={4: 1.0, 5: 1.1, 10: 2.0}, t1_miss=0.5, t2=0.8, greedy=1.5, head=0.01, layer=0.1,
                    t2_rows={4: 1.2, 7: 1.8})
    # A: 3 blocks with a 1-token chain, 1 with 6; B: 2 with 1 (padded to 4 rows), 2 with 6 (7 rows); blocks without a
    # chain on a side do not count for that side
    pairs = {(1, 1): 2, (6, 1): 1, (6, 6): 1, (0, 0): 3, (0, -1): 1}
    a, b = chained_block_times(st, 4, 4, pairs)
    assert a == pytest.approx((3 * 1.1 + 2.0) / 4) and b == pytest.approx((2 * 1.2 + 2 * 1.8) / 4)
    assert chained_block_times(st, 4, 4, {}) == chained_block_times(st, 4, 4, {(0, 0): 5}) == (0.0, 0.0)


def test_side_by_side_blocks_take_the_longer_of_the_two():
    st = StageTimes(d=2, t1={4: 1.0, 5: 1.1, 10: 2.0}, t1_miss=0.5, t2=0.8, greedy=1.5, head=0.01, layer=0.1,
                    t2_rows={4: 1.2, 7: 3.0})
    # B plain beside A plain (1.0), B plain beside A's 6-chain (2.0), B's 6-chain (3.0) beside A's 1-chain, B plain
    # beside an idle A (0.8)
    pairs = {(0, 0): 2, (0, 6): 1, (6, 1): 1, (0, -1): 1}
    t = side_by_side_block_time(st, 4, 4, pairs)
    assert t == pytest.approx((2 * 1.0 + 2.0 + 3.0 + 0.8) / 5)
    # the mean of the maxima exceeds the max of the means, and the model uses it when given
    chains = {"b_share": 0.2, "a_share": 0.5, "t2_chain": 3.0, "t1k_chain": 1.55, "tokens_per_block": 1.2}
    means = stage_pipelined(0.5, 1.0, 0.5, 0.8, 1.5, chains)
    both = stage_pipelined(0.5, 1.0, 0.5, 0.8, 1.5, {**chains, "block_max": t})
    assert both["latency"] == pytest.approx((t + 0.5 * 0.5) / 1.2) and both["latency"] > means["latency"]
