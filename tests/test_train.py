"""Head training on a tiny random model: numerics, resume after SIGKILL, export, bad input. Seconds each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ppd_decode import HeadMismatchError, PPDError, TaskDataError, load_model
from ppd_decode.models.features import FrozenBackbone
from ppd_decode.models.heads import load_heads, previous_states
from ppd_train.data import DataConfig, load_conversations, pack, render, split_train_val
from ppd_train.objectives import agreement, candidate_loss, candidate_set, frequent_tokens, head_loss, targets
from ppd_train.trainer import CONFIGS, init_distributed, train, validate

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-random", "trainer.seq_len=32", "trainer.micro_batch=2", "trainer.log_every=1",
        "trainer.eval_every=4", "trainer.save_every=2", "wandb.mode=disabled", "data.val_examples=8"]


def _write_corpus(path: Path, n: int = 60) -> Path:
    rows = [{"id": str(i), "messages": [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"},
                                        {"role": "assistant", "content": f"The answer is {2 * i}. " * 3}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path / "corpus.jsonl")


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(TINY) + list(overrides))


# --------------------------------------------------------------------------------------------- building blocks
def test_backbone_matches_hidden_states_and_stops_at_the_deepest_layer(tiny):
    model, _ = tiny
    ids = torch.randint(4, 260, (2, 10))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in
             enumerate(model.model.layers)]
    try:
        hidden, logits = FrozenBackbone(model, [2, 1])(ids)
        assert logits is None and ran == [0, 1]  # layers 3 and 4 never ran
        ran.clear()
        hidden_full, logits = FrozenBackbone(model, [1, 2])(ids, final_logits=True)
        assert ran == [0, 1, 2, 3]
    finally:
        for h in hooks:
            h.remove()
    for d in (1, 2):
        assert torch.equal(hidden[d], ref.hidden_states[d]) and torch.equal(hidden_full[d], ref.hidden_states[d])
    assert torch.equal(logits, ref.logits)


def test_backbone_gives_the_final_normed_state_and_f_prev_is_it_shifted(tiny):
    model, _ = tiny
    ids = torch.randint(4, 260, (2, 10))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    hidden, logits, final = FrozenBackbone(model, [2])(ids, final_logits=True, final_hidden=True)
    assert torch.equal(final, ref.hidden_states[-1]) and torch.equal(logits, ref.logits)
    assert FrozenBackbone(model, [2])(ids, final_hidden=True)[1] is None  # no logits asked for
    prev, known = previous_states(final)
    assert torch.equal(prev[:, 1:], final[:, :-1]) and not known[:, 0].any() and known[:, 1:].all()
    torch.manual_seed(0)
    _, dropped = previous_states(torch.zeros(64, 100, 3), drop=0.25)
    assert not dropped[:, 0].any() and 0.2 < 1 - dropped[:, 1:].float().mean() < 0.3


def test_agreement_and_losses():
    teacher = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]]])
    student = torch.tensor([[[0.0, 1.0, 5.0], [3.0, 2.0, 1.0]]])
    assert agreement(student, teacher, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    # over the scored positions only; over a shortlist, the head's top-k among its rows (as decoding guesses)
    assert agreement(student, teacher, ks=(1,), scored=torch.tensor([[True, False]])) == {1: 0.0}
    assert agreement(student, teacher, ks=(1,), shortlist=torch.tensor([0, 1])) == {1: 1.0}
    ids = torch.tensor([[1, 2]])
    ce = head_loss(student, ids, None, "ce")
    assert torch.isclose(ce, torch.nn.functional.cross_entropy(student[0, :1], ids[0, 1:]))
    assert head_loss(teacher, ids, teacher, "distill", "kl").abs() < 1e-6
    assert torch.isclose(head_loss(student, ids, teacher, "distill", "argmax"),
                         torch.nn.functional.cross_entropy(student[0], teacher[0].argmax(-1)))


@pytest.mark.parametrize("objective,kind", [("ce", "kl"), ("distill", "kl"), ("distill", "argmax")])
def test_candidate_softmax_over_the_whole_vocabulary_is_the_full_loss(objective, kind):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    everything = torch.arange(11)
    full = head_loss(student, ids, teacher, objective, kind)
    assert torch.allclose(candidate_loss(student, ids, teacher, everything, objective, kind), full)


def test_candidate_set_holds_every_target_and_the_frequent_tokens():
    blocks = torch.tensor([[5, 5, 5, 7, 7, 1], [5, 7, 2, 2, 2, 2]])
    assert frequent_tokens(blocks, 2, 10).tolist() == [2, 5]  # counts: 2->4, 5->4, 7->3
    teacher = torch.zeros(1, 3, 10)
    teacher[0, :, 9] = 1.0
    ids = torch.tensor([[3, 4, 8]])
    assert candidate_set(torch.tensor([2, 5]), targets(ids, teacher, "distill", "argmax")).tolist() == [2, 5, 9]
    assert candidate_set(torch.tensor([2, 5]), targets(ids, teacher, "ce", "kl")).tolist() == [2, 4, 5, 8]
    # the restricted loss equals the full loss with the other rows' logits at -inf
    student = torch.randn(1, 3, 10)
    c = torch.tensor([2, 5, 9])
    masked = torch.full_like(student, float("-inf"))
    masked[..., c] = student[..., c]
    assert torch.isclose(candidate_loss(student[..., c], ids, teacher, c, "distill", "argmax"),
                         head_loss(masked, ids, teacher, "distill", "argmax"))


def test_corpus_loading_split_and_packing(corpus, tiny):
    _, tok = tiny
    convs = load_conversations(DataConfig(files=(str(corpus),)))
    assert len(convs) == 60 and convs[0][0]["role"] == "user"
    train_c, val_c = split_train_val(convs, 8, seed=0)
    assert len(val_c) == 8 and len(train_c) == 52
    assert not {c[0]["content"] for c in val_c} & {c[0]["content"] for c in train_c}
    assert split_train_val(convs, 8, seed=0) == (train_c, val_c)
    blocks = pack([render(tok, c) for c in train_c], 32)
    assert blocks.shape[1] == 32 and blocks.numel() <= sum(len(render(tok, c)) for c in train_c)


def test_validation_scores_the_answer_positions(corpus, tiny):
    from ppd_decode.data.prompts import render as render_prompt
    from ppd_train.data import answer_positions

    _, tok = tiny
    conv = load_conversations(DataConfig(files=(str(corpus),)))[0]
    ids = render(tok, conv)
    prompt = render_prompt(tok, conv[0]["content"])[1]
    assert ids[:len(prompt)] == prompt and len(ids) > len(prompt) + 2
    scored = answer_positions(tok, conv, ids)
    # from the prompt's last position (it predicts the first answer token) to the answer's last but one
    assert scored == [len(prompt) - 1 <= t <= len(ids) - 2 for t in range(len(ids))]
    assert answer_positions(tok, conv[1:], ids) == [t < len(ids) - 1 for t in range(len(ids))]  # no prompt: all


def test_bad_corpus_rows(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"id": "1", "text": "no messages"}) + "\n")
    with pytest.raises(TaskDataError, match="row 0 has no usable 'messages'"):
        load_conversations(DataConfig(files=(str(f),)))


def test_evaluation_sets_are_refused_as_training_data(shared_data):
    with pytest.raises(TaskDataError, match="never train"):
        load_conversations(DataConfig(files=("squad/validation_part_a.jsonl",)))


def test_self_distillation_writes_the_models_own_answers_and_resumes(tiny, corpus, tmp_path):
    from ppd_train.data import read_self_distilled, self_distill

    model, tok = tiny
    convs = load_conversations(DataConfig(files=(str(corpus),)))[:6]
    cfg = DataConfig(files=(str(corpus),), self_distill=True, sd_max_new_tokens=5, sd_batch_size=4)
    cache = tmp_path / "sd.jsonl"
    self_distill(convs, model, tok, cfg, cache, progress=False)
    rows = read_self_distilled(cache)
    assert len(rows) == 6 and rows[0][0]["content"] == convs[0][0]["content"]
    # The answer is the model's own greedy continuation of the prompt.
    from ppd_decode.data.prompts import encode_chat

    ids = torch.tensor([encode_chat(tok, convs[5][0]["content"])])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert rows[5][1]["content"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    # A cache cut mid-line by a kill is repaired, and only the missing rows are generated again.
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    self_distill(convs, model, tok, cfg, cache, progress=False)
    assert read_self_distilled(cache) == rows


def test_self_distillation_batches_prompts_of_similar_length_and_keeps_their_order(tiny, tmp_path, monkeypatch):
    """Within a window of batches the prompts are generated shortest first (a batch pads to its longest prompt);
    the cache keeps the prompts' order. On a CPU the decoder's matmuls run packed (ppd's own CPU kernels)."""
    from ppd_decode.models import packed_linear
    from ppd_train.data import _answer, _read_rows

    model, tok = tiny
    prompts = [("word " * n).strip() for n in (30, 1, 25, 2, 28, 3, 27, 4)]
    lengths, packed = [], []
    generate = model.generate

    def spy(**k):
        lengths.append(sorted(k["attention_mask"].sum(-1).tolist()))
        packed.append(getattr(packed_linear._local, "on", False))
        return generate(**k)

    monkeypatch.setattr(model, "generate", spy)
    cache = tmp_path / "sd.jsonl"
    _answer(prompts, model, tok, DataConfig(sd_max_new_tokens=2, sd_batch_size=4), cache, progress=False)
    assert len(lengths) == 2 and max(lengths[0]) < min(lengths[1])  # the four short prompts together
    assert [r["prompt"] for r in _read_rows(cache)] == prompts
    assert packed == [packed_linear.available(model)] * 2


def test_answers_are_reused_by_configurations_with_the_same_model_and_settings(tiny, corpus, tmp_path, monkeypatch):
    """A prompt answered for one data configuration is not generated again for another (another seed, split or
    mix of files) with the same model and generation settings; other settings generate their own."""
    from dataclasses import replace

    from ppd_train.data import build_training_data, read_self_distilled, self_distill_cache_path

    model, tok = tiny
    base = DataConfig(files=(str(corpus),), val_examples=8, max_train_tokens=None, self_distill=True,
                      sd_max_new_tokens=4, sd_batch_size=4, sd_num_prompts=10, sd_val_prompts=0)

    def answers(cfg):
        build_training_data(cfg, tok, 32, model=model, model_spec="tiny-random", cache_root=tmp_path)
        return read_self_distilled(self_distill_cache_path(cfg, "tiny-random", tmp_path))

    first = {u["content"]: a["content"] for u, a in answers(base)}
    generated = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **k: generated.append(len(k["input_ids"])) or generate(**k))
    other = answers(replace(base, seed=1, sd_num_prompts=None))  # every prompt, in another order
    reused = [(u, a) for u, a in other if u["content"] in first]
    assert len(reused) >= 5 and all(first[u["content"]] == a["content"] for u, a in reused)
    assert sum(generated) == len(other) - len(reused)
    generated.clear()
    assert len(answers(replace(base, sd_max_new_tokens=3))) == sum(generated) == 10


