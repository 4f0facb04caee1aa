"""Every registered decoding strategy is token-identical to model.generate(do_sample=False).

float64 tiny random Llamas (where a flip is a bug, not rounding), random heads, many prompts and settings. Some
models have their upper layers damped so the early layers already predict well: the draft is then mostly accepted
and the acceptance and cache-rollback paths are exercised, not only the all-rejected one.
"""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppd_decode import HeadMismatchError, PPDError, PromptTooLongError, load_model
from ppd_decode.models.heads import EarlyExitHead
from ppd_decode.strategies import REGISTRY, get_strategy

LAYERS = 4


@functools.lru_cache(maxsize=None)
def model(seed: int, damp: float):
    m, _ = load_model(f"tiny-random:layers={LAYERS},seed={seed}", dtype="float64")
    with torch.no_grad():
        for layer in m.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    return m


def heads_for(m, seed: int, noise: float):
    """Heads for every layer: the logit lens plus seeded noise (noise 0: untrained, larger: nearly random)."""
    g = torch.Generator().manual_seed(seed)
    heads = {}
    for d in range(1, LAYERS):
        h = EarlyExitHead.from_model(m, d)
        with torch.no_grad():
            h.lm_head.weight.add_(torch.randn(h.lm_head.weight.shape, generator=g, dtype=torch.float64) * noise)
        heads[d] = h
    return heads


def reference(m, prompt, n):
    ids = torch.tensor([prompt])
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                     pad_token_id=m.generation_config.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def build(name, m, heads, layer=None, **cfg):
    cls = get_strategy(name)
    config = cls.Config(**cfg)
    if hasattr(config, "layer") and layer is not None:
        config.layer = layer
    return cls(m, config=config, heads=heads if cls.needs_heads else None)


prompts = st.lists(st.integers(4, 259), min_size=1, max_size=40)
models = st.tuples(st.integers(0, 2), st.sampled_from([1.0, 0.3, 0.05]))


IN_PROCESS = sorted(n for n, c in REGISTRY.items() if not c.spawns_workers)


@pytest.mark.parametrize("name", IN_PROCESS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, mdl=models, layer=st.integers(1, LAYERS - 1), noise=st.sampled_from([0.0, 0.05, 1.0]),
       n=st.integers(1, 48))
def test_token_identical_to_greedy(name, prompt, mdl, layer, noise, n):
    m = model(*mdl)
    s = build(name, m, heads_for(m, mdl[0], noise), layer=layer)
    assert s.generate(prompt, n).tokens == reference(m, prompt, n)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, mdl=models, layer=st.integers(1, LAYERS - 1), gamma=st.integers(1, 8),
       adaptive=st.booleans(), lookup=st.booleans(), confidence=st.sampled_from([0.0, 0.2, 0.6, 1.01]),
       min_block=st.sampled_from([1, 4, 7]), n=st.integers(1, 64), min_match=st.integers(1, 3),
       text_tokens=st.sampled_from([0, 1, 7]), candidates=st.integers(1, 3), tree_rows=st.sampled_from([2, 8, 16]))
def test_self_speculative_settings(prompt, mdl, layer, gamma, adaptive, lookup, confidence, min_block, n, min_match,
                                   text_tokens, candidates, tree_rows):
    m = model(*mdl)
    s = build("self_speculative", m, heads_for(m, 1, 0.0), layer=layer, draft_tokens=gamma,
              max_draft_tokens=max(gamma, 12), adaptive=adaptive, lookup=lookup, min_confidence=confidence,
              min_block=min_block, lookup_min_match=min_match, lookup_tokens=text_tokens,
              lookup_candidates=candidates, lookup_tree_rows=tree_rows)
    r = s.generate(prompt, n)
    assert r.tokens == reference(m, prompt, n)
    assert r.accepted <= r.drafted and len(r.tokens) <= n
    if lookup:
        assert r.stats.lookup_accepted <= r.stats.lookup_drafted <= r.drafted
    if confidence > 1:  # the head never drafts: only the text's drafts remain
        assert r.drafted == r.stats.lookup_drafted


