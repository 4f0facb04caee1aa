"""Shipped heads: which `heads` setting loads what, their decode defaults, and the fp16 shipping script."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ppd_decode.models import catalog
from ppd_decode.models.heads import EarlyExitHead, load_heads, save_heads
from ppd_decode.strategies.configs import fill_layer, rows

REPO = Path(__file__).resolve().parents[1]


def _ship_script():
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))  # as when it runs: its folder first
    spec = importlib.util.spec_from_file_location("ship_heads", REPO / "scripts" / "ship_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _trained(model, rows=None):
    heads = {1: EarlyExitHead.from_model(model, 1),
             2: EarlyExitHead.from_model(model, 2, projection="frequent", rows=rows)}
    with torch.no_grad():
        for h in heads.values():
            for p in h.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    return heads


def test_without_shipped_heads_for_a_model_the_default_is_the_logit_lens(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr(catalog, "SHIPPED", tmp_path / "none")
    for spec in (None, "shipped", "lens"):
        choice = catalog.choose_heads(spec, model)
        assert choice.path is None and choice.label == "logit lens"
        assert list(choice.heads) == [model.config.num_hidden_layers // 2]
    assert list(catalog.choose_heads("lens", model, [1, 3]).heads) == [1, 3]


def test_shipped_heads_are_found_by_fingerprint_and_bring_their_decode_defaults(tiny, tmp_path, monkeypatch):
    from ppd_decode import load_model

    model, _ = tiny
    torch.manual_seed(0)
    heads = _trained(model, rows=torch.arange(0, 300, 2))
    save_heads(tmp_path / "src", heads, model, meta={"objective": "distill"})
    shipped = tmp_path / "shipped"
    other, _ = load_model("tiny-random:seed=9")  # same shape, other weights: its heads must not be picked
    save_heads(shipped / "aaa-other", {1: EarlyExitHead.from_model(other, 1)}, other)
    monkeypatch.setattr(catalog, "SHIPPED", shipped)
    ship = _ship_script()
    monkeypatch.setattr(ship, "SHIPPED", shipped)
    monkeypatch.setattr(sys, "argv", ["ship_heads.py"])
    answers = tmp_path / "dolly_self_distill-0123.jsonl"  # a self-distillation cache the run read
    answers.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(2)))
    args = type("A", (), {"heads": str(tmp_path / "src"), "name": "tiny", "layers": None, "command": "make train",
                          "match_rates": None, "eval_command": None, "eval_when": "", "answers": str(answers),
                          "eval_label": None})
    ship.main(args)
    assert (shipped / "tiny" / "self_distill" / "dolly_self_distill-0123.jsonl.gz").is_file()
    assert "dolly_self_distill-0123.jsonl.gz: 2 prompts" in (shipped / "tiny" / "README.md").read_text()
    (shipped / "tiny" / "decode.json").write_text(json.dumps({"layer": 2, "rows": {"ppd": 1, "self_speculative_text": 9}}))
    cfg = json.loads((shipped / "tiny" / "layer2" / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["shipped"]["command"] == "make train"
    assert "make train" in (shipped / "tiny" / "README.md").read_text()
    assert "| 2 | h_d | frequent | 0 | distill |" in (shipped / "tiny" / "README.md").read_text()  # what it reads
    from safetensors.torch import load_file

    state = load_file(str(shipped / "tiny" / "layer2" / "model.safetensors"))
    assert state["row_weight"].dtype == torch.float16 and state["rows"].dtype == torch.long

    choice = catalog.choose_heads("shipped", model)
    assert choice.path == shipped / "tiny" and choice.label == "shipped (tiny)"
    assert (choice.layer, choice.row_layers) == (2, {"ppd": 1})  # a layer without a head is dropped
    # fp16 storage: the loaded heads guess as the trained ones do, in the model's dtype
    x = torch.randn(64, model.config.hidden_size)
    with torch.no_grad():
        for d, h in load_heads(tmp_path / "src", model).items():
            assert choice.heads[d].lm_head.weight.dtype == model.dtype
            agree = (choice.heads[d].guess(x, 1) == h.guess(x, 1)).float().mean()
            assert agree > 0.95
    # the heads' defaults fill rows that name no layer; a layer the user gave wins
    chosen = rows(["ppd", "self_speculative", "self_speculative_text"], ["decode.self_speculative_text.layer=1"])
    fill_layer(chosen, choice.layer, choice.row_layers)
    assert [r.config.layer for r in chosen] == [1, 2, 1]


def test_the_shipped_readme_quotes_only_the_shipped_heads_rates_from_a_comparison():
    ship = _ship_script()
    rates = {"ks": [1], "n": 2, "max_new_tokens": 8, "tasks": {"squad": {"rates": [
        {"head": "lens", "layer": 2, "p@1": 0.1}, {"head": "distill-argmax", "layer": 2, "p@1": 0.2},
        {"head": "distill-argmax:new-run", "layer": 2, "p@1": 0.3}]}}}
    heads = {2: {"inputs": ["h_d"], "projection": "frequent", "_bytes": 1e6}}
    record = {"command": "make train", "commit": "abc", "source_run": "new-run"}
    both = ship.readme("tiny", heads, record, rates)
    assert "| squad | 2 | 0.200 |" in both and "| squad | 2 | 0.300 |" in both
    mine = ship.readme("tiny", heads, record, rates, label="distill-argmax:new-run")
    assert "| squad | 2 | 0.300 |" in mine and "0.200" not in mine and "0.100" not in mine


def test_a_directory_is_loaded_as_given(tiny, tmp_path):
    model, _ = tiny
    save_heads(tmp_path / "h", {3: EarlyExitHead.from_model(model, 3)}, model)
    choice = catalog.choose_heads(str(tmp_path / "h"), model)
    assert choice.path == tmp_path / "h" and list(choice.heads) == [3] and choice.layer is None
    with pytest.raises(Exception, match="does not exist"):
        catalog.choose_heads(str(tmp_path / "missing"), model)