def test_asking_for_more_self_distilled_prompts_extends_the_same_cache(tiny, corpus, tmp_path):
    from dataclasses import replace

    from ppd_train.data import read_self_distilled, self_distill, self_distill_cache_path

    model, tok = tiny
    convs = load_conversations(DataConfig(files=(str(corpus),)))[:6]
    few = DataConfig(files=(str(corpus),), self_distill=True, sd_max_new_tokens=4, sd_batch_size=2, sd_num_prompts=2)
    more = replace(few, sd_num_prompts=5)
    cache = self_distill_cache_path(few, "tiny-random", tmp_path)
    assert self_distill_cache_path(more, "tiny-random", tmp_path) == cache
    assert self_distill_cache_path(replace(few, seed=1), "tiny-random", tmp_path) != cache
    self_distill(convs, model, tok, few, cache, progress=False)
    first = read_self_distilled(cache)
    assert len(first) == 2
    self_distill(convs, model, tok, more, cache, progress=False)
    assert len(read_self_distilled(cache)) == 5 and read_self_distilled(cache, 2) == first
    self_distill(convs, model, tok, few, cache, progress=False)  # fewer than cached: nothing generated, nothing lost
    assert len(read_self_distilled(cache)) == 5
    # a cache written for other prompts under the same name is refused, not mixed in
    with pytest.raises(TaskDataError, match="answers to other prompts"):
        self_distill(convs[::-1], model, tok, more, cache, progress=False)


