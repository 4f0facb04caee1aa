import json

import pytest
import torch

from ppd_decode import HeadMismatchError, load_model
from ppd_decode.models.heads import EarlyExitHead, load_heads, save_heads


def _hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def test_untrained_head_is_the_logit_lens(tiny):
    model, _ = tiny
    ids = torch.randint(4, 260, (1, 12))
    hs = _hidden(model, ids)
    head = EarlyExitHead.from_model(model, 2)
    with torch.no_grad():
        lens = model.lm_head(model.model.norm(hs[2]))
        assert torch.allclose(head(hs[2]), lens)
        # At the last layer, hidden_states already has the final norm: the model's logits are lm_head(hs[L]).
        assert torch.allclose(model(ids).logits, model.lm_head(hs[-1]), atol=1e-5)


def test_head_owns_its_weights():
    model, _ = load_model("tiny-random:seed=3")
    before = model.lm_head.weight.clone()
    head = EarlyExitHead.from_model(model, 1)
    with torch.no_grad():
        head.lm_head.weight.add_(1.0)
        head.norm.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, before)
    assert not torch.equal(model.model.norm.weight, head.norm.weight)


def test_zero_initialised_adapter_changes_nothing(tiny):
    model, _ = tiny
    h = torch.randn(2, 5, model.config.hidden_size)
    plain, adapted = EarlyExitHead.from_model(model, 1), EarlyExitHead.from_model(model, 1, adapter_rank=8)
    with torch.no_grad():
        assert torch.allclose(plain(h), adapted(h))


@pytest.mark.parametrize("layer", [0, 4, -1, 2.0])
def test_bad_layer(tiny, layer):
    with pytest.raises(HeadMismatchError, match=r"choose d in 1\.\.3"):
        EarlyExitHead.from_model(tiny[0], layer)


def test_save_load_round_trip(tiny, tmp_path):
    model, _ = tiny
    heads = {1: EarlyExitHead.from_model(model, 1), 3: EarlyExitHead.from_model(model, 3, adapter_rank=4)}
    with torch.no_grad():
        for h in heads.values():
            for p in h.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    save_heads(tmp_path, heads, model, meta={"objective": "distill"})
    loaded = load_heads(tmp_path, model)
    x = torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        for d in (1, 3):
            assert torch.equal(loaded[d](x), heads[d](x))
    assert list(load_heads(tmp_path, model, layers=[3])) == [3]
    assert list(load_heads(tmp_path / "layer3", model)) == [3]  # one head's own directory
    cfg = json.loads((tmp_path / "layer1" / "config.json").read_text())
    assert (cfg["objective"], cfg["layer"], cfg["vocab_size"]) == ("distill", 1, model.config.vocab_size)


def test_heads_for_another_model_are_refused(tiny, tmp_path):
    model, _ = tiny
    save_heads(tmp_path, {1: EarlyExitHead.from_model(model, 1)}, model)
    other_weights, _ = load_model("tiny-random:seed=9")
    with pytest.raises(HeadMismatchError, match="same shape but other weights"):
        load_heads(tmp_path, other_weights)
    other_shape, _ = load_model("tiny-random:layers=6")
    with pytest.raises(HeadMismatchError, match="num_hidden_layers"):
        load_heads(tmp_path, other_shape)
    # A dtype change is the same model.
    as_f64, _ = load_model("tiny-random", dtype="float64")
    assert load_heads(tmp_path, as_f64)[1].lm_head.weight.dtype == torch.float64


def test_missing_layer_and_missing_directory(tiny, tmp_path):
    model, _ = tiny
    save_heads(tmp_path / "h", {2: EarlyExitHead.from_model(model, 2)}, model)
    with pytest.raises(HeadMismatchError, match=r"has heads for layers \[2\]"):
        load_heads(tmp_path / "h", model, layers=[1])
    with pytest.raises(HeadMismatchError, match="does not exist"):
        load_heads(tmp_path / "nothing", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadMismatchError, match="holds no heads"):
        load_heads(tmp_path / "empty", model)