def test_padded_blocks_leave_the_real_rows_and_the_cache_alone():
    """``pad_block``'s extra rows come after the real ones: the real rows' outputs are those of the unpadded block,
    and cropping the cache afterwards leaves exactly the unpadded run's entries."""
    from ppd_decode.runtime.stack import crop_cache, embed, new_cache, pad_block, prefill, run_layers

    m = model(0, 1.0)
    prompt = torch.tensor(list(range(10, 22)))
    for q in (1, 2, 3, 4, 5):
        block = embed(m, torch.tensor([list(range(40, 40 + q))]))
        padded = pad_block(block, 4)
        assert padded.shape[1] == (4 if 1 < q < 4 else q)
        assert torch.equal(padded[:, :q], block)
        caches, outs = [], []
        for b in (block, padded):
            cache = new_cache(m)
            prefill(m, prompt, cache)
            outs.append(run_layers(m, b, 0, LAYERS, cache, past=prompt.numel())[:, :q])
            crop_cache(cache, prompt.numel() + q)
            caches.append(cache)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(caches[0].layers, caches[1].layers):
            assert a.keys.shape == b.keys.shape
            torch.testing.assert_close(b.keys, a.keys, rtol=1e-12, atol=1e-12)


def test_stack_hands_the_cache_by_the_name_the_forward_declares():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on the old name until 5.40 removes it:
    the stack passes whichever name this version declares, so running it raises no deprecation warning."""
    import warnings

    from ppd_decode.runtime.stack import embed, new_cache, prefill, run_layers, with_cache

    class Old(torch.nn.Module):
        def forward(self, x, past_key_values=None, use_cache=False):
            return x

    class New(torch.nn.Module):
        def forward(self, x, cache=None, use_cache=False):
            return x

    assert with_cache(Old(), "c") == {"past_key_values": "c", "use_cache": True}
    assert with_cache(New(), "c") == {"cache": "c", "use_cache": True}
    m = model(0, 1.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        cache = new_cache(m)
        prefill(m, torch.tensor(list(range(10, 22))), cache)
        run_layers(m, embed(m, torch.tensor([[40, 41]])), 0, LAYERS, cache)


def test_grouped_attention_switch_leaves_every_block_bitwise_the_same(monkeypatch):
    """On a CPU, run_layers lets SDPA attend with grouped key/value heads under a mask (no repeat_kv copies): the
    causal, sibling and tree (block-mask) blocks come out bitwise as with transformers' default, and the switch is
    off again afterwards."""
    import os

    import transformers.integrations.sdpa_attention as sdpa

    from ppd_decode.runtime import stack
    from ppd_decode.runtime.stack import embed, new_cache, prefill, run_layers

    m = model(0, 1.0)
    assert m.config.num_key_value_heads < m.config.num_attention_heads  # the tiny model groups its heads
    prompt = torch.tensor(list(range(10, 30)))
    block = embed(m, torch.tensor([[40, 41, 42, 43, 44]]))
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]).bool()
    kinds = {"causal": {}, "siblings": {"siblings": True},
             "tree": {"block_mask": tree, "position_ids": torch.tensor([[20, 21, 21, 22, 22]])}}

    def no_copies(*a, **k):
        raise AssertionError("repeat_kv ran with the switch on")

    outs = {}
    for grouped in (False, True):
        monkeypatch.setattr(stack, "_SDPA_HAS_GQA", grouped)
        if grouped:
            monkeypatch.setattr(sdpa, "repeat_kv", no_copies)
        for name, kw in kinds.items():
            cache = new_cache(m)
            prefill(m, prompt, cache)
            outs[grouped, name] = run_layers(m, block, 0, LAYERS, cache, **kw)
    for name in kinds:
        assert torch.equal(outs[True, name], outs[False, name]), name
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


def test_self_speculative_fills_padding_with_copied_drafts():
    """With min_block=4 a copied draft is at least 3 tokens where the text has them, even after the adaptive length
    fell to 1; min_block=1 drafts what the adaptive length says. Both exact."""
    m = model(1, 1.0)
    prompt = [9, 8, 7, 6] * 5
    ref = reference(m, prompt, 60)
    runs = {b: build("self_speculative", m, heads_for(m, 0, 1.0), layer=2, lookup=True, draft_tokens=1,
                     adaptive=False, min_block=b).generate(prompt, 60) for b in (1, 4)}
    assert runs[1].tokens == runs[4].tokens == ref
    assert runs[4].stats.lookup_drafted > runs[1].stats.lookup_drafted
    assert runs[4].steps < runs[1].steps
    with pytest.raises(ValueError, match="min_block"):
        build("self_speculative", m, heads_for(m, 0, 1.0), layer=2, min_block=0)


def test_self_speculative_stops_drafting_where_the_head_is_unsure():
    m = model(0, 0.05)
    prompt = list(range(10, 30))
    sure = build("self_speculative", m, heads_for(m, 0, 0.0), layer=2).generate(prompt, 40)
    # (a tiny random model's head is never very sure: its top-1 probabilities here lie around 0.013-0.05)
    r = build("self_speculative", m, heads_for(m, 0, 0.0), layer=2, min_confidence=0.03).generate(prompt, 40)
    assert r.tokens == sure.tokens == reference(m, prompt, 40)
    assert 0 < r.drafted < sure.drafted
    assert r.accepted / r.drafted > sure.accepted / sure.drafted  # the drafts it still makes are the surer ones


def test_self_speculative_copies_drafts_from_the_text():
    """A nearly random head drafts badly, but a tiny random model's greedy output falls into loops, which drafts
    copied from the text then predict: most tokens come from accepted lookup drafts, and the output stays exact."""
    m = model(1, 1.0)
    prompt = [9, 8, 7, 6] * 5
    ref = reference(m, prompt, 60)
    plain = build("self_speculative", m, heads_for(m, 0, 1.0), layer=2).generate(prompt, 60)
    s = build("self_speculative", m, heads_for(m, 0, 1.0), layer=2, lookup=True)
    r = s.generate(prompt, 60)
    assert r.tokens == plain.tokens == ref
    assert r.stats.lookup_accepted >= 20 and r.steps < plain.steps


def test_self_speculative_verifies_several_text_continuations_as_a_tree():
    """With lookup_candidates > 1 the continuations after different matching suffixes are verified together; a later
    one is sometimes the one accepted (guards the tree path against being dead code), and the output stays exact.
    Bad settings are refused."""
    import random

    m = model(0, 1.0)
    rng = random.Random(0)
    trees = wins = 0
    for _ in range(6):
        prompt = [rng.choice(range(5, 11)) for _ in range(30)]
        r = build("self_speculative", m, heads_for(m, 0, 1.0), layer=2, lookup=True, lookup_candidates=3,
                  min_confidence=1.01).generate(prompt, 40)
        assert r.tokens == reference(m, prompt, 40)
        trees += r.stats.lookup_trees
        wins += r.stats.lookup_branch_wins
    assert trees >= 3 and wins >= 1
    for bad in ({"lookup_min_match": 0}, {"lookup_tokens": -1}, {"lookup_candidates": 0}, {"lookup_tree_rows": 1}):
        with pytest.raises(ValueError, match="lookup"):
            build("self_speculative", m, heads_for(m, 0, 1.0), layer=2, **bad)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(4, 12), min_size=1, max_size=40), mdl=models, layer=st.integers(1, LAYERS - 1),
       noise=st.sampled_from([0.0, 0.05, 1.0]), reads_prev=st.booleans(), sure=st.sampled_from([0.0, 0.02, 0.5]),
       min_block=st.sampled_from([1, 4, 7]), adaptive=st.booleans(), n=st.integers(1, 64))
def test_the_heads_branch_beside_copied_drafts_decodes_exactly(prompt, mdl, layer, noise, reads_prev, sure, min_block,
                                                                adaptive, n):
    """head_branch: the head's guess beside a copied draft it disagrees with, verified in the same pass (prompts
    over a small alphabet, so the text offers drafts at most steps). Whichever branch the final layer takes, the
    output is greedy's."""
    from prev_heads import prev_head

    m = model(*mdl)
    head = prev_head(m, layer, mdl[0], noise=noise) if reads_prev else heads_for(m, mdl[0], noise)[layer]
    r = build("self_speculative", m, {layer: head}, layer=layer, lookup=True, head_branch=True,
              head_branch_confidence=sure, min_block=min_block, adaptive=adaptive).generate(prompt, n)
    assert r.tokens == reference(m, prompt, n)
    assert r.stats.head_branch_wins <= r.stats.head_branches and r.accepted <= r.drafted
    assert r.stats.lookup_accepted <= r.stats.lookup_drafted <= r.drafted