def test_self_distilled_training_validates_on_the_models_own_answers(tiny, corpus, tmp_path):
    """The held-out prompts are answered by the model too (their own cache), so validation scores the text the
    heads are trained for; sd_val_prompts=0 keeps the held-out human text."""
    from dataclasses import replace

    from ppd_train.data import build_training_data, read_self_distilled, self_distill_cache_path

    model, tok = tiny
    cfg = DataConfig(files=(str(corpus),), val_examples=8, max_train_tokens=None, self_distill=True,
                     sd_max_new_tokens=6, sd_batch_size=4, sd_val_prompts=3)
    data = build_training_data(cfg, tok, 32, model=model, model_spec="tiny-random", cache_root=tmp_path)
    cache = self_distill_cache_path(cfg, "tiny-random", tmp_path)
    val_rows = read_self_distilled(cache.with_name(f"{cache.stem}-val.jsonl"))
    _, val_c = split_train_val(load_conversations(cfg), 8, 0)
    assert [r[0]["content"] for r in val_rows] == [c[0]["content"] for c in val_c[:3]]
    assert [r[1]["content"] for r in val_rows] != [c[1]["content"] for c in val_c[:3]]  # the model's, not the human's
    assert torch.equal(data.val, pack([render(tok, c) for c in val_rows], 32))
    human = build_training_data(replace(cfg, sd_val_prompts=0), tok, 32, model=model, model_spec="tiny-random",
                                cache_root=tmp_path)
    assert torch.equal(human.val, pack([render(tok, c) for c in val_c], 32))
    assert torch.equal(human.train, data.train)


