"""The decode benchmark end to end on a tiny model: rows from the registry, the oracle curve, the artifacts."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_decode_benchmark_with_oracle_rows(tmp_path, shared_data):
    cmd = [sys.executable, "scripts/bench_decode.py", "--model", "tiny-random", "--heads", "lens", "--layers", "2",
           "--rows", "", "--oracle", "0,1", "--sets", "squad", "--per-set", "1",
           "--max-new-tokens", "10", "--max-prompt-tokens", "200", "--runs", "1", "--warmup", "0",
           "--name", "oracle_test", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "oracle_test.json").read_text())
    rows = {m["row"]: m for m in out["methods"]}
    assert set(rows) == {"greedy", "greedy_2t", "stack_greedy", "greedy_packed", "ppd_oracle_0", "ppd_oracle_100"}
    assert all(m["mismatches"] == 0 for m in rows.values())
    assert rows["ppd_oracle_100"]["match_rate"] == 1.0 and rows["ppd_oracle_0"]["match_rate"] == 0.0
    assert all(rows[r]["predicted_speedup"] > 0 for r in ("ppd_oracle_0", "ppd_oracle_100"))  # the model's account
    for r in ("ppd_oracle_0", "ppd_oracle_100"):  # the model fed with the stages' in-pipeline times, beside it
        ins = rows[r]["latency_model"]["inside"]
        assert ins["predicted_ms_per_token"] > 0 and ins["decoding_ms_per_token"] > 0
    md = (tmp_path / "oracle_test.md").read_text()
    assert "measured against the latency model, over p" in md and "predicted from in-pipeline times" in md
    assert (tmp_path / "oracle_test_oracle.png").is_file()


def test_the_in_pipeline_prediction_is_the_latency_model_on_the_measured_block_times():
    from ppd_decode.strategies.ppd.report import inside_prediction

    bd = {"in_pipeline_ms": {"guess_block": 40.0, "miss_rerun": 30.0, "b_step": 50.0}, "decoding_ms_per_token": 70.0}
    ins = inside_prediction(bd, 0.1, 0.5, None)  # max(B's block, A's guess block) + a miss's re-run for half the tokens
    assert abs(ins["predicted_ms_per_token"] - (50.0 + 0.5 * 30.0)) < 1e-9
    assert abs(ins["structure_efficiency"] - 65.0 / 70.0) < 1e-9
    chained = inside_prediction(bd, 0.1, 1.0, {"tokens_per_block": 2.0})  # a block decides two tokens on average
    assert abs(chained["predicted_ms_per_token"] - 25.0) < 1e-9
    skipped = dict(bd, in_pipeline_ms=dict(bd["in_pipeline_ms"], guess_block=None))  # the split without guessing
    assert abs(inside_prediction(skipped, 0.1, 0.0, None)["predicted_ms_per_token"] - 80.0) < 1e-9


def test_oracle_rows_carry_the_ppd_rows_settings():
    import types

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import bench_decode

    from ppd_decode.strategies.configs import rows

    a = types.SimpleNamespace(oracle="0,0.5", overrides=["decode.ppd.k=2", "++decode.ppd.chain=3",
                                                          "decode.ppd_paper.k=7"])
    names, overrides = bench_decode.oracle_rows(a)
    built = {r.name: r.config for r in rows(names, overrides + a.overrides)}
    assert {n: (c.k, c.chain, c.oracle_p) for n, c in built.items()} == {
        "ppd_oracle_0": (2, 3, 0.0), "ppd_oracle_50": (2, 3, 0.5)}


def test_batching_benchmark_end_to_end_says_what_produced_it(tmp_path, shared_data):
    cmd = [sys.executable, "scripts/bench_batching.py", "--model", "tiny-random", "--heads", "lens", "--layer", "2",
           "--prune-layer", "3", "--trees", "static", "--batch-sizes", "1,2", "--gammas", "1", "--min-prompts", "2",
           "--sets", "squad", "--max-new-tokens", "6", "--max-prompt-tokens", "200", "--runs", "1",
           "--name", "batching_test", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "batching_test.json").read_text())
    assert out["command"].startswith("python scripts/bench_batching.py --model tiny-random")
    assert out["date"] and out["commit"] and out["machine"]["device"] == "cpu"
    rows = {(x["batch_size"], x["method"]) for x in out["results"]}
    assert {(1, "batched_greedy"), (2, "batched_greedy"), (1, "tree_static"), (2, "self_speculative")} <= rows
    assert all(x["mismatches"] == 0 for x in out["results"])
    md = (tmp_path / "batching_test.md").read_text()
    assert md.startswith(f"`{out['command']}`") and f"commit {out['commit']}" in md


def test_guess_sources_feeds_f_prev_and_bounds_a_text_aware_ranking(tmp_path, shared_data):
    from prev_heads import prev_head

    from ppd_decode.models.heads import save_heads
    from ppd_decode.models.loading import load_model

    model, _ = load_model("tiny-random")
    save_heads(tmp_path / "heads", {2: prev_head(model, 2, 0, mix=1.0)}, model, meta={"objective": "distill"})
    cmd = [sys.executable, "scripts/guess_sources.py", "--model", "tiny-random", "--heads", str(tmp_path / "heads"),
           "--layers", "2", "--sets", "squad", "--per-set", "3", "--max-new-tokens", "12", "--max-prompt-tokens", "200", "--k", "3",
           "--name", "sources_test", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "sources_test.json").read_text())
    assert out["command"].startswith("python scripts/guess_sources.py") and out["commit"] and out["date"]
    assert out["inputs"]["2"] == ["h_d", "f_prev"]
    rates = out["sets"]["squad"]["rates"]["2"]
    assert out["sets"]["squad"]["positions"] > 0
    either, first = rates["lookup or shortlist top-1"], rates["lookup first, top-1"]
    sure = max(rates[f"head first if >= {c}, top-1"] for c in (0.5, 0.7, 0.9))
    # either source's first guess bounds any ordering of the two, PPD's lookup-first order included
    assert max(rates["lookup"], rates["shortlist top-1"], first, sure) <= either <= rates["lookup + shortlist top-2"]
    assert rates["shortlist top-1"] <= rates["shortlist top-3"]
    md = (tmp_path / "sources_test.md").read_text()
    assert "lookup or shortlist top-1" in md and f"commit {out['commit']}" in md
