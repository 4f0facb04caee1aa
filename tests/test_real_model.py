"""Slow (opt-in: --runslow or PPD_SLOW=1): every decoding method on the real SmolLM2-135M with a trained head, on
prompts from each data set, token for token against model.generate(do_sample=False).

The head comes from $PPD_SLOW_HEADS (a heads directory a training run exported) or is trained here for a few
steps on the dolly training data (any trained head serves: a weak one only lowers the match rate). In fp32 a
mismatch is allowed only as a near-tie (reference top-two logits within 1e-4 at that position, docs/method.md).
"""

import os
from pathlib import Path

import pytest
import torch

from ppd_decode.data.prompts import load_prompts
from ppd_decode.models.heads import load_heads
from ppd_decode.strategies import get_strategy

LAYER, NEW_TOKENS, NEAR_TIE = 15, 32, 1e-4
TASKS = ("squad", "wmt15", "cnn_dailymail", "mt_bench")


@pytest.fixture(scope="module")
def trained_head(smollm2, shared_data, tmp_path_factory):
    model, _ = smollm2
    path = os.environ.get("PPD_SLOW_HEADS")
    if not path:
        from hydra import compose, initialize_config_dir

        from ppd_train.trainer import CONFIGS, train

        run_dir = tmp_path_factory.mktemp("head")
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                f"head.layers=[{LAYER}]", "trainer.max_steps=4", "trainer.eval_blocks=2", "head.train_vocab=4096",
                "data.max_train_tokens=8192", "wandb.mode=disabled", "trainer.save_every=100"])
        train(cfg, run_dir=run_dir)
        path = str(Path(run_dir) / "heads")
    return load_heads(path, model, [LAYER])


@pytest.fixture(scope="module")
def prompts(smollm2, shared_data):
    _, tok = smollm2
    out = []
    for task in TASKS:
        ps, _ = load_prompts(task, tok, n=2, source="local", max_new_tokens=NEW_TOKENS, context_length=8192,
                             max_prompt_tokens=400)
        out += [(task, p.input_ids) for p in ps]
    return out


def _near_tie(model, prompt, ref, pos) -> bool:
    with torch.no_grad():
        top = model(torch.tensor([prompt + ref[:pos]])).logits[0, -1].topk(2).values
    return float(top[0] - top[1]) < NEAR_TIE


@pytest.mark.slow
def test_real_model_exact_argmax_equals_the_fp32_head(smollm2, prompts):
    """The screened argmax (exact_argmax.py) against the plain fp32 LM head on the real model's final hidden states
    at every prompt position, in blocks of 1, 2, 5 and 16 rows (fp16 and bf16 screens); the bound against float64."""
    from ppd_decode.runtime.exact_argmax import ExactArgmax

    model, _ = smollm2
    ea = ExactArgmax(model.lm_head)
    assert ea.screens
    w64 = model.lm_head.weight.detach().double()
    with torch.no_grad():
        for _, ids in prompts:
            h = model.model(torch.tensor([ids])).last_hidden_state[0]  # final-normed
            ref = model.lm_head(h).argmax(-1)
            for rows in (1, 2, 5, 16):
                for s in range(0, min(len(ids), 64), rows):
                    assert torch.equal(ea(h[s:s + rows]), ref[s:s + rows])
            a, beta = ea.screen(h[:16])
            assert ((a.double() - h[:16].double() @ w64.T).abs().amax(dim=1) <= beta.double()).all()


@pytest.mark.slow
@pytest.mark.parametrize("name,config", [("stack_greedy", {}),
                                         ("self_speculative", {"layer": LAYER}),
                                         ("self_speculative", {"layer": LAYER, "lookup": True, "min_confidence": 0.7}),
                                         ("self_speculative", {"layer": LAYER, "lookup": True, "lookup_candidates": 3,
                                                               "lookup_min_match": 2, "lookup_tokens": 7}),
                                         ("lookahead", {}),
                                         ("ppd", {"layer": LAYER, "k": 4, "chain": 0}),
                                         ("ppd", {"layer": LAYER, "k": 4}),  # the default: text chains of up to 6
                                         ("tree_speculative", {"layer": LAYER, "branching": (2, 2, 1)})])
def test_real_model_token_identical_to_greedy(smollm2, trained_head, prompts, name, config):
    model, _ = smollm2
    cls = get_strategy(name)
    strategy = cls(model, config=cls.Config(**config), heads=trained_head if cls.needs_heads else None)
    try:
        for task, ids in prompts:
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=model.generation_config.pad_token_id)[0, len(ids):].tolist()
            got = strategy.generate(ids, NEW_TOKENS).tokens
            if got != ref:
                pos = next(j for j, (a, b) in enumerate(zip(ref + [None], got + [None])) if a != b)
                assert _near_tie(model, ids, ref, pos), f"{name} differs from greedy on a {task} prompt at {pos}"
    finally:
        strategy.close()


@pytest.mark.slow
@pytest.mark.parametrize("name,config", [("batched_self_speculative", {"layer": LAYER, "draft_tokens": 3}),
                                         ("batched_tree_speculative", {"layer": LAYER, "branching": (2, 2, 1)})])
def test_real_model_batched_rows_equal_greedy_alone(smollm2, trained_head, prompts, name, config):
    """All prompts in one ragged batch (different lengths, rows accepting different numbers of drafts)."""
    model, _ = smollm2
    cls = get_strategy(name)
    strategy = cls(model, config=cls.Config(**config), heads=trained_head)
    got = strategy.generate_batch([ids for _, ids in prompts], NEW_TOKENS)
    for (task, ids), res in zip(prompts, got):
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=model.generation_config.pad_token_id)[0, len(ids):].tolist()
        if res.tokens != ref:
            pos = next(j for j, (a, b) in enumerate(zip(ref + [None], res.tokens + [None])) if a != b)
            assert _near_tie(model, ids, ref, pos), f"a batched row differs from greedy on a {task} prompt at {pos}"


@pytest.mark.slow
def test_the_shipped_heads_are_found_for_the_embedded_model_and_decode_exactly(smollm2, prompts):
    """The heads in ppd_decode/models/shipped_heads/ load by default for SmolLM2-135M (by fingerprint), bring their
    drafting layers, and PPD and self-speculation with them give greedy's tokens."""
    from ppd_decode.models.catalog import choose_heads
    from ppd_decode.strategies.configs import fill_layer, rows

    model, _ = smollm2
    choice = choose_heads("shipped", model)
    assert choice.path is not None and choice.label == "shipped (smollm2-135m)"
    chosen = fill_layer(rows(["ppd", "self_speculative_text"]), choice.layer, choice.row_layers)
    assert [r.config.layer for r in chosen] == [choice.row_layers["ppd"], choice.layer]
    for row in chosen:
        with row.build(model, choice.heads) as s:
            for task, ids in prompts[::2]:
                ref = get_strategy("greedy")(model).generate(ids, NEW_TOKENS).tokens
                got = s.generate(ids, NEW_TOKENS)
                assert got.tokens == ref or _near_tie(model, ids, ref, next(
                    i for i, (a, b) in enumerate(zip(got.tokens, ref)) if a != b)), (row.name, task)
                assert got.accepted > 0  # trained heads (and the text) guess some tokens right