def test_the_heads_branch_wins_where_the_copied_draft_is_wrong():
    """On a damped model (a good early head) and loopy prompts the head's branch is taken and accepted at some
    steps, which saves steps; bad settings are refused naming the fix."""
    import random

    m = model(0, 0.05)
    rng = random.Random(0)
    steps = {False: 0, True: 0}
    branches = wins = 0
    for _ in range(4):
        prompt = [rng.choice(range(5, 12)) for _ in range(30)]
        ref = reference(m, prompt, 40)
        for on in (False, True):
            r = build("self_speculative", m, heads_for(m, 0, 0.0), layer=2, lookup=True, head_branch=on,
                      head_branch_confidence=0.0).generate(prompt, 40)
            assert r.tokens == ref
            steps[on] += r.steps
            if on:
                branches, wins = branches + r.stats.head_branches, wins + r.stats.head_branch_wins
    assert wins >= 3 and branches > wins and steps[True] < steps[False]
    from prev_heads import block_head

    for heads, bad in ((heads_for(m, 0, 0.0), {"lookup": False}), (heads_for(m, 0, 0.0), {"lookup_candidates": 3}),
                       ({2: block_head(m, 2, 0)}, {})):
        with pytest.raises(ValueError, match="Fix: head_branch=false"):
            build("self_speculative", m, heads, layer=2, head_branch=True, **{"lookup": True, **bad})
    with pytest.raises(ValueError, match="probability"):
        build("self_speculative", m, heads_for(m, 0, 0.0), layer=2, lookup=True, head_branch=True,
              head_branch_confidence=1.5)


