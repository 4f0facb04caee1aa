"""Batched decoding: every row token-identical to its prompt decoded alone; the cost model and its policy.

float64 tiny random Llamas with damped upper layers (so drafts are often accepted and rows accept different
numbers of tokens per step: the ragged-cache paths run), random heads, prompts of different lengths.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_strategies import LAYERS, heads_for, model, reference

from ppd_decode import PPDError, PromptTooLongError, load_model
from ppd_decode.profiling.gamma import CostModel, expected_tokens, interpolate
from ppd_decode.profiling.step_cost import StepCosts
from ppd_decode.runtime.ragged import RaggedBatch
from ppd_decode.strategies import get_strategy
from ppd_decode.strategies.batched import BatchedSelfSpeculative

batches = st.lists(st.lists(st.integers(4, 259), min_size=1, max_size=30), min_size=1, max_size=6)
models = st.tuples(st.integers(0, 2), st.sampled_from([1.0, 0.3, 0.05]))


def spec(m, heads, **cfg):
    return BatchedSelfSpeculative(m, BatchedSelfSpeculative.Config(**cfg), heads=heads)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=batches, mdl=models, n=st.integers(1, 40))
def test_batched_greedy_rows_equal_greedy_alone(prompts, mdl, n):
    m = model(*mdl)
    out = get_strategy("batched_greedy")(m).generate_batch(prompts, n)
    assert [r.tokens for r in out] == [reference(m, p, n) for p in prompts]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=batches, mdl=models, layer=st.integers(1, LAYERS - 1), noise=st.sampled_from([0.0, 0.05, 1.0]),
       gamma=st.integers(0, 8), n=st.integers(1, 48))
def test_batched_self_speculation_rows_equal_greedy_alone(prompts, mdl, layer, noise, gamma, n):
    m = model(*mdl)
    s = spec(m, heads_for(m, mdl[0], noise), layer=layer, draft_tokens=gamma)
    out = s.generate_batch(prompts, n)
    assert [r.tokens for r in out] == [reference(m, p, n) for p in prompts]
    assert all(r.accepted <= r.drafted for r in out)


def test_rows_accept_different_lengths_and_holes_are_compacted(monkeypatch):
    """Good drafts in some rows and not others: the cache goes ragged, holes pile up, the batch compacts, and
    every row still equals greedy."""
    m = model(0, 0.05)
    compactions = []
    original = RaggedBatch.compact

    def counting(self):
        compactions.append(self.size)
        original(self)

    monkeypatch.setattr(RaggedBatch, "compact", counting)
    prompts = [[5, 6, 7], list(range(10, 40)), [200] * 7, [9, 8, 7, 6, 5, 4, 3, 2, 1, 4]]
    s = spec(m, heads_for(m, 0, 0.05), layer=2, draft_tokens=8)
    out = s.generate_batch(prompts, 60)
    assert [r.tokens for r in out] == [reference(m, p, 60) for p in prompts]
    assert len({r.accepted for r in out}) > 1  # rows really accepted different numbers of drafts
    assert compactions


def test_rows_stop_at_their_own_eos():
    m = model(1, 0.3)
    prompts = [[5, 6, 7], [11, 12], list(range(30, 50))]
    eos = reference(m, prompts[0], 200)[10]  # pretend a token the first row emits is EOS
    m2, _ = load_model(f"tiny-random:layers={LAYERS},seed=1", dtype="float64")
    m2.load_state_dict(m.state_dict())
    m2.generation_config.eos_token_id = eos
    want = [reference(m2, p, 80) for p in prompts]
    assert want[0][-1] == eos and len(want[0]) < 80
    heads = heads_for(m2, 0, 0.0)
    for s in (get_strategy("batched_greedy")(m2), spec(m2, heads, layer=2, draft_tokens=3)):
        assert [r.tokens for r in s.generate_batch(prompts, 80)] == want


def test_batches_larger_than_max_batch_size_are_split():
    m = model(0, 0.3)
    prompts = [[i, i + 1, i + 2] for i in range(5, 12)]
    s = spec(m, heads_for(m, 0, 0.0), layer=1, draft_tokens=2, max_batch_size=3)
    assert [r.tokens for r in s.generate_batch(prompts, 12)] == [reference(m, p, 12) for p in prompts]


def test_bad_batches_are_refused_before_any_work():
    m = model(0, 1.0)
    s = get_strategy("batched_greedy")(m)
    with pytest.raises(PPDError, match="empty prompt"):
        s.generate_batch([[5, 6], []], 5)
    with pytest.raises(PPDError, match="no prompts"):
        s.generate_batch([], 5)
    with pytest.raises(PromptTooLongError, match="context"):
        s.generate_batch([[5], [5] * 500], 20)
    heads = heads_for(m, 0, 0.0)
    with pytest.raises(PPDError, match="draft_tokens"):
        spec(m, heads, layer=2, draft_tokens=-1)
    with pytest.raises(PPDError, match="probability"):
        spec(m, heads, layer=2, draft_tokens=2, acceptance=1.5)


# ------------------------------------------------------------------------------------------------ cost model
def synthetic(lower=1.0, head=0.1, upper_per_token=0.0, upper_fixed=1.0, layer=2) -> CostModel:
    """Step pieces in made-up seconds: upper(b, q) = upper_fixed + upper_per_token * b * q."""
    bs, qs = [1, 2, 4, 8, 16], [1, 2, 3, 5, 9]
    return CostModel(StepCosts(layer=layer, context=64, batches=bs, lower_rows=[1],
                               lower=[[lower * (1 + b / 16)] for b in bs], upper_rows=qs,
                               upper=[[upper_fixed + upper_per_token * b * q for q in qs] for b in bs],
                               head=[head] * len(bs), head_in_lower=False))


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0, 0.7) == pytest.approx(1.0)
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(4, 1.0) == 5.0
    assert expected_tokens(4, 0.0) == 1.0


def test_interpolation_is_exact_on_the_grid_and_linear_between():
    xs, ys = [1, 2, 4], [1.0, 3.0, 4.0]
    assert [interpolate(xs, ys, x) for x in xs] == ys
    assert interpolate(xs, ys, 3) == pytest.approx(3.5)
    assert interpolate(xs, ys, 8) == pytest.approx(6.0)  # extended beyond the last point


def test_speculation_turns_off_where_drafting_costs_more_than_it_saves():
    # Drafting layers 1..d costs as much as a whole greedy step: never worth it, even with alpha 0.9.
    assert synthetic(lower=10.0, upper_fixed=0.1).best_gamma(1, 0.9) == 0
    # Nearly free drafts and verification: draft as far as allowed.
    assert synthetic(lower=0.01, head=0.001, upper_fixed=1.0).best_gamma(1, 0.9, max_gamma=8) == 8
    # Worthless drafts: alpha 0 never pays.
    assert synthetic(lower=0.01, head=0.001).best_gamma(4, 0.0) == 0


def test_best_gamma_shrinks_as_verification_stops_being_free():
    """Verification whose cost grows with b * q (compute-bound at large batches) pushes gamma* down with b."""
    cm = synthetic(lower=0.2, head=0.02, upper_fixed=1.0, upper_per_token=0.05)
    table = cm.table(alpha=0.6)
    assert table[1] > 0
    assert list(table.values()) == sorted(table.values(), reverse=True)
    assert table[16] < table[1]
    best = {b: max(range(9), key=lambda g: cm.throughput(b, g, 0.6)) for b in cm.batch_sizes}
    assert table == best


def test_cost_model_round_trip(tmp_path):
    cm = synthetic()
    assert CostModel.load(cm.save(tmp_path / "cm.json")) == cm


def test_adaptive_policy_looks_gamma_up_for_the_live_batch_size(tmp_path):
    m = model(0, 0.3)
    cm = synthetic(lower=0.2, head=0.02, upper_fixed=1.0, upper_per_token=0.05, layer=2)
    s = spec(m, heads_for(m, 0, 0.0), layer=2, draft_tokens="adaptive", cost_model=str(cm.save(tmp_path / "c.json")),
             acceptance=0.6, learn_acceptance=False)
    for prompts in ([[5, 6, 7]], [[5, 6, 7], [9, 10], [11]], [[i, i + 1] for i in range(5, 21)]):
        s.gammas.clear()
        res = s.generate_batch(prompts, 20)
        assert [r.tokens for r in res] == [reference(m, p, 20) for p in prompts]
        assert s.gammas and all(g == cm.best_gamma(b, 0.6) for b, g in s.gammas)
    assert s.gammas[0] == (16, cm.best_gamma(16, 0.6))


def test_acceptance_is_learned_online():
    m = model(0, 0.05)
    s = spec(m, heads_for(m, 0, 0.0), layer=3, draft_tokens=4, acceptance=0.1, prior_weight=4)
    s.generate_batch([[5, 6, 7], [8, 9]], 40)
    assert s.acceptance > 0.5  # the damped model's layer-3 lens drafts are nearly always right


def test_profiled_cost_model_on_a_tiny_model(tmp_path):
    from ppd_decode.profiling.gamma import profile

    m = model(0, 1.0)
    head = heads_for(m, 0, 0.0)[2]
    cm = profile(m, head, 2, batch_sizes=(1, 2), query_lengths=(1, 3), context=16, repeats=1)
    c = cm.costs
    assert cm.layer == 2 and len(c.upper) == 2 and len(c.upper[0]) == 2
    assert all(t > 0 for t in [x for row in c.lower for x in row] + c.head + [x for row in c.upper for x in row])
    assert 0 <= cm.best_gamma(2, 0.5) <= 8
    with pytest.raises(PPDError, match="profiled for layer 2"):
        spec(m, heads_for(m, 0, 0.0), layer=1, draft_tokens="adaptive", cost_model=str(cm.save(tmp_path / "cm.json")))


def test_one_step_profiler_caches_per_model_and_grid(monkeypatch):
    """profile_steps is timed once per model, head shape and grid; another model (even at a reused address) is
    profiled anew; StepCosts round-trips and interpolates on its grid."""
    import gc

    from ppd_decode.profiling import step_cost

    calls = []
    real = step_cost.median_time
    monkeypatch.setattr(step_cost, "median_time", lambda fn, r, dev=None: calls.append(1) or real(fn, r, dev))
    fresh = lambda: load_model("tiny-random:layers=4,seed=0", dtype="float64")[0]  # noqa: E731  (never cached)
    m = fresh()
    head = heads_for(m, 0, 0.0)[2]
    a = step_cost.profile_steps(m, head, 2, batches=(1, 2), lower_rows=(1, 2), upper_rows=(1,), context=8, repeats=1)
    n = len(calls)
    assert n == 2 * 2 + 2 * 1  # lower (head inside) at 2 row counts, upper at 1, for each batch size
    assert step_cost.profile_steps(m, head, 2, batches=(1, 2), lower_rows=(1, 2), upper_rows=(1,), context=8,
                                   repeats=1) is a and len(calls) == n
    assert a.lower_time(1, 2) == a.lower[0][1] and a.upper_time(2, 1) == a.upper[1][0]
    del m, head
    gc.collect()
    m2 = fresh()
    step_cost.profile_steps(m2, heads_for(m2, 0, 0.0)[2], 2, batches=(1, 2), lower_rows=(1, 2), upper_rows=(1,),
                            context=8, repeats=1)
    assert len(calls) == 2 * n
