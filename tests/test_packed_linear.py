"""The packed decoder matmuls (ppd_decode/models/packed_linear.py): used inside ppd's stack only, fp32-accurate there, the
model's own linears everywhere else, remade when a weight changes, and off where asked."""

import threading

import pytest
import torch

from ppd_decode.models.loading import load_tiny_random
from ppd_decode.models import packed_linear
from ppd_decode.models.packed_linear import PackedLinear, packed_linears
from ppd_decode.runtime.stack import embed, new_cache, prefill, run_layers

pytestmark = pytest.mark.skipif(not packed_linear.available(load_tiny_random("tiny-random:layers=1")[0]),
                                reason="no oneDNN on this CPU build of torch: the packed path is never used")


def fresh():
    model, _ = load_tiny_random("tiny-random:layers=2,seed=3")
    return model.eval()


def linears(model):
    return [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]


def test_stack_runs_packed_and_matches_the_plain_layers_to_fp32_accuracy():
    model = fresh()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor(list(range(10, 30)))
    block = embed(model, torch.tensor([[40, 41, 42, 43]]))
    with torch.no_grad():
        cache = new_cache(model)
        prefill(model, ids, cache)
        packed = run_layers(model, block, 0, 2, cache)
        assert all(type(m) is PackedLinear and "_ppd_packed" in m.__dict__ for m in linears(model))
        assert packed_linear.available(model)
        with pytest.MonkeyPatch.context() as mp:  # the same block with the model's own matmuls
            mp.setenv("PPD_PACKED_LINEAR", "0")
            cache = new_cache(model)
            prefill(model, ids, cache)
            plain = run_layers(model, block, 0, 2, cache)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    # the state dict is the model's own: same keys, same tensors
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_outside_the_stack_every_linear_is_the_models_own():
    model = fresh()
    with torch.no_grad():
        run_layers(model, embed(model, torch.tensor([[5, 6, 7]])), 0, 2, new_cache(model))
        lin = linears(model)[0]
        x = torch.randn(3, lin.in_features)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
        with packed_linears(model):
            seen = {}
            worker = threading.Thread(target=lambda: seen.setdefault("y", lin(x)))  # another thread: not in scope
            worker.start()
            worker.join()
        assert torch.equal(seen["y"], torch.nn.functional.linear(x, lin.weight))


def test_a_changed_weight_is_packed_again():
    model = fresh()
    lin = linears(model)[0]
    x = torch.randn(2, lin.in_features)
    with torch.no_grad(), packed_linears(model):
        before = lin(x)
        lin.weight.mul_(2)
        after = lin(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


def test_training_and_the_off_switch_use_the_plain_matmul(monkeypatch):
    model = fresh()
    lin = linears(model)[0]
    x = torch.randn(2, lin.in_features)
    with packed_linears(model):  # grad on and a trainable weight: autograd needs the plain path
        y = lin(x)
    assert y.requires_grad and "_ppd_packed" not in lin.__dict__
    monkeypatch.setenv("PPD_PACKED_LINEAR", "0")
    assert not packed_linear.available(model)
    with torch.no_grad(), packed_linears(model):
        lin(x)
    assert "_ppd_packed" not in lin.__dict__


def test_generate_with_packed_matmuls_is_the_benchmarks_comparison_row_and_stays_greedy():
    from ppd_decode.strategies import get_strategy

    model = fresh()
    Greedy = get_strategy("greedy")
    plain, packed = Greedy(model), Greedy(model, Greedy.Config(packed=True))
    for seed in range(4):
        prompt = torch.randint(10, 200, (12,), generator=torch.Generator().manual_seed(seed))
        assert packed.generate(prompt, 16).tokens == plain.generate(prompt, 16).tokens
    assert all("_ppd_packed" in m.__dict__ for m in linears(model))  # the packed row did run packed


def test_a_model_that_ran_packed_still_pickles_and_copies():
    """PPD sends the model to its worker processes by pickling it; the packed copies stay behind."""
    import copy
    import pickle

    model = fresh()
    with torch.no_grad():
        run_layers(model, embed(model, torch.tensor([[5, 6, 7]])), 0, 2, new_cache(model))
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        lin = linears(clone)[0]
        assert type(lin) is PackedLinear and "_ppd_packed" not in lin.__dict__
        x = torch.randn(2, lin.in_features)
        with torch.no_grad(), packed_linears(clone):
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


def test_unpacked_turns_the_stack_back_to_the_models_own_linears():
    """The latency model times plain greedy's step as generate runs it (theory.greedy_step_time)."""
    from ppd_decode.models.packed_linear import unpacked

    model = fresh()
    block = embed(model, torch.tensor([[5, 6, 7]]))
    with torch.no_grad():
        with unpacked():
            run_layers(model, block, 0, 2, new_cache(model))
        assert not any("_ppd_packed" in m.__dict__ for m in linears(model))
        run_layers(model, block, 0, 2, new_cache(model))  # and afterwards packed again
        assert all("_ppd_packed" in m.__dict__ for m in linears(model))


def test_no_packing_where_onednn_may_round_fp32_matmuls_to_bf16():
    matmul = torch.backends.mkldnn.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no oneDNN fp32 precision setting")
    model, old = fresh(), matmul.fp32_precision
    try:
        matmul.fp32_precision = "bf16"
        assert not packed_linear.available(model)
    finally:
        matmul.fp32_precision = old
    assert packed_linear.available(model)