READS_PREV = sorted(n for n, c in REGISTRY.items() if c.needs_heads and "f_prev" in c.head_inputs)


@pytest.mark.parametrize("name", sorted(n for n in READS_PREV if n in IN_PROCESS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, mdl=models, layer=st.integers(1, LAYERS - 1), mix=st.sampled_from([0.0, 0.3, 3.0]),
       lookup=st.booleans(), n=st.integers(1, 48))
def test_heads_that_read_f_prev_decode_exactly(name, prompt, mdl, layer, mix, lookup, n):
    from dataclasses import fields

    from prev_heads import prev_head

    m = model(*mdl)
    has_lookup = "lookup" in {f.name for f in fields(get_strategy(name).Config)}
    s = build(name, m, {layer: prev_head(m, layer, mdl[0], mix=mix)}, layer=layer,
              **({"lookup": lookup} if has_lookup else {}))
    assert s.generate(prompt, n).tokens == reference(m, prompt, n)


def test_self_speculation_feeds_f_prev_of_the_verified_row(tmp_path):
    """The first draft of each step reads f(t-1), the final normed state that produced the token it drafts from."""
    from prev_heads import SpyHead, check_fed_f_prev, prev_head

    m = model(0, 0.3)
    head = prev_head(m, 2, 0, cls=SpyHead)
    head.spy_path = str(tmp_path / "seen.pt")
    prompt = list(range(10, 30))
    r = build("self_speculative", m, {2: head}, layer=2, min_confidence=0.0).generate(prompt, 40)
    assert r.tokens == reference(m, prompt, 40)
    assert check_fed_f_prev(m, 2, prompt + r.tokens, torch.load(tmp_path / "seen.pt")) >= 5


def test_a_strategy_refuses_a_head_it_cannot_feed():
    from prev_heads import block_head

    m = model(0, 1.0)
    # every drafting strategy takes f(t-1) heads (early_exit_assisted as unknown everywhere)
    assert READS_PREV == sorted(n for n, c in REGISTRY.items() if c.needs_heads)
    assert BLOCK == ["ppd", "self_speculative"]
    cannot = sorted(n for n, c in REGISTRY.items() if c.needs_heads and "h_d_prefix" not in c.head_inputs)
    assert cannot
    for name in cannot:
        with pytest.raises(HeadMismatchError, match=rf"reads \['h_d_prefix'\].*Fix: decode with {', '.join(BLOCK)}"):
            build(name, m, {2: block_head(m, 2, 0)}, layer=2)


BLOCK = sorted(n for n, c in REGISTRY.items() if c.needs_heads and "h_d_prefix" in c.head_inputs)


@pytest.mark.parametrize("name", sorted(n for n in BLOCK if n in IN_PROCESS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, mdl=models, layer=st.integers(1, LAYERS - 1), noise=st.sampled_from([0.0, 0.3, 3.0]),
       lookup=st.booleans(), candidates=st.sampled_from([1, 3]), n=st.integers(1, 48))
def test_block_heads_decode_exactly(name, prompt, mdl, layer, noise, lookup, candidates, n):
    from prev_heads import block_head

    m = model(*mdl)
    s = build(name, m, {layer: block_head(m, layer, mdl[0], noise)}, layer=layer, lookup=lookup,
              lookup_candidates=candidates)
    assert s.generate(prompt, n).tokens == reference(m, prompt, n)


@pytest.mark.parametrize("name,cfg", [("tree_speculative", {"branching": (2, 2, 1)}),
                                      ("tree_speculative", {"dynamic": True}),
                                      ("batched_self_speculative", {"draft_tokens": 3}),
                                      ("batched_tree_speculative", {"branching": (2, 2, 1)})])
def test_trees_and_batches_feed_f_prev_of_the_verified_row(tmp_path, name, cfg):
    """The root's children of a tree, and each batch row's first draft, read f(t-1): the final normed state of the
    verified row that produced the token they draft from (in a batch, also after other rows have finished)."""
    from prev_heads import ForwardSpyHead, check_fed_f_prev, prev_head

    m = model(0, 0.3)
    prompts = [list(range(10, 30)), [9, 8, 7, 6] * 3, [5, 6, 7]]
    if name.startswith("batched"):  # a model that ends the second row early: it leaves the batch mid-way
        m2, _ = load_model(f"tiny-random:layers={LAYERS},seed=0", dtype="float64")
        m2.load_state_dict(m.state_dict())
        m2.generation_config.eos_token_id = reference(m, prompts[1], 30)[8]
        m = m2
    head = prev_head(m, 2, 0, cls=ForwardSpyHead)
    s = build(name, m, {2: head}, layer=2, **cfg)
    head.spy_path = str(tmp_path / "seen.pt")  # (after a dynamic tree's cost profile)
    if name.startswith("batched"):
        results = s.generate_batch(prompts, 30)
        for p, r in zip(prompts, results):
            assert r.tokens == reference(m, p, 30)
        assert len({len(r.tokens) for r in results}) > 1  # some rows left the batch before others
        sequences = [p + r.tokens for p, r in zip(prompts, results)]
    else:
        r = s.generate(prompts[0], 30)
        assert r.tokens == reference(m, prompts[0], 30)
        sequences = [prompts[0] + r.tokens]
    assert check_fed_f_prev(m, 2, sequences, torch.load(tmp_path / "seen.pt")) >= 5


@pytest.mark.parametrize("name,cfg", [("tree_speculative", {"branching": (2, 1)}),
                                      ("tree_speculative", {"branching": (3, 2), "prune_layer": 3}),
                                      ("batched_tree_speculative", {"branching": (2, 1)}),
                                      ("batched_tree_speculative", {"branching": (3, 2), "prune_layer": 3}),
                                      ("batched_self_speculative", {"draft_tokens": 2})])
def test_trees_and_batches_draft_from_the_heads_shortlist(name, cfg):
    """A frequent-rows head drafts as its guesses rank: over its trained rows. Here those rows' logits are tiny, so
    over the whole vocabulary an untrained row would always come first and no draft could ever be accepted."""
    m = model(0, 0.05)
    prompt = list(range(10, 30))
    ref = reference(m, prompt, 30)
    rows = torch.tensor(sorted(set(ref)))
    head = EarlyExitHead.from_model(m, 2, projection="frequent", rows=rows)
    with torch.no_grad():
        head.row_weight.mul_(1e-3)
    head.materialize()
    with torch.no_grad():
        states = m(torch.tensor([prompt + ref]), output_hidden_states=True).hidden_states[2][0]
        assert not torch.isin(head(states).argmax(-1), rows).any()  # the premise: the full ranking never drafts them
    s = build(name, m, {2: head, 3: EarlyExitHead.from_model(m, 3)}, layer=2, **cfg)  # (3: the pruning head)
    r = s.generate_batch([prompt], 30)[0] if name.startswith("batched") else s.generate(prompt, 30)
    assert r.tokens == ref
    assert r.accepted >= 5


def test_transformers_assistant_drafts_what_the_head_guesses():
    """early_exit_assisted's draft model is the model's layers 1..d, then the head's adapter, norm and ranking (over
    its shortlist): its next-token argmax is the head's guess, and decoding with it stays exact."""
    m = model(0, 0.3)
    rows = torch.tensor([3, 10, 11, 40, 77, 200])
    head = EarlyExitHead.from_model(m, 2, adapter_rank=8, projection="frequent", rows=rows)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (head.adapter.up.weight, head.row_weight):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    head.materialize()
    s = build("early_exit_assisted", m, {2: head}, layer=2)
    prompt = list(range(10, 30))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        drafted = s.assistant(ids).logits.argmax(-1)
        h = m(ids, output_hidden_states=True).hidden_states[2]
    assert torch.equal(drafted, head.guess(h, 1)[..., 0]) and torch.isin(drafted, rows).all()
    assert s.generate(prompt, 20).tokens == reference(m, prompt, 20)
    # a head that reads f(t-1) drafts with its stand-in for it (the assistant never knows f(t-1))
    from prev_heads import prev_head

    ph = prev_head(m, 2, 0, mix=3.0)
    s = build("early_exit_assisted", m, {2: ph}, layer=2)
    with torch.no_grad():
        drafted = s.assistant(ids).logits.argmax(-1)
    assert torch.equal(drafted, ph.guess(h, 1)[..., 0]) and not torch.equal(drafted, ph.guess(h, 1, h)[..., 0])
    assert s.generate(prompt, 20).tokens == reference(m, prompt, 20)


@pytest.mark.parametrize("lookup", [False, True])
def test_self_speculation_feeds_a_block_head_the_accepted_text(tmp_path, lookup):
    """Whichever source drafted a position (the head, a copied draft, a tree of them), the block head's cache holds
    the accepted text's layer-d states: every state it guesses from is its output over the final text."""
    from prev_heads import BlockSpyHead, block_head, check_fed_the_text

    m = model(0, 0.3)
    head = block_head(m, 2, 0, cls=BlockSpyHead)
    head.spy_path = str(tmp_path / "seen.pt")
    prompt = [9, 8, 7, 6] * 4 + list(range(10, 30))
    r = build("self_speculative", m, {2: head}, layer=2, lookup=lookup, lookup_candidates=3).generate(prompt, 40)
    assert r.tokens == reference(m, prompt, 40)
    assert check_fed_the_text(m, head, prompt + r.tokens, torch.load(tmp_path / "seen.pt")) >= 5
    if lookup:
        assert r.stats.lookup_drafted > 0 and r.drafted > r.stats.lookup_drafted  # both sources drafted


def test_self_speculative_accepts_drafts_when_the_head_is_good():
    """Guards the tests above against passing vacuously: with damped upper layers most drafts are accepted."""
    m = model(0, 0.05)
    s = build("self_speculative", m, heads_for(m, 0, 0.0), layer=2)
    r = s.generate(list(range(10, 30)), 60)
    assert r.tokens == reference(m, list(range(10, 30)), 60)
    assert r.accepted / r.drafted > 0.5 and r.mean_accepted_tokens > 2


def test_stops_at_eos_like_generate():
    m = model(1, 0.3)
    ref = reference(m, [5, 6, 7], 200)
    eos = ref[len(ref) // 2]  # pretend a token the model emits is EOS
    m2, _ = load_model(f"tiny-random:layers={LAYERS},seed=1", dtype="float64")
    m2.load_state_dict(m.state_dict())
    m2.generation_config.eos_token_id = eos
    want = reference(m2, [5, 6, 7], 200)
    assert want[-1] == eos and len(want) < 200
    for name in IN_PROCESS:  # the worker-process strategies have the same checks in test_ppd.py
        assert build(name, m2, heads_for(m2, 0, 0.0), layer=2).generate([5, 6, 7], 200).tokens == want, name


@pytest.mark.parametrize("name", IN_PROCESS)
def test_bad_requests_are_refused(name):
    m = model(0, 1.0)
    s = build(name, m, heads_for(m, 0, 0.0), layer=2)
    with pytest.raises(PPDError, match="empty prompt"):
        s.generate([], 5)
    with pytest.raises(PPDError, match="max_new_tokens"):
        s.generate([5], 0)
    with pytest.raises(PromptTooLongError, match="context of 512"):
        s.generate([5] * 500, 20)


def test_head_errors():
    m = model(0, 1.0)
    with pytest.raises(HeadMismatchError, match="needs an early-exit head"):
        get_strategy("self_speculative")(m)
    with pytest.raises(HeadMismatchError, match="no head for layer 3"):
        build("self_speculative", m, {2: EarlyExitHead.from_model(m, 2)}, layer=3)
    with pytest.raises(HeadMismatchError, match="several heads"):
        get_strategy("self_speculative")(m, heads=heads_for(m, 0, 0.0))
    with pytest.raises(PPDError, match="unknown decoding strategy"):
        get_strategy("beam")


# ------------------------------------------------------------------------------------------------- lookahead
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, mdl=models, window=st.integers(0, 5), ngram=st.integers(2, 5), g=st.integers(0, 4),
       key=st.integers(1, 3), seeded=st.booleans(), add=st.booleans(), n=st.integers(1, 48))
def test_lookahead_settings(prompt, mdl, window, ngram, g, key, seeded, add, n):
    m = model(*mdl)
    g = g or int(window == 0)  # W = 0 (pool only) needs G >= 1
    s = build("lookahead", m, None, window=window, ngram=ngram, max_candidates=g, key_tokens=key,
              seed_from_prompt=seeded, add_generated=add)
    r = s.generate(prompt, n)
    assert r.tokens == reference(m, prompt, n)
    assert len(r.tokens) <= r.steps + r.accepted  # each step emits its accepted tokens plus one


def test_lookahead_accepts_ngrams():
    """Guards the tests above against passing vacuously: a model that loops makes the pool hit, several tokens a
    step are accepted, and the output is still greedy's."""
    m = model(0, 0.05)
    prompt = list(range(10, 30)) * 2
    want = reference(m, prompt, 60)
    for window, seeded, key in ((3, True, 1), (3, False, 1), (0, True, 1), (0, True, 2), (3, False, 3)):
        r = build("lookahead", m, None, window=window, ngram=4, max_candidates=3, key_tokens=key,
                  seed_from_prompt=seeded).generate(prompt, 60)
        assert r.tokens == want
        assert r.stats.ngram_hits > 0 and r.accepted > 0 and r.mean_accepted_tokens > 1


def test_lookahead_mask_gives_each_row_a_contiguous_run():
    from ppd_decode.strategies.lookahead import lookahead_layout

    W, N, G = 4, 4, 2
    pos, see, rows = lookahead_layout(100, W - 1, N - 2, W, G, N - 1)
    assert len(rows) == 1 + (W - 1) + W * (N - 2) + G * (N - 1)
    for i, (kind, a, b) in enumerate(rows):
        seen = sorted(pos[see[i]].tolist())
        assert seen == list(range(100, int(pos[i]) + 1)), (kind, a, b)  # a run from t0 up to the row itself
        if kind != "cand":  # lookahead rows never see candidates
            assert not any(rows[j][0] == "cand" for j in see[i].nonzero().flatten().tolist())
        else:  # candidates see t0 and their own earlier tokens only
            assert all(rows[j][0] == "t0" or rows[j][1] == a for j in see[i].nonzero().flatten().tolist())


def test_ngram_pool_keeps_the_most_recent_g():
    from ppd_decode.strategies.lookahead import NgramPool

    pool = NgramPool(3, 2)
    pool.add_sequence([1, 2, 3, 1, 4, 5, 1, 6, 7])
    assert pool.candidates([1]) == [(6, 7), (4, 5)]  # (2, 3) was least recently used
    pool.add([1, 4, 5])
    assert pool.candidates([9, 1]) == [(4, 5), (6, 7)]  # the last token of the context is the key
    assert pool.candidates([99]) == []


def test_ngram_pool_with_a_two_token_key_needs_the_context_to_match():
    from ppd_decode.strategies.lookahead import NgramPool

    pool = NgramPool(3, 2, key_tokens=2)
    pool.add_sequence([8, 1, 2, 3, 9, 1, 4, 5])
    assert pool.candidates([0, 8, 1]) == [(2, 3)]
    assert pool.candidates([0, 9, 1]) == [(4, 5)]
    assert pool.candidates([7, 1]) == []  # the key token alone is not enough
    assert pool.candidates([1]) == []  # nor a context shorter than the key


def test_the_interface_is_declared_not_discovered(tiny):
    """Every strategy has the lifecycle, capabilities and typed statistics of the base class."""
    from ppd_decode.strategies.base import DecodingStrategy, Stats

    for name, cls in REGISTRY.items():
        assert issubclass(cls, DecodingStrategy) and issubclass(cls.Stats, Stats), name
        assert isinstance(cls.spawns_workers, bool) and isinstance(cls.batched, bool), name
        assert callable(cls.close) and hasattr(cls, "__enter__"), name
    assert {n for n, c in REGISTRY.items() if c.spawns_workers} == {"ppd"}
    assert {n for n, c in REGISTRY.items() if c.batched} == {"batched_greedy", "batched_self_speculative",
                                                           "batched_tree_speculative"}
    closed = []
    with get_strategy("greedy")(tiny[0]) as s:
        s.close = lambda: closed.append(True)
        with pytest.raises(PPDError, match="one prompt at a time; the batched methods"):
            s.generate_batch([[1, 2]], 3)
    assert closed == [True]


def test_stats_merge_adds_requests_up():
    from dataclasses import dataclass, field

    from ppd_decode.strategies.base import Stats

    @dataclass
    class S(Stats):
        n: int = 0
        t: float = 0.0
        xs: list = field(default_factory=list)
        parts: dict = field(default_factory=dict)
        why: str | None = None

    a, b = S(1, 0.5, [1], {"x": 1.0, (1, 2): 3}, None), S(2, 0.25, [2, 3], {"x": 2.0, "y": 1.0, (1, 2): 1}, "dead")
    a.merge(b)
    assert a == S(3, 0.75, [1, 2, 3], {"x": 3.0, "y": 1.0, (1, 2): 4}, "dead")
