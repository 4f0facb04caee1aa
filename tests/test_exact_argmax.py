"""The screened argmax of the LM head (exact_argmax.py) against the plain fp32 head and float64."""

import pickle

import pytest
import torch
from torch import nn

from ppd_decode.runtime.exact_argmax import ExactArgmax, exact_argmax
from ppd_decode.runtime.stack import final_argmax, final_logits


def _head(vocab=3000, hidden=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.05)
    return head


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_screen_error_is_within_its_bound(rows, scale):
    head = _head()
    ea = ExactArgmax(head)
    assert ea.screens
    h = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * scale
    a, beta = ea.screen(h)
    exact = h.double() @ head.weight.detach().double().T
    err = (a.double() - exact).abs().amax(dim=1)
    assert (err <= beta.double()).all(), (err, beta)
    assert (err > 0).any()  # the screen really is approximate: the bound is doing work


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_tokens_equal_the_plain_head_on_many_states(rows):
    head = _head(seed=1)
    ea = ExactArgmax(head)
    g = torch.Generator().manual_seed(2)
    for _ in range(40):
        h = torch.randn(rows, 96, generator=g) * float(torch.rand(1, generator=g) * 40 + 0.1)
        assert torch.equal(ea(h), head(h).argmax(-1))


def test_exact_ties_fall_back_and_keep_the_first_index():
    head = _head(seed=3)
    with torch.no_grad():
        head.weight[2000] = head.weight[17]  # two identical rows: every state ties them exactly
    ea = ExactArgmax(head)
    h = head.weight[17].detach()[None] * 50  # points at both rows: they are the top two
    tok = ea(h)
    assert int(tok) == 17 == int(head(h).argmax(-1))
    assert ea.fallbacks == 1


def test_batched_shapes_and_final_argmax_match_final_logits(tiny):
    model = tiny[0]
    h = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    got = final_argmax(model, h)
    assert got.shape == (2, 7)
    assert torch.equal(got, final_logits(model, h).argmax(-1))


def test_plain_argmax_where_screening_does_not_pay():
    head = _head().to(torch.bfloat16)
    ea = ExactArgmax(head)
    assert not ea.screens
    h = torch.randn(4, 96, dtype=torch.bfloat16)
    assert torch.equal(ea(h), head(h).argmax(-1))


def test_rebuilt_when_the_weights_change_in_place():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = _head(seed=5)

    m = M()
    first = exact_argmax(m)
    assert exact_argmax(m) is first
    with torch.no_grad():
        m.lm_head.weight.mul_(-1)
    second = exact_argmax(m)
    assert second is not first
    h = torch.randn(3, 96)
    assert torch.equal(second(h), m.lm_head(h).argmax(-1))


def test_weights_made_under_inference_mode():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = _head(seed=6)

    with torch.inference_mode():
        m = M()
        h = torch.randn(2, 96)
        assert torch.equal(exact_argmax(m)(h), m.lm_head(h).argmax(-1))


@pytest.mark.parametrize("packed", [True, False])
def test_the_packed_and_the_plain_screen_both_hold_their_bound(packed, monkeypatch):
    """Where oneDNN runs bf16, the screen multiplies with a packed copy (PPD_PACKED_LINEAR=0: the plain matmul)."""
    if not packed:
        monkeypatch.setenv("PPD_PACKED_LINEAR", "0")
    head = _head(seed=6)
    ea = ExactArgmax(head)
    if packed and ea._packed_bf16() is None:
        pytest.skip("no oneDNN bf16 kernels on this CPU")
    assert (ea._packed_bf16() is not None) == packed
    g = torch.Generator().manual_seed(7)
    for rows in (1, 2, 4, 9):
        h = torch.randn(rows, 96, generator=g) * 20
        a, beta = ea.screen(h)
        err = (a.double() - h.double() @ head.weight.detach().double().T).abs().amax(dim=1)
        assert (err <= beta.double()).all() and (err > 0).any()
        assert torch.equal(ea(h), head(h).argmax(-1))
    clone = pickle.loads(pickle.dumps(ea))  # the packed copy stays behind
    assert "_packed" not in clone.__dict__ and torch.equal(clone(h), ea(h))
