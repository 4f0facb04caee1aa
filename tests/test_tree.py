"""Token-tree self-speculation: exact for every tree shape, with and without early pruning and dynamic sizing.

float64 tiny random Llamas (damped upper layers make drafts often right, so deep accepted paths, the cache moves
and pruning of right and wrong branches all run), random heads for the drafting and the pruning layer.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_strategies import LAYERS, heads_for, model, reference

from ppd_decode import HeadMismatchError, PPDError
from ppd_decode.profiling.step_cost import StepCosts
from ppd_decode.strategies.tree_speculative import Tree, TreeSpeculative, tree_mask

prompts = st.lists(st.integers(4, 259), min_size=1, max_size=40)
models = st.tuples(st.integers(0, 2), st.sampled_from([1.0, 0.3, 0.05]))


def tree_strategy(m, heads, **cfg):
    return TreeSpeculative(m, TreeSpeculative.Config(**cfg), heads=heads)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, mdl=models, noise=st.sampled_from([0.0, 0.05, 1.0]),
       branching=st.lists(st.integers(1, 3), min_size=1, max_size=4), max_nodes=st.integers(1, 20),
       prune=st.booleans(), prune_top=st.integers(1, 5), shortlist=st.sampled_from([0, 1, 16]),
       n=st.integers(1, 40))
def test_static_trees_with_and_without_pruning_equal_greedy(prompt, mdl, noise, branching, max_nodes, prune,
                                                             prune_top, shortlist, n):
    m = model(*mdl)
    s = tree_strategy(m, heads_for(m, mdl[0], noise), layer=1, branching=tuple(branching), max_nodes=max_nodes,
                      prune_layer=2 if prune else None, prune_top=prune_top, prune_shortlist=shortlist)
    assert s.generate(prompt, n).tokens == reference(m, prompt, n)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, mdl=models, noise=st.sampled_from([0.0, 0.05, 1.0]), n=st.integers(1, 40),
       verify_slope=st.sampled_from([0.0, 0.01, 1.0]))
def test_dynamic_trees_equal_greedy(prompt, mdl, noise, n, verify_slope):
    m = model(*mdl)
    s = tree_strategy(m, heads_for(m, mdl[0], noise), layer=1, dynamic=True, prune_layer=3, max_nodes=12)
    # Made-up costs: cheap drafting; verification from free to expensive per row, so the trees' sizes vary.
    s.costs = StepCosts.grid([1, 32], [0.01, 0.02], [1.0, 1.0 + 31 * verify_slope])
    assert s.generate(prompt, n).tokens == reference(m, prompt, n)


def test_good_drafts_give_deep_accepted_paths_and_pruning_drops_rows():
    m = model(0, 0.05)
    heads = heads_for(m, 0, 0.0)
    prompt = [5, 6, 7, 8]
    want = reference(m, prompt, 40)
    full = tree_strategy(m, heads, layer=2, branching=(3, 2, 1, 1))
    pruned = tree_strategy(m, heads, layer=2, branching=(3, 2, 1, 1), prune_layer=3, prune_top=1)
    a, b = full.generate(prompt, 40), pruned.generate(prompt, 40)
    assert a.tokens == want and b.tokens == want
    assert a.accepted / (a.steps - 1) > 2  # most steps accept several drafted tokens
    assert sum(b.stats.survivors) < sum(b.stats.tree_nodes)  # pruning removed rows before the last layers
    assert sum(a.stats.survivors) == sum(a.stats.tree_nodes)


def test_dynamic_size_follows_the_cost_of_verification():
    m = model(0, 0.05)
    heads = heads_for(m, 0, 0.0)
    cheap = tree_strategy(m, heads, layer=2, dynamic=True, max_nodes=16)
    cheap.costs = StepCosts.grid([1, 32], [0.001, 0.001], [1.0, 1.0])  # every extra node is free: grow the tree
    dear = tree_strategy(m, heads, layer=2, dynamic=True, max_nodes=16)
    dear.costs = StepCosts.grid([1, 32], [0.5, 16.0], [1.0, 40.0])  # each node costs as much as a step: stay small
    a, b = cheap.generate([5, 6, 7], 30), dear.generate([5, 6, 7], 30)
    assert a.tokens == b.tokens == reference(m, [5, 6, 7], 30)
    mean = lambda r: sum(r.stats.tree_nodes) / len(r.stats.tree_nodes)  # noqa: E731
    assert mean(a) > mean(b)


def test_tree_mask_sees_prefix_and_ancestors_only():
    t = Tree()
    root = t.add(1, -1, 1.0)
    a, b = t.add(2, root, 0.6), t.add(3, root, 0.3)
    c = t.add(4, a, 0.3)
    see = t.ancestors([root, a, b, c])
    assert see.tolist() == [[True, False, False, False], [True, True, False, False],
                            [True, False, True, False], [True, True, False, True]]
    mask = tree_mask(see, [3], prefix=2, dtype=torch.float32, device="cpu")
    assert mask.shape == (1, 1, 1, 6)
    assert (mask[0, 0, 0] == 0).tolist() == [True, True, True, True, False, True]


def test_bad_configs_are_refused():
    m = model(0, 1.0)
    heads = heads_for(m, 0, 0.0)
    with pytest.raises(HeadMismatchError, match="between the drafting layer"):
        tree_strategy(m, heads, layer=2, prune_layer=1)
    with pytest.raises(HeadMismatchError, match="no head for prune_layer"):
        tree_strategy(m, {1: heads[1]}, layer=1, prune_layer=2)
    with pytest.raises(PPDError, match="branching"):
        tree_strategy(m, heads, layer=1, branching=())
    assert LAYERS == 4


def test_shortlist_pruning_keeps_every_node_full_pruning_keeps():
    """Ranking among a shortlist can only keep more nodes than ranking among the whole vocabulary."""
    m = model(1, 0.3)
    heads = heads_for(m, 1, 0.05)
    for prompt in ([5, 6, 7], [40, 41, 42, 43], [9] * 5):
        full = tree_strategy(m, heads, layer=1, branching=(3, 2), prune_layer=2, prune_top=2, prune_shortlist=0)
        short = tree_strategy(m, heads, layer=1, branching=(3, 2), prune_layer=2, prune_top=2, prune_shortlist=4)
        a, b = full.generate(prompt, 12), short.generate(prompt, 12)
        assert a.tokens == b.tokens == reference(m, prompt, 12)
        if a.stats.tree_nodes == b.stats.tree_nodes:  # same trees drafted: compare the survivors step by step
            assert all(x <= y for x, y in zip(a.stats.survivors, b.stats.survivors))


# ------------------------------------------------------------------------------------------- batched trees
from ppd_decode.strategies.batched_tree import BatchedTreeSpeculative  # noqa: E402

batches = st.lists(st.lists(st.integers(4, 259), min_size=1, max_size=30), min_size=1, max_size=5)


def batched_tree(m, heads, **cfg):
    return BatchedTreeSpeculative(m, BatchedTreeSpeculative.Config(**cfg), heads=heads)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=batches, mdl=models, noise=st.sampled_from([0.0, 0.05, 1.0]),
       branching=st.lists(st.integers(1, 3), min_size=1, max_size=4), max_nodes=st.integers(1, 20),
       prune=st.booleans(), prune_top=st.integers(1, 5), shortlist=st.sampled_from([0, 16]), n=st.integers(1, 40))
def test_batched_trees_rows_equal_greedy_alone(prompts, mdl, noise, branching, max_nodes, prune, prune_top,
                                               shortlist, n):
    m = model(*mdl)
    s = batched_tree(m, heads_for(m, mdl[0], noise), layer=1, branching=tuple(branching), max_nodes=max_nodes,
                     prune_layer=2 if prune else None, prune_top=prune_top, prune_shortlist=shortlist)
    out = s.generate_batch(prompts, n)
    assert [r.tokens for r in out] == [reference(m, p, n) for p in prompts]


def _made_up_costs(verify_slope: float) -> StepCosts:
    return StepCosts.grid([1, 32], [[0.01, 0.02], [0.02, 0.04]],
                          [[1.0, 1.0 + 31 * verify_slope], [2.0, 2.0 + 31 * verify_slope]], batches=[1, 16])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=batches, mdl=models, noise=st.sampled_from([0.0, 0.05, 1.0]), n=st.integers(1, 40),
       verify_slope=st.sampled_from([0.0, 0.01, 1.0]))
def test_batched_dynamic_trees_with_pruning_equal_greedy_alone(prompts, mdl, noise, n, verify_slope):
    m = model(*mdl)
    s = batched_tree(m, heads_for(m, mdl[0], noise), layer=1, prune_layer=3, max_nodes=12)
    s.config.dynamic, s.costs = True, _made_up_costs(verify_slope)  # no profiling in tests
    out = s.generate_batch(prompts, n)
    assert [r.tokens for r in out] == [reference(m, p, n) for p in prompts]


def test_batched_trees_accept_deep_paths_prune_rows_and_go_ragged():
    m = model(0, 0.05)
    heads = heads_for(m, 0, 0.0)
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [200] * 7]
    want = [reference(m, p, 40) for p in prompts]
    full = batched_tree(m, heads, layer=2, branching=(3, 2, 1, 1)).generate_batch(prompts, 40)
    pruned = batched_tree(m, heads, layer=2, branching=(3, 2, 1, 1), prune_layer=3, prune_top=1).generate_batch(
        prompts, 40)
    assert [r.tokens for r in full] == want and [r.tokens for r in pruned] == want
    assert all(r.accepted / (r.steps - 1) > 1.5 for r in full)
    assert len({r.accepted for r in full}) > 1  # rows accepted different lengths: the cache went ragged
    assert sum(sum(r.stats.survivors) for r in pruned) < sum(sum(r.stats.tree_nodes) for r in pruned)
    cheap = batched_tree(m, heads, layer=2, max_nodes=16)
    cheap.config.dynamic, cheap.costs = True, _made_up_costs(0.0)
    dear = batched_tree(m, heads, layer=2, max_nodes=16)
    dear.config.dynamic, dear.costs = True, StepCosts.grid([1, 32], [[0.5, 16.0]] * 2, [[1.0, 40.0]] * 2,
                                                                    batches=[1, 16])
    a, b = cheap.generate_batch(prompts, 30), dear.generate_batch(prompts, 30)
    assert [r.tokens for r in a] == [r.tokens for r in b] == [w[:30] for w in want]
    mean = lambda rs: sum(sum(r.stats.tree_nodes) for r in rs) / sum(len(r.stats.tree_nodes) for r in rs)  # noqa: E731
    assert mean(a) > mean(b)