def _passage_corpus(path: Path, n: int = 24) -> Path:
    """Rows like dolly's: some with a passage after the instruction (half of them questions), all with prose answers."""
    passage = "The river town of Elm{i} grew around a flour mill built in 18{i:02d}. " * 5  # over 300 characters
    rows = []
    for i in range(n):
        user = (f"When was the mill of Elm{i} built?" if i % 2 else f"Summarize the history of Elm{i}.") + \
            "\n\n" + passage.format(i=i) if i % 3 else f"Name a river near town {i}."
        rows.append({"id": str(i), "messages": [{"role": "user", "content": user}, {"role": "assistant", "content":
                     f"The mill of Elm{i} was built in 18{i:02d} by the people of the river town nearby.\nMore."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_task_format_prompts_fill_the_tasks_templates_with_the_corpus_text(tiny, tmp_path, monkeypatch):
    from ppd_decode.data.tasks import TaskConfig
    from ppd_train import data as data_mod
    from ppd_train.data import task_format_prompts

    _, tok = tiny
    convs = load_conversations(DataConfig(files=(str(_passage_corpus(tmp_path / "c.jsonl")),)))
    counts = {"squad": 3, "cnn_dailymail": 2, "wmt15": 50}
    prompts = task_format_prompts(convs, counts, tok, seed=0)
    head = {t: TaskConfig.named(t).instruction.split("{")[0] for t in counts}
    kind = [next(t for t, h in head.items() if p.startswith(h)) for p in prompts]
    # interleaved (a prefix holds every task), each task up to its count, translation limited by the corpus' prose
    assert kind[:3] == ["cnn_dailymail", "squad", "wmt15"]
    assert kind.count("squad") == 3 and kind.count("cnn_dailymail") == 2 and kind.count("wmt15") == len(convs)
    for p, k in zip(prompts, kind):
        if k == "squad":  # a question with the passage it is about
            q = p.split("Question: ")[1]
            assert q.endswith("built?") and f"Elm{q.split('Elm')[1].split(' ')[0]}" in p.split("Passage: ")[1]
        elif k == "wmt15":  # the first paragraph of an answer, never its second
            assert p.endswith("river town nearby.")
        else:
            assert "grew around a flour mill" in p
    assert task_format_prompts(convs, counts, tok, seed=0) == prompts
    assert task_format_prompts(convs, counts, tok, seed=1) != prompts
    monkeypatch.setattr(data_mod, "FIELD_KINDS", {k: v for k, v in data_mod.FIELD_KINDS.items() if k != "source"})
    with pytest.raises(TaskDataError, match=r"wmt15's template reads \['source'\].*Fix: drop wmt15"):
        task_format_prompts(convs, counts, tok, seed=0)


def test_self_distilled_training_adds_the_models_answers_to_task_format_prompts(tiny, tmp_path):
    from dataclasses import replace

    from ppd_train.data import (
        build_training_data,
        read_self_distilled,
        self_distill_cache_path,
        task_format_prompts,
        task_prompts_cache,
    )

    model, tok = tiny
    corpus = _passage_corpus(tmp_path / "c.jsonl")
    cfg = DataConfig(files=(str(corpus),), val_examples=4, max_train_tokens=None, self_distill=True,
                     sd_max_new_tokens=4, sd_max_prompt_tokens=480, sd_batch_size=4, sd_val_prompts=0,
                     sd_task_prompts={"squad": 2, "wmt15": 3})
    data = build_training_data(cfg, tok, 32, model=model, model_spec="tiny-random", cache_root=tmp_path)
    plain = build_training_data(replace(cfg, sd_task_prompts=None), tok, 32, model=model, model_spec="tiny-random",
                                cache_root=tmp_path)
    cache = self_distill_cache_path(cfg, "tiny-random", tmp_path)
    rows = read_self_distilled(task_prompts_cache(cache, cfg.sd_task_prompts))
    train_c, _ = split_train_val(load_conversations(cfg), 4, 0)
    assert [r[0]["content"] for r in rows] == task_format_prompts(train_c, cfg.sd_task_prompts, tok, 0)
    from ppd_decode.data.prompts import encode_chat

    ids = torch.tensor([encode_chat(tok, rows[0][0]["content"])])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert rows[0][1]["content"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    expected = pack([render(tok, c) for c in read_self_distilled(cache) + rows], 32)
    assert torch.equal(data.train, expected) and len(data.train) > len(plain.train)
    assert "task-format prompts" in data.source
    # Validation on the model's own answers takes the same mix: the held-out conversations' task-format prompts
    # (as many as the plain ones, split over the tasks) alternate with the plain held-out prompts.
    mixed = build_training_data(replace(cfg, sd_val_prompts=4), tok, 32, model=model, model_spec="tiny-random",
                                cache_root=tmp_path)
    _, held = split_train_val(load_conversations(cfg), 4, 0)
    plain_val = read_self_distilled(cache.with_name(f"{cache.stem}-val.jsonl"))
    each = {"squad": -(-len(plain_val) // 2), "wmt15": -(-len(plain_val) // 2)}
    task_val = read_self_distilled(task_prompts_cache(cache, each, val=True))
    assert [r[0]["content"] for r in task_val] == task_format_prompts(held, each, tok, 0)
    assert len(plain_val) == 4 and len(task_val) >= 2
    order = [c for pair in zip(plain_val, task_val) for c in pair] + plain_val[len(task_val):] + task_val[len(plain_val):]
    assert torch.equal(mixed.val, pack([render(tok, c) for c in order], 32))
    assert torch.equal(mixed.train, data.train)
    assert DataConfig.from_cfg({"self_distill": {"enabled": True, "task_prompts": {"squad": 5, "wmt15": 0}}}
                               ).sd_task_prompts == {"squad": 5}
    with pytest.raises(TaskDataError, match="no prompt in the formats of"):  # a corpus without passages
        build_training_data(replace(cfg, files=(str(_write_corpus(tmp_path / "qa.jsonl")),),
                                    sd_task_prompts={"squad": 2}), tok, 32, model=model, model_spec="tiny-random",
                            cache_root=tmp_path)


def test_shipped_answers_fill_a_fresh_cache_without_generating(tiny, corpus, tmp_path, monkeypatch):
    """The package's copy of a cache (answers by prompt hash, no prompt text) is read before anything is generated:
    the prompts it covers cost nothing, the rest are generated after them, in prompt order."""
    import gzip

    import ppd_train.data as data_mod
    from ppd_train.data import read_self_distilled, self_distill, write_shipped_answers

    model, tok = tiny
    convs = load_conversations(DataConfig(files=(str(corpus),)))[:8]
    cfg = DataConfig(files=(str(corpus),), self_distill=True, sd_max_new_tokens=5, sd_batch_size=4, sd_num_prompts=6)
    made = tmp_path / "made.jsonl"
    self_distill(convs, model, tok, cfg, made, progress=False)
    shipped = write_shipped_answers(made, tmp_path / "shipped.jsonl.gz")
    with gzip.open(shipped, "rt") as f:
        assert not any(c[0]["content"] in line for line in f for c in convs)  # hashes, not the prompts
    monkeypatch.setattr(data_mod, "shipped_answers_path", lambda cache: shipped)
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(len(k["input_ids"])) or real(*a, **k))
    fresh = tmp_path / "fresh.jsonl"
    self_distill(convs, model, tok, cfg, fresh, progress=False)
    assert calls == [] and read_self_distilled(fresh) == read_self_distilled(made)
    from dataclasses import replace

    self_distill(convs, model, tok, replace(cfg, sd_num_prompts=8), fresh, progress=False)
    assert calls == [2] and read_self_distilled(fresh, 6) == read_self_distilled(made)  # only the two not shipped
    assert len(read_self_distilled(fresh)) == 8


def test_cpu_training_compiles_no_deepspeed_op(monkeypatch):
    """DeepSpeed's CPU accelerator would JIT-compile its shared-memory all-reduce at init, under a file lock that a
    killed run leaves behind (every later run then waits on it forever); training on the CPU goes through gloo and
    builds nothing."""
    import deepspeed.comm.comm as ds_comm
    from torch.utils import cpp_extension

    def no_build(*args, **kwargs):
        raise AssertionError("DeepSpeed compiled an op")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(ds_comm, "cdb", None)  # a first init in this process, as in every training run
    assert init_distributed()[0].type == "cpu"
    assert ds_comm.cdb.shm_comm_op is None


def test_data_only_prepares_the_self_distilled_data_and_trains_nothing(corpus, tmp_path, monkeypatch):
    """``trainer.data_only=true`` pays for self-distillation alone; the training run after it generates nothing."""
    import transformers

    monkeypatch.setenv("PPD_CACHE", str(tmp_path / "cache"))
    sd = ["head.layers=[1]", f"data.files=[{corpus}]", "data.self_distill.enabled=true", "trainer.max_steps=2",
          "data.self_distill.max_new_tokens=4", "data.self_distill.num_prompts=6", "data.self_distill.val_prompts=4"]
    out = train(_cfg(*sd, "trainer.data_only=true"), run_dir=tmp_path / "prep")
    assert out["data_only"] and out["train_blocks"] > 0
    assert json.loads((tmp_path / "prep" / "data.json").read_text()) == out
    assert not (tmp_path / "prep" / "checkpoints").exists() and not (tmp_path / "prep" / "heads").exists()
    caches = sorted((tmp_path / "cache" / "self_distill").glob("*.jsonl"))
    assert [len(c.read_text().splitlines()) for c in caches] == [4, 6]  # the validation and training answers
    calls = []
    monkeypatch.setattr(transformers.GenerationMixin, "generate", lambda *a, **k: calls.append(1))
    train(_cfg(*sd), run_dir=tmp_path / "run")
    assert calls == [] and (tmp_path / "run" / "heads").is_dir()


def _sharded_self_distill(rank: int, world: int, port: int, corpus: str, cache: str, stop_after: int | None):
    """One rank of a self-distillation (spawned by the test below)."""
    import torch.distributed as dist

    from ppd_train.data import self_distill

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, tok = load_model("tiny-random", dtype="float64")
    convs = load_conversations(DataConfig(files=(corpus,)))[:9]
    cfg = DataConfig(files=(corpus,), self_distill=True, sd_max_new_tokens=5, sd_batch_size=2,
                     sd_num_prompts=stop_after)

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    self_distill(convs, model, tok, cfg, Path(cache), progress=False, rank=rank, world=world, gather=gather)
    # No rank tears its gloo group down while the other still talks to it (rank 0 also hosts the store): without
    # this barrier rank 0 could abort in destroy_process_group on a loaded machine.
    dist.barrier()
    dist.destroy_process_group()


def test_self_distillation_sharded_over_two_ranks_equals_one_rank(corpus, tmp_path):
    import torch.multiprocessing as mp

    from ppd_train.data import read_self_distilled
    from ppd_train.trainer import _free_port

    from ppd_train.data import self_distill

    alone, shared = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    model, tok = load_model("tiny-random", dtype="float64")
    self_distill(load_conversations(DataConfig(files=(str(corpus),)))[:9], model, tok,
                 DataConfig(files=(str(corpus),), self_distill=True, sd_max_new_tokens=5, sd_batch_size=2), alone,
                 progress=False)
    # two ranks, the first time stopped after 3 prompts (an odd prefix), then asked for all: they extend it
    mp.spawn(_sharded_self_distill, args=(2, _free_port(), str(corpus), str(shared), 3), nprocs=2)
    assert len(read_self_distilled(shared)) == 3
    mp.spawn(_sharded_self_distill, args=(2, _free_port(), str(corpus), str(shared), None), nprocs=2)
    assert read_self_distilled(shared) == read_self_distilled(alone) and len(read_self_distilled(alone)) == 9
    assert not list(tmp_path.glob("*rank*"))  # the shards are merged and gone


# ------------------------------------------------------------------------------------------------ the job
def _head_params(run_dir: Path, model) -> dict:
    return {d: {k: v.clone() for k, v in h.state_dict().items()} for d, h in load_heads(run_dir / "heads", model).items()}


@pytest.mark.parametrize("projection", ["frequent", "own"])
def test_heads_that_read_f_prev_train_and_export(corpus, tmp_path, projection):
    out = train(_cfg("head.layers=[1,2]", f"data.files=[{corpus}]", "trainer.max_steps=4", "head.reads_prev=true",
                     f"head.projection={projection}", *(["head.train_vocab=0"] if projection == "own" else [])),
                run_dir=tmp_path / "r")
    model, _ = load_model("tiny-random")
    heads = load_heads(tmp_path / "r" / "heads", model)
    for d, h in heads.items():
        assert h.inputs == ("h_d", "f_prev")
        assert h.prev_proj.weight.abs().sum() > 0 and h.prev_null.abs().sum() > 0  # both cases trained
        assert 0 <= out["final"][f"val/top1_agree_noprev/layer{d}"] <= 1
    cfg = _cfg("head.reads_prev=true")
    assert cfg.run_name.endswith("-prev")  # never resumes a plain head's checkpoints
    with pytest.raises(PPDError, match="prev_drop"):
        validate(_cfg("head.prev_drop=1.0"))


def test_block_heads_train_and_export(corpus, tmp_path):
    out = train(_cfg("head.layers=[1,2]", f"data.files=[{corpus}]", "trainer.max_steps=4", "head.block=true"),
                run_dir=tmp_path / "r")
    model, _ = load_model("tiny-random")
    heads = load_heads(tmp_path / "r" / "heads", model)
    for d, h in heads.items():
        assert h.inputs == ("h_d", "h_d_prefix")
        start = model.model.layers[d].state_dict()
        moved = [k for k, v in h.block.state_dict().items() if not torch.equal(v.to(start[k].dtype), start[k])]
        assert moved, "the block head's decoder layer did not train"
        assert 0 <= out["final"][f"val/top1_agree/layer{d}"] <= 1
    assert _cfg("head.block=true").run_name.endswith("-block")  # never resumes another kind's checkpoints


def test_training_continues_from_exported_heads_of_the_same_kind(corpus, tmp_path, tiny):
    """head.init_from: the heads start from the given ones (with lr 0 they stay exactly those), rows included;
    heads of another kind are refused with the override that matches them."""
    kind = ["head.layers=[1,2]", f"data.files=[{corpus}]", "head.reads_prev=true", "head.adapter_rank=8",
            "head.train_vocab=64", "trainer.keep_best=false"]
    train(_cfg(*kind, "trainer.max_steps=3", "trainer.lr=0.05"), run_dir=tmp_path / "a")
    train(_cfg(*kind, "trainer.max_steps=2", "trainer.lr=0", f"head.init_from={tmp_path / 'a' / 'heads'}",
               "data.seed=1"), run_dir=tmp_path / "b")
    model, _ = tiny
    a, b = (load_heads(tmp_path / r / "heads", model, materialize=False) for r in "ab")
    for d in (1, 2):
        assert a[d].adapter.up.weight.abs().sum() > 0  # trained, so equality below means loaded
        sa, sb = a[d].state_dict(), b[d].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "b" / "heads" / "layer1" / "config.json").read_text())["init_from"] == \
        str(tmp_path / "a" / "heads")
    # a continued run is named apart from one that starts from the logit lens: it never resumes that run's checkpoints
    assert _cfg(*kind, f"head.init_from={tmp_path}").run_name != _cfg(*kind).run_name
    assert _cfg(*kind, f"head.init_from={tmp_path}").run_name.startswith(_cfg(*kind).run_name + "-from-")
    with pytest.raises(PPDError, match=r"Fix: head.adapter_rank=8\."):
        train(_cfg(*kind[:3], "head.train_vocab=64", "trainer.max_steps=1",
                   f"head.init_from={tmp_path / 'a' / 'heads'}"), run_dir=tmp_path / "c")
    with pytest.raises(PPDError, match=r"rows are never dropped. Fix: head.train_vocab=64 "):
        train(_cfg(*kind[:4], "head.train_vocab=32", "trainer.max_steps=1",
                   f"head.init_from={tmp_path / 'a' / 'heads'}"), run_dir=tmp_path / "d")


def test_continued_heads_take_more_rows_from_the_new_data(corpus, tmp_path, tiny):
    """head.init_from with a larger head.train_vocab: the heads keep their rows and trained weights and add the new
    data's most frequent tokens they lacked, starting from the model's LM head rows (with lr 0 nothing else moves)."""
    from ppd_train.objectives import new_frequent_tokens

    kind = ["head.layers=[1]", f"data.files=[{corpus}]", "head.adapter_rank=0", "trainer.keep_best=false"]
    train(_cfg(*kind, "head.train_vocab=48", "trainer.max_steps=3", "trainer.lr=0.05"), run_dir=tmp_path / "a")
    train(_cfg(*kind, "head.train_vocab=80", "trainer.max_steps=1", "trainer.lr=0",
               f"head.init_from={tmp_path / 'a' / 'heads'}"), run_dir=tmp_path / "b")
    model, _ = tiny
    a, b = (load_heads(tmp_path / r / "heads", model, materialize=False)[1] for r in "ab")
    assert len(a.rows) == 48 and len(b.rows) == 80 and bool(torch.isin(a.rows, b.rows).all())
    old = torch.isin(b.rows, a.rows)
    assert torch.equal(b.row_weight[old], a.row_weight)  # the trained rows as they were
    lm = model.get_output_embeddings().weight
    assert torch.equal(b.row_weight[~old], lm[b.rows[~old]].to(b.row_weight.dtype))  # the new ones as a new head's
    assert not torch.equal(a.row_weight, lm[a.rows].to(a.row_weight.dtype))  # (a's rows did train)
    # the added rows are the most frequent tokens the first rows lacked
    blocks = torch.tensor([[5, 5, 5, 7, 7, 9, 9, 1]])
    assert new_frequent_tokens(blocks, torch.tensor([5]), 2, 12).tolist() == [7, 9]


def test_each_head_is_exported_at_its_best_validation_step(corpus, tmp_path, tiny):
    """With a high learning rate the heads' validation top-1 moves up and down; each exported head is the weights of
    its own best evaluation (scored again here), and keep_best=false exports the last step's."""
    from ppd_train.trainer import HeadBank, evaluate
    from ppd_train.data import build_training_data

    common = ["head.layers=[1,2]", f"data.files=[{corpus}]", "trainer.max_steps=10", "trainer.eval_every=1",
              "trainer.lr=0.5", "head.adapter_rank=0"]
    out = train(_cfg(*common), run_dir=tmp_path / "best")
    last = train(_cfg(*common, "trainer.keep_best=false"), run_dir=tmp_path / "last")
    history = json.loads((tmp_path / "best" / "metrics.json").read_text())["history"]
    model, tok = tiny
    cfg = _cfg(*common)
    data = build_training_data(DataConfig.from_cfg(cfg.data), tok, 32)
    val, scored = data.val[: int(cfg.trainer.eval_blocks)], data.val_scored[: int(cfg.trainer.eval_blocks)]
    assert 0 < scored.float().mean() < 1  # the answers only
    assert "val/top1_agree_full/layer1" in history[-1]  # frequent-rows heads: the full-vocabulary ranking beside
    for run, res in (("best", out), ("last", last)):
        heads = load_heads(tmp_path / run / "heads", model)  # (as decoding loads them: shortlist and all)
        rescored = evaluate(FrozenBackbone(model, [1, 2]), HeadBank(heads, "distill", "argmax", 1.0), val, 2,
                            torch.device("cpu"), scored)
        for d in (1, 2):
            key = f"val/top1_agree/layer{d}"
            assert rescored[key] == pytest.approx(res["final"][key], abs=1e-6)
    for d in (1, 2):
        key = f"val/top1_agree/layer{d}"
        scores = [h[key] for h in history if key in h]
        assert out["final"][key] == max(scores) and last["final"][key] == scores[-1]
        step = out["selected_steps"][d]
        assert next(h for h in history if h["step"] == step)[key] == max(scores)
        saved = json.loads((tmp_path / "best" / "heads" / f"layer{d}" / "config.json").read_text())
        assert saved["selected_step"] == step
    # the setting is worth having only if a head's best is not its last step
    assert any(out["final"][f"val/top1_agree/layer{d}"] > last["final"][f"val/top1_agree/layer{d}"] for d in (1, 2))


def test_one_forward_for_several_heads_equals_training_each_alone(corpus, tmp_path):
    common = [f"data.files=[{corpus}]", "trainer.max_steps=4", "head.adapter_rank=8"]  # a random init too
    together = train(_cfg("head.layers=[1,3]", *common), run_dir=tmp_path / "both")
    train(_cfg("head.layers=[1]", *common), run_dir=tmp_path / "one")
    train(_cfg("head.layers=[3]", *common), run_dir=tmp_path / "three")
    model, _ = load_model("tiny-random")
    both = _head_params(tmp_path / "both", model)
    alone = {**_head_params(tmp_path / "one", model), **_head_params(tmp_path / "three", model)}
    for d in (1, 3):
        for k in both[d]:
            torch.testing.assert_close(both[d][k], alone[d][k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(both[d]["lm_head.weight"], model.lm_head.weight)  # it did train
    for d in (1, 3):  # the job reports every head it trained
        assert 0 <= together["final"][f"val/top1_agree/layer{d}"] <= 1


def test_candidate_softmax_training_touches_only_candidate_rows(corpus, tmp_path, tiny):
    model, tok = tiny
    train(_cfg("head.layers=[2]", f"data.files=[{corpus}]", "trainer.max_steps=3", "head.objective=ce",
               "head.train_vocab=8", "head.projection=own", "head.adapter_rank=0"), run_dir=tmp_path)
    trained = _head_params(tmp_path, model)[2]["lm_head.weight"]
    changed = (trained != model.lm_head.weight).any(-1)
    seen = {t for c in load_conversations(DataConfig(files=(str(corpus),))) for t in render(tok, c)}
    assert changed.any()
    # with ce every candidate is a frequent or a target token of the corpus: no other row can move
    assert set(changed.nonzero().flatten().tolist()) <= seen


def test_shared_projection_trains_only_norm_and_adapter_and_exports_small_heads(corpus, tmp_path):
    train(_cfg("head.layers=[1,3]", f"data.files=[{corpus}]", "trainer.max_steps=3", "head.projection=shared",
               "head.adapter_rank=4", "head.train_vocab=8"), run_dir=tmp_path)
    model, _ = load_model("tiny-random")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    heads = load_heads(tmp_path / "heads", model)
    for d, head in heads.items():
        assert head.projection == "shared" and head.lm_head is model.lm_head
        assert head.adapter.up.weight.abs().sum() > 0  # the zero-initialised adapter did train
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "heads" / f"layer{d}" / "model.safetensors"))
        assert not any(k.startswith("lm_head") for k in saved) and "adapter.up.weight" in saved
    for k, v in model.state_dict().items():  # the model's own weights are untouched
        assert torch.equal(v, start[k]), k


def test_frequent_rows_projection_trains_only_its_rows_and_loads_as_a_full_projection(corpus, tmp_path, tiny):
    model, tok = tiny
    common = [f"data.files=[{corpus}]", "trainer.max_steps=3", "head.projection=frequent", "head.train_vocab=8"]
    train(_cfg("head.layers=[1,3]", *common), run_dir=tmp_path / "both")
    train(_cfg("head.layers=[3]", *common), run_dir=tmp_path / "three")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "both" / "heads" / "layer3" / "model.safetensors"))
    assert set(saved) == {"norm.weight", "rows", "row_weight"} and saved["row_weight"].shape == (8, model.config.hidden_size)
    assert json.loads((tmp_path / "both" / "heads" / "layer3" / "config.json").read_text())["own_rows"] == 8
    rows = saved["rows"]
    heads = load_heads(tmp_path / "both" / "heads", model)
    for d, head in heads.items():
        # decoding sees an ordinary projection: the model's rows everywhere but the trained frequent ones
        assert head.projection == "own" and head.stored_as == "frequent" and head.lm_head is not model.lm_head
        changed = (head.lm_head.weight != model.lm_head.weight).any(-1)
        assert changed[rows].any() and not changed[~torch.isin(torch.arange(len(changed)), rows)].any()
    # several heads from one forward equal one head alone (as for the other projections)
    alone = load_heads(tmp_path / "three" / "heads", model)[3]
    torch.testing.assert_close(heads[3].lm_head.weight, alone.lm_head.weight, rtol=1e-5, atol=1e-6)
    with pytest.raises(PPDError, match="head.train_vocab to a positive number"):
        train(_cfg("head.layers=[1]", f"data.files=[{corpus}]", "head.projection=frequent", "head.train_vocab=0"),
              run_dir=tmp_path / "bad")


def test_frequent_rows_head_logits_equal_the_full_projection_it_stands_for(tiny):
    from ppd_decode.models.heads import EarlyExitHead

    model, _ = tiny
    rows = torch.tensor([3, 7, 40, 100])
    head = EarlyExitHead.from_model(model, 2, projection="frequent", rows=rows)
    with torch.no_grad():
        head.row_weight.add_(torch.randn_like(head.row_weight))
    h = torch.randn(5, model.config.hidden_size)
    cands = torch.tensor([1, 3, 7, 9, 40, 100, 200])
    full = head(h)
    torch.testing.assert_close(head.candidate_logits(h, cands), full[:, cands])
    head.candidate_logits(h, cands).sum().backward()
    assert head.row_weight.grad is not None and model.lm_head.weight.grad is None
    with pytest.raises(HeadMismatchError, match="misses some of this head's own rows"):
        head.candidate_logits(h, torch.tensor([1, 3, 7, 9]))
    with torch.no_grad():
        torch.testing.assert_close(head.materialize()(h), full)
    with pytest.raises(HeadMismatchError, match="sorted, distinct"):
        EarlyExitHead.from_model(model, 2, projection="frequent", rows=torch.tensor([7, 3]))


@pytest.mark.parametrize("objective, kind", [("ce", "kl"), ("distill", "argmax"), ("distill", "kl")])
def test_frequent_rows_bank_shares_products_without_changing_loss_or_gradients(tiny, objective, kind):
    from ppd_decode.models.heads import EarlyExitHead
    from ppd_train.trainer import HeadBank

    model, _ = tiny
    torch.manual_seed(0)
    ids = torch.randint(4, 260, (2, 12))
    frequent = frequent_tokens(ids, 6, model.config.vocab_size)
    hidden, teacher = FrozenBackbone(model, [1, 3])(ids, final_logits=True)

    def fresh():
        heads = {d: EarlyExitHead.from_model(model, d, projection="frequent", rows=frequent) for d in (1, 3)}
        for h in heads.values():
            with torch.no_grad():
                h.row_weight.add_(0.1 * torch.randn_like(h.row_weight, generator=torch.Generator().manual_seed(h.layer)))
        return heads

    bank = HeadBank(fresh(), objective, kind, 1.0, frequent)
    assert bank.frequent_rows
    total, per_head = bank(hidden, ids, teacher)
    total.backward()
    heads = fresh()  # the per-head path: each head's candidate rows in sorted order
    t = targets(ids, teacher, objective, kind)
    cands = candidate_set(frequent, t if t is not None else teacher.argmax(-1))
    for d, h in heads.items():
        ref = candidate_loss(h.candidate_logits(hidden[d], cands), ids, teacher, cands, objective, kind)
        torch.testing.assert_close(per_head[d], ref)
        ref.backward()
        torch.testing.assert_close(bank.heads[str(d)].row_weight.grad, h.row_weight.grad)
        torch.testing.assert_close(bank.heads[str(d)].norm.weight.grad, h.norm.weight.grad)


def test_export_round_trip_and_metadata(corpus, tmp_path):
    train(_cfg("head.layers=[2]", f"data.files=[{corpus}]", "trainer.max_steps=2", "head.objective=ce"),
          run_dir=tmp_path)
    cfg = json.loads((tmp_path / "heads" / "layer2" / "config.json").read_text())
    assert (cfg["layer"], cfg["objective"], cfg["num_hidden_layers"]) == (2, "ce", 4)
    assert "val_top1_agree" in cfg["metrics"] and str(corpus) in cfg["data"]
    model, _ = load_model("tiny-random")
    assert list(load_heads(tmp_path / "heads", model)) == [2]
    with pytest.raises(HeadMismatchError, match="num_hidden_layers"):
        load_heads(tmp_path / "heads", load_model("tiny-random:layers=3")[0])
    with pytest.raises(HeadMismatchError, match="vocab_size"):
        load_heads(tmp_path / "heads", load_model("tiny-random:vocab=280")[0])


@pytest.mark.parametrize("override, error, words", [
    ("head.layers=[4]", HeadMismatchError, r"choose d in 1\.\.3"),
    ("head.layers=[0]", HeadMismatchError, "not an intermediate layer"),
    ("head.layers=[]", PPDError, "head.layers is empty"),
    ("head.objective=mse", PPDError, "unknown objective"),
    ("head.distill_kind=js", PPDError, "unknown distill kind"),
    ("head.projection=lowrank", PPDError, "unknown head.projection"),
    ("trainer.seq_len=4096", PPDError, "exceeds the model's context of 512"),
    ("trainer.deepspeed=zero9", PPDError, "no DeepSpeed config"),
])
def test_bad_input_is_refused_before_training(corpus, tmp_path, override, error, words):
    layers = [] if override.startswith("head.layers") else ["head.layers=[1]"]
    with pytest.raises(error, match=words):
        train(_cfg(override, *layers, f"data.files=[{corpus}]", "trainer.max_steps=1"), run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_empty_and_too_small_data(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaskDataError):
        train(_cfg(f"data.files=[{empty}]", "head.layers=[1]"), run_dir=tmp_path / "a")
    tiny_corpus = _write_corpus(tmp_path / "small.jsonl", n=3)
    with pytest.raises(PPDError, match="block|global batch"):
        train(_cfg(f"data.files=[{tiny_corpus}]", "head.layers=[1]", "trainer.seq_len=256"), run_dir=tmp_path / "b")


def _fresh_env() -> dict:
    """A fresh launch's environment: without the rendezvous variables the in-process tests above left behind."""
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "PYTHONPATH": str(REPO)}


def _run_cli(run_dir: Path, corpus: Path, *extra):
    cmd = [sys.executable, "-m", "ppd_train", *TINY, "head.layers=[1,3]", f"data.files=[{corpus}]",
           "trainer.max_steps=8", f"output_dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=_fresh_env(), capture_output=True, text=True, timeout=300)


def test_sigkilled_run_resumes_and_ends_like_an_uninterrupted_one(corpus, tmp_path):
    straight = _run_cli(tmp_path / "straight", corpus)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _run_cli(tmp_path / "killed", corpus, "trainer.debug_kill_at_step=5")
    assert killed.returncode == -9  # SIGKILL after step 5; the last checkpoint is step 4
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step4"
    assert not (tmp_path / "killed" / "heads").exists()
    resumed = _run_cli(tmp_path / "killed", corpus)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 4/8" in resumed.stdout
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())["final"]
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())["final"]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("kind", [["head.projection=frequent", "head.reads_prev=true"],
                                  ["head.projection=shared", "head.adapter_rank=4"],
                                  ["head.projection=own", "head.train_vocab=0"]])
def test_bf16_zero2_trains_every_head_kind_and_leaves_the_model_alone(corpus, tmp_path, kind):
    """DeepSpeed's bf16 engine casts what it trains; the model's own LM head, which frequent-rows and shared heads
    read, stays out of it (the model keeps its dtype and weights), and the optimizer needs no compiled kernels."""
    out = train(_cfg("head.layers=[2]", f"data.files=[{corpus}]", "trainer.max_steps=3", "trainer.deepspeed=zero2_bf16",
                     *kind), run_dir=tmp_path / "r")
    assert 0 <= out["final"]["val/top1_agree/layer2"] <= 1  # the teacher's fp32 forwards ran after the cast
    saved = json.loads((tmp_path / "r" / "heads" / "layer2" / "config.json").read_text())
    if "head.projection=own" not in kind:  # the model's projection, read in training, kept the model's dtype
        assert saved["dtype"] == "float32"
    ds = json.loads((CONFIGS / "deepspeed" / "zero2_bf16.json").read_text())
    assert ds["optimizer"]["params"]["torch_adam"] is True  # portable: no FusedAdam build, no nvcc


def test_resuming_with_another_layout_stops_with_the_fix(corpus, tmp_path):
    from ppd_train.trainer import _check_layout

    common = ["head.layers=[1]", f"data.files=[{corpus}]"]
    train(_cfg(*common, "trainer.max_steps=2"), run_dir=tmp_path / "r")
    with pytest.raises(PPDError, match=r"micro_batch 2 there, 1 here.*Fix: relaunch with NPROC=1"):
        train(_cfg(*common, "trainer.max_steps=4", "trainer.micro_batch=1"), run_dir=tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "checkpoints" / "layout.json").read_text())
    assert {k: saved[k] for k in ("world_size", "micro_batch", "grad_accum")} == \
        {"world_size": 1, "micro_batch": 2, "grad_accum": 1}
    with pytest.raises(PPDError, match=r"world_size 1 there, 8 here.*NPROC=1"):
        _check_layout(tmp_path / "r" / "checkpoints", {**saved, "world_size": 8}, tmp_path / "r")
    _check_layout(tmp_path / "r" / "checkpoints", saved, tmp_path / "r")  # the same layout resumes
    # heads of another shape under the same run name (train_vocab is not in it; the tiny vocabulary has 300 tokens)
    # stop before DeepSpeed reads anything
    with pytest.raises(PPDError, match=r"other heads \(layer 1: own_rows 300 there, 64 here\).*run_name=<new name>"):
        train(_cfg(*common, "trainer.max_steps=4", "head.train_vocab=64"), run_dir=tmp_path / "r")


