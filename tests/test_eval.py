"""The match-rate report end to end on a tiny model: files, baselines beside trained heads, latency model, skips."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ppd_decode import PPDError, load_model
from ppd_decode.evaluation.metrics import load_metric
from ppd_decode.evaluation.report import run
from ppd_decode.models.heads import EarlyExitHead, save_heads
from ppd_train.trainer import CONFIGS

SMALL = ["model=tiny-random", "n=2", "max_new_tokens=6", "timing.repeats=2", "timing.context=16", "ks=[1,2,5]",
         "wandb.mode=disabled", "tasks.squad.max_prompt_tokens=300", "tasks.cnn_dailymail.max_prompt_tokens=300",
         "lens_layers=[1]"]


def _cfg(*extra):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=[*SMALL, *extra])


def test_report_with_trained_heads_and_lens(tmp_path, shared_data):
    model, _ = load_model("tiny-random")
    head = EarlyExitHead.from_model(model, 2)
    with torch.no_grad():
        head.lm_head.weight.add_(0.01)
    save_heads(tmp_path / "run" / "heads", {2: head}, model, meta={"objective": "distill", "distill_kind": "kl"})
    report = run(_cfg(f"heads=[{tmp_path / 'run' / 'heads'}]"), tmp_path / "out")
    for f in ("match_rate.json", "match_rate.csv", "match_rate.md", "match_rate_vs_layer.png",
              "speedup_vs_compute.png"):
        assert (tmp_path / "out" / f).is_file(), f
    squad = report["tasks"]["squad"]
    labels = {(r["head"], r["layer"]) for r in squad["rates"]}
    assert labels == {("lens", 1), ("lens", 2), ("distill-kl", 2)}
    for r in squad["rates"]:
        assert 0 <= r["p@1"] <= r["p@2"] <= r["p@5"] <= 1
        assert r["ranking"] == "full" and r["full@1"] == r["p@1"]  # no shortlist: the two rankings are one
        assert r["among_rows"] == 1.0  # ... and every greedy token can be guessed
    assert "| among its rows |" in (tmp_path / "out" / "match_rate.md").read_text()
    assert squad["measure"] == "capture" and squad["heads_scored"] == 3
    assert squad["measure_cost_vs_generation"] > 0 and squad["seconds_plain_generation"] > 0
    # the trained head alone is charged less than it plus the two lens baselines scored beside it
    assert 0 < squad["measure_cost_trained_vs_generation"] < squad["measure_cost_vs_generation"]
    assert "Measuring the 1 trained head cost" in (tmp_path / "out" / "match_rate.md").read_text()
    assert {"exact_match", "f1"} <= set(squad["task_scores"])
    assert "bleu" in report["tasks"]["wmt15"]["task_scores"]
    assert "rouge1" in report["tasks"]["cnn_dailymail"]["task_scores"]
    preds = report["theory"]["predictions"]
    assert len(preds) == 3 * 3 * 3  # tasks x heads x k
    assert all(p["pipelined_sim_vs_closed"] == pytest.approx(1.0, rel=0.02) for p in preds)
    assert set(report["theory"]["best"]) == {"squad", "wmt15", "cnn_dailymail"}
    saved = json.loads((tmp_path / "out" / "match_rate.json").read_text())
    assert saved["tasks"]["squad"]["rates"] == squad["rates"]
    tm = report["time"]  # the wall time, and the work that data-parallel processes would divide
    assert tm["processes"] == 1 and tm["prompts"] == 6 and not tm["resumed"]
    work = sum(t["process_seconds"] for t in report["tasks"].values())
    assert tm["process_seconds"] == pytest.approx(work) and 0 < work < tm["wall_seconds"]
    assert tm["divisible_seconds_on"]["8"] == pytest.approx(work / 8)
    assert tm["other_seconds"] == pytest.approx(tm["wall_seconds"] - work)
    assert "## Time" in (tmp_path / "out" / "match_rate.md").read_text()
    pv = report["provenance"]  # what a published table must say
    assert pv["command"].startswith("python -m ppd_decode.evaluation") and pv["date"] and pv["commit"]
    assert pv["machine"]["cpu"] and f"commit {pv['commit']}" in (tmp_path / "out" / "match_rate.md").read_text()


def test_report_scores_a_head_that_reads_f_prev_with_and_without_it(tmp_path, shared_data):
    from prev_heads import prev_head

    model, _ = load_model("tiny-random")
    save_heads(tmp_path / "run" / "heads", {2: prev_head(model, 2, 0, mix=1.0)}, model,
               meta={"objective": "distill", "distill_kind": "argmax"})
    report = run(_cfg(f"heads=[{tmp_path / 'run' / 'heads'}]", "timing.enabled=false", "cost_baseline=false"),
                 tmp_path / "out")
    rates = {(r["head"], r["layer"]): r for r in report["tasks"]["squad"]["rates"]}
    mine = rates[("distill-argmax+f_prev", 2)]
    assert 0 <= mine["noprev@1"] <= 1 and "noprev@1" not in rates[("lens", 2)]
    assert "p@1 without f(t-1)" in (tmp_path / "out" / "match_rate.md").read_text()


def test_teacher_forced_measurement_gives_the_same_rates(tmp_path, shared_data):
    a = run(_cfg("timing.enabled=false", "model.dtype=float64"), tmp_path / "a")
    b = run(_cfg("timing.enabled=false", "model.dtype=float64", "measure=teacher_forced", "cost_baseline=false"),
            tmp_path / "b")
    for name in a["tasks"]:
        assert a["tasks"][name]["rates"] == b["tasks"][name]["rates"]
    assert b["tasks"]["squad"]["teacher_forced_disagreements"] == 0


def test_block_heads_are_scored_teacher_forced_and_refused_for_capture(tmp_path, shared_data):
    model, _ = load_model("tiny-random")
    save_heads(tmp_path / "run" / "heads", {2: EarlyExitHead.from_model(model, 2, block=True)}, model,
               meta={"objective": "distill", "distill_kind": "argmax"})
    heads = f"heads=[{tmp_path / 'run' / 'heads'}]"
    report = run(_cfg(heads, "timing.enabled=false", "cost_baseline=false", "measure=teacher_forced"), tmp_path / "a")
    assert any(r["head"] != "lens" for r in report["tasks"]["squad"]["rates"])
    with pytest.raises(PPDError, match="measure=teacher_forced"):
        run(_cfg(heads, "timing.enabled=false", "cost_baseline=false"), tmp_path / "b")


def test_missing_data_is_a_reported_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("PPD_DATA", str(tmp_path / "nothing"))
    report = run(_cfg("source=local", "timing.enabled=false"), tmp_path / "out")
    assert all("does not exist" in t["skipped"] for t in report["tasks"].values())
    assert "skipped" in (tmp_path / "out" / "match_rate.md").read_text()


def test_match_rate_metric_module():
    m = load_metric("match_rate")
    r = m.compute(predictions=[[3, 1, 2], [0, 4, 2], [9, 8, 7]], references=[3, 2, 1], k=[1, 3])
    assert r == {"p@1": 1 / 3, "p@3": 2 / 3, "positions": 3}
    with pytest.raises(ValueError, match="fewer than k=3"):
        m.compute(predictions=[[1]], references=[1], k=[3])


def test_task_metric_modules():
    assert load_metric("squad_v1").compute(predictions=["The Broncos!"], references=[["Denver Broncos", "Broncos"]]) \
        == {"exact_match": 100.0, "f1": 100.0}
    assert load_metric("sacrebleu_bleu").compute(predictions=["a b c d"], references=["a b c d"])["bleu"] \
        == pytest.approx(100)
    assert load_metric("rouge_scores").compute(predictions=["x y"], references=["p q"])["rouge1"] == 0


def test_timed_generation_takes_turns_and_reassembles_every_prompt():
    """The cost timing decodes batch by batch beside the plain generation; the continuations and captured states
    must come back in prompt order, equal to one whole capture run over all prompts."""
    from ppd_decode.evaluation.match_rate import greedy_continuations
    from ppd_decode.evaluation.report import timed_generation

    model, _ = load_model("tiny-random", dtype="float64")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2, 12, 21)]
    want, want_states = greedy_continuations(model, prompts, 7, batch_size=3, capture_layers=[1, 2])
    conts, states, sec, plain_sec = timed_generation(model, prompts, 7, 3, [1, 2])
    assert conts == want and sec > 0 and plain_sec > 0
    for s, w in zip(states, want_states):
        assert s.keys() == w.keys() and all(torch.equal(s[d], w[d]) for d in s)
    conts, states, _, plain_sec = timed_generation(model, prompts, 7, 3, None, baseline=False)
    assert conts == want and plain_sec == 0.0 and states == [{}] * len(prompts)


def test_rows_without_references_are_counted_never_scored_as_zero():
    from types import SimpleNamespace

    from ppd_decode.evaluation.report import task_scores

    _, tok = load_model("tiny-random")
    conts = [tok("a summary", add_special_tokens=False)["input_ids"]] * 3
    empty = [SimpleNamespace(reference=r) for r in ("", "  ", None)]
    out = task_scores("cnn_dailymail", tok, empty, conts)
    assert "rouge1" not in out and out["references_missing"] == 3 and "no row has a reference" in out["unavailable"]
    some = [SimpleNamespace(reference=r) for r in ("a summary", "", "a summary")]
    out = task_scores("cnn_dailymail", tok, some, conts)
    assert out["rouge1"] == pytest.approx(100) and out["references_missing"] == 1
    squad = [SimpleNamespace(reference=r) for r in (["a summary"], [], [""])]
    assert task_scores("squad", tok, squad, conts)["references_missing"] == 2


def _comparable(report: dict) -> dict:
    """A report without its timings (which differ from run to run)."""
    return {name: {"rates": t["rates"], "task_scores": t["task_scores"], "positions": t["positions"]}
            for name, t in report["tasks"].items()}


DP = ["timing.enabled=false", "cost_baseline=false", "batch_size=1", "model.dtype=float64"]


def _eval_rank(rank: int, world: int, port: int, out: str, data: str):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      PPD_DATA=data)
    run(_cfg(*DP), Path(out))


def test_two_ranks_give_the_one_rank_report(tmp_path, shared_data):
    import torch.multiprocessing as mp

    from ppd_train.trainer import _free_port

    one = run(_cfg(*DP), tmp_path / "one")
    mp.spawn(_eval_rank, args=(2, _free_port(), str(tmp_path / "two"), str(shared_data)), nprocs=2)
    two = json.loads((tmp_path / "two" / "match_rate.json").read_text())
    assert _comparable(two) == json.loads(json.dumps(_comparable(one)))


def test_an_interrupted_evaluation_resumes_to_the_same_report(tmp_path, shared_data):
    whole = run(_cfg(*DP), tmp_path / "whole")
    with pytest.raises(RuntimeError, match="debug_stop_after_batches"):
        run(_cfg(*DP, "debug_stop_after_batches=1"), tmp_path / "cut")
    assert [f.name for f in (tmp_path / "cut" / "partial" / "squad.rank0").glob("batch*.pt")] == ["batch000000.pt"]
    with pytest.raises(PPDError, match="other settings"):
        run(_cfg(*DP, "max_new_tokens=5"), tmp_path / "cut")  # another evaluation cannot take it over
    resumed = run(_cfg(*DP), tmp_path / "cut")
    assert _comparable(resumed) == _comparable(whole)
    # the resumed run's work counts the batches timed before the stop; its wall time covers only its own part
    assert resumed["time"]["resumed"] and "other_seconds" not in resumed["time"]
    assert resumed["time"]["prompts"] == whole["time"]["prompts"]
    assert "the last part of a resumed run" in (tmp_path / "cut" / "match_rate.md").read_text()
    assert not (tmp_path / "cut" / "partial").exists()  # the finished report replaces the partial ones


def test_the_share_of_greedy_tokens_a_shortlist_head_can_guess_is_reported():
    from ppd_decode.evaluation.match_rate import HeadScore
    from ppd_decode.evaluation.report import _among_rows

    model, _ = load_model("tiny-random")
    head = EarlyExitHead.from_model(model, 2, projection="frequent", rows=torch.arange(0, 100, 2)).materialize()
    heads, sc = {("h", 2): head, ("lens", 2): EarlyExitHead.from_model(model, 2)}, HeadScore("h", 2)
    targets = torch.tensor([0, 2, 3, 4, 5, 7, 8, 98])  # 5 of 8 among the rows 0, 2, ..., 98
    assert _among_rows(heads, sc, targets) == 5 / 8
    assert _among_rows(heads, HeadScore("lens", 2), targets) == 1.0


def test_a_published_report_takes_its_name(tmp_path, monkeypatch):
    import ppd_decode.evaluation.report as rep

    monkeypatch.setattr(rep, "REPO", tmp_path)
    report = {"model": "m", "n": 1, "max_new_tokens": 1, "ks": [1], "tasks": {}, "theory": {}}
    rep.write_report(report, tmp_path / "out", _cfg("publish=true", "name=match_rate_full"))
    assert sorted(p.name for p in (tmp_path / "docs" / "benchmarks").iterdir()) == [
        "match_rate_full.csv", "match_rate_full.json", "match_rate_full.md"]