def test_a_head_that_reads_f_prev_starts_as_the_lens_and_round_trips(tiny, tmp_path):
    model, _ = tiny
    H = model.config.hidden_size
    lens = EarlyExitHead.from_model(model, 2)
    head = EarlyExitHead.from_model(model, 2, reads_prev=True)
    assert head.inputs == ("h_d", "f_prev") and lens.inputs == ("h_d",)
    h, f = torch.randn(2, 5, H), torch.randn(2, 5, H)
    with torch.no_grad():
        assert torch.equal(head(h, f), lens(h)) and torch.equal(head(h), lens(h))  # zero-initialised: no change
        head.prev_proj.weight.normal_(0, 0.3)
        head.prev_null.normal_(0, 0.3)
    known = torch.rand(2, 5) > 0.5
    with torch.no_grad():
        mixed, with_f, without = head(h, f, known), head(h, f), head(h)
        assert not torch.allclose(with_f, without)  # f(t-1) changes the logits
        torch.testing.assert_close(mixed[known], with_f[known])  # known positions read f(t-1) ...
        torch.testing.assert_close(mixed[~known], without[~known])  # ... the others the learned stand-in
    save_heads(tmp_path, {2: head}, model)
    assert json.loads((tmp_path / "layer2" / "config.json").read_text())["inputs"] == ["h_d", "f_prev"]
    back = load_heads(tmp_path, model)[2]
    assert back.reads_prev
    with torch.no_grad():
        torch.testing.assert_close(back(h, f), with_f)
        torch.testing.assert_close(back.guess(h[:, -1], 3, f[:, -1]), head.guess(h[:, -1], 3, f[:, -1]))


def test_a_head_reading_an_unknown_input_is_refused(tiny, tmp_path):
    model, _ = tiny
    save_heads(tmp_path, {2: EarlyExitHead.from_model(model, 2)}, model)
    cfg = tmp_path / "layer2" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "inputs": ["h_d", "f_future"]}))
    with pytest.raises(HeadMismatchError, match="reads inputs .*f_future.*upgrade ppd"):
        load_heads(tmp_path, model)


def test_an_untrained_block_head_is_the_lens_one_layer_later_and_round_trips(tiny, tmp_path):
    """Its decoder layer starts as the model's layer d+1; fed in pieces through its own cache (a rejected guess
    among them) it gives what it gives over the whole text; saved and loaded it keeps its weights and inputs."""
    model, _ = tiny
    ids = torch.randint(4, 260, (1, 14))
    hs = _hidden(model, ids)
    head = EarlyExitHead.from_model(model, 2, block=True)
    assert head.inputs == ("h_d", "h_d_prefix")
    assert EarlyExitHead.from_model(model, 2, block=True, reads_prev=True).inputs == ("h_d", "f_prev", "h_d_prefix")
    with torch.no_grad():
        whole = head.contextual(hs[2])
        torch.testing.assert_close(whole, hs[3])
        torch.testing.assert_close(head(whole), EarlyExitHead.from_model(model, 3)(hs[3]))
        ctx = head.context()
        parts = [ctx.read(hs[2][:, :6], 0), ctx.read(hs[2][:, 6:7], 6)]
        ctx.read(torch.randn(1, 4, hs[2].shape[-1]), 7)  # guesses that were rejected
        parts.append(ctx.read(hs[2][:, 7:], 7))
        torch.testing.assert_close(torch.cat(parts, 1), whole)
        with pytest.raises(RuntimeError, match="never fed"):
            ctx.read(hs[2][:, :1], 20)
        head.block.mlp.down_proj.weight.mul_(1.5)  # now unlike the model's layer
        trained = head(head.contextual(hs[2]))
    save_heads(tmp_path, {2: head}, model)
    assert json.loads((tmp_path / "layer2" / "config.json").read_text())["inputs"] == ["h_d", "h_d_prefix"]
    back = load_heads(tmp_path, model)[2]
    assert back.block is not None
    with torch.no_grad():
        torch.testing.assert_close(back(back.contextual(hs[2])), trained)
        assert not torch.allclose(trained, head(hs[3]))