def test_checkpoints_by_the_clock_as_well_as_by_steps(corpus, tmp_path):
    common = ["head.layers=[1]", f"data.files=[{corpus}]", "trainer.max_steps=3", "trainer.save_every=1000"]
    train(_cfg(*common), run_dir=tmp_path / "steps")
    assert sorted(p.name for p in (tmp_path / "steps" / "checkpoints").glob("step*")) == ["step3"]  # the last only
    train(_cfg(*common, "trainer.save_every_minutes=1e-6"), run_dir=tmp_path / "clock")  # due after every step
    assert sorted(p.name for p in (tmp_path / "clock" / "checkpoints").glob("step*")) == ["step2", "step3"]


def test_paper_experiment_config_composes_to_the_papers_recipe():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=paper_llama2_13b"])
    t = cfg.trainer
    assert cfg.model.spec == "meta-llama/Llama-2-13b-hf" and list(cfg.head.layers) == [15, 20, 30, 35, 37]
    assert (cfg.head.objective, cfg.head.projection, cfg.head.adapter_rank, cfg.head.train_vocab) == ("ce", "own", 0, 0)
    assert (t.lr, t.epochs, t.seq_len, t.weight_decay, t.warmup_ratio) == (2e-5, 3, 2048, 0.0, 0.04)
    assert t.micro_batch * t.grad_accum * 8 == 128
    assert t.save_every <= 20 and t.save_every_minutes  # a run of a few dozen steps saves along the way
    ds = json.loads((CONFIGS / "deepspeed" / f"{t.deepspeed}.json").read_text())
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["type"] == "AdamW"


def test_multirun_sweep_gives_each_job_its_own_run(corpus, tmp_path):
    cmd = [sys.executable, "-m", "ppd_train", "-m", *TINY, "head.layers=[1]", f"data.files=[{corpus}]",
           "trainer.max_steps=1", "head.objective=ce,distill", f"hydra.sweep.dir={tmp_path}"]
    r = subprocess.run(cmd, cwd=REPO, env=_fresh_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # The sweep's jobs run in the sweep directory (output_dir follows hydra's job dir only for single runs).
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["tiny-random-L1-ce", "tiny-random-L1-distill-argmax"], names
