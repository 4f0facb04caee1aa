#!/usr/bin/env python
"""Every registered decoding method side by side, measured the Spec-Bench way (docs/benchmarking.md).

    python scripts/bench_decode.py --heads outputs/train/<run>/heads            # the full measurement
    python scripts/bench_decode.py --heads ... --per-set 5 --max-new-tokens 64 --runs 1   # a quick one

Greedy, batch size 1. Warm-up first, then only the generation call is timed. Per-prompt speed = new tokens / wall
time; a method's tokens/s = mean over prompts. Methods take turns prompt by prompt (interleaved), so a drift of the
machine's speed is shared by all of them; the whole measurement is repeated (--runs) and reported as mean and
standard deviation over runs; speedups are against greedy measured in the same run with 1 and with 2 threads.
Every output is compared token for token with greedy; a mismatch is reported with the reference's top-two logit
gap at the first differing position (a near-tie when below 1e-4). Writes <name>.{json,md,png}
under outputs/bench/<name>/ (name: decode by default); ``--publish`` copies them to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir

REPO = Path(__file__).resolve().parents[1]
NEAR_TIE = 1e-4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_stage_times(samples: list):
    """The median of each stage timing over samples taken between prompts (``theory.StageTimes``), the timings
    beside the other stage's work (``.beside``) too."""
    med = statistics.median
    first = samples[0]
    return dataclasses.replace(first, t1={k: med(x.t1[k] for x in samples) for k in first.t1},
                               t2_rows={r: med(x.t2_rows[r] for x in samples) for r in first.t2_rows or {}} or None,
                               beside=median_stage_times([x.beside for x in samples]) if first.beside else None,
                               **{f: med(getattr(x, f) for x in samples) for f in ("t1_miss", "t2", "greedy", "head",
                                                                                    "layer")})


def ppd_prediction(st, cfg, r: dict, p: float) -> tuple[dict, dict | None]:
    """The latency model's prediction for a PPD row from stage timings ``st``, the observed match rate ``p`` and,
    with text chains, the chains the engine reported; and the chain mix it used."""
    from ppd_decode.profiling.latency import chained_block_times, side_by_side_block_time, stage_pipelined

    k = cfg.k
    chains = None
    if cfg.chain:  # (the engine keeps a chain only where it guesses from the text)
        blocks = r["tokens"] - r["chain_accepted"]
        t1k_chain, t2_chain = chained_block_times(st, k, cfg.min_block, r.get("block_pairs", {}))
        chains = {"b_share": r["chains_sent"] / blocks, "a_share": r["chain_blocks"] / max(1, r["guess_blocks"]),
                  "t2_chain": t2_chain, "t1k_chain": t1k_chain, "tokens_per_block": r["tokens"] / blocks}
        # the earlier form, max(mean B block, mean A block), kept beside it for comparison
        means_only = stage_pipelined(p, st.t1[k], st.t1_miss, st.t2, st.greedy, chains)
        chains["block_max"] = side_by_side_block_time(st, k, cfg.min_block, r.get("block_pairs", {}))
        chains["predicted_speedup_max_of_means"] = means_only["speedup"]
    spec = cfg.speculate
    return stage_pipelined(p if spec else 0.0, st.t1[k] if spec else 0.0, st.t1_miss, st.t2, st.greedy, chains), chains


def where_the_time_went(r: dict, spec: bool) -> dict:
    """A PPD row's worker times (summed part by part over the first run's prompts) per generated token, and the
    in-pipeline cost of each kind of work next to the same work timed alone (the latency model's inputs)."""
    a, b, n = r["a_time_s"], r["b_time_s"], r["tokens"]
    decoded = n - r["prompts"]  # tokens after each prompt's first: the decoding phase
    blocks = decoded - r.get("chain_accepted", 0)  # B's blocks (with text chains, one decides several tokens)
    misses = (r["drafted"] - r["accepted"]) if spec else decoded
    per_token = lambda parts: {k: 1e3 * v / n for k, v in parts.items()}  # noqa: E731
    return {"a_ms_per_token": per_token(a), "b_ms_per_token": per_token(b),
            "decoding_ms_per_token": 1e3 * (r["wall_s"] - max(a["prefill"], b["prefill"])) / max(1, decoded),
            "prefill_ms_per_token": 1e3 * max(a["prefill"], b["prefill"]) / n,
            "in_pipeline_ms": {"guess_block": 1e3 * a["guess_block"] / max(1, blocks) if spec else None,
                               "miss_rerun": 1e3 * a["miss_rerun"] / max(1, misses),
                               "b_step": 1e3 * (b["layers"] + b["final_head"]) / max(1, blocks)},
            "misses": misses, "decoded": decoded}


def breakdown_lines(lm: dict) -> list[str]:
    bd = lm["breakdown"]
    a, b, ip = bd["a_ms_per_token"], bd["b_ms_per_token"], bd["in_pipeline_ms"]
    lines = ["", f"Where a token's {lm['wall_ms_per_token']:.1f} ms went (ms per generated token; prefill: until each "
             f"prompt's first token; the latency model predicts {lm['predicted_ms_per_token']:.1f} ms per token of "
             f"the decoding phase, which took {bd['decoding_ms_per_token']:.1f}):", "",
             "| worker | " + " | ".join(a) + " |", "|---|" + "---|" * len(a),
             "| A | " + " | ".join(f"{v:.1f}" for v in a.values()) + " |", "",
             "| worker | " + " | ".join(b) + " |", "|---|" + "---|" * len(b),
             "| B | " + " | ".join(f"{v:.1f}" for v in b.values()) + " |", ""]
    ch = lm.get("chains")
    # alone: the latency model's per-block times (with chains: plain and chained blocks mixed by their shares)
    a_alone, b_alone = lm["t1_k_ms"], lm["t2_ms"]
    a_how, b_how = f"T1(k) {a_alone:.1f}", f"T2 {b_alone:.1f}"
    if ch:
        a_how = f"{ch['t1k_block_ms']:.1f}: T1(k) {a_alone:.1f} and chained {ch['t1k_chain_ms']:.1f} in {ch['a_share']:.0%} of blocks"
        b_how = f"{ch['t2_block_ms']:.1f}: T2 {b_alone:.1f} and chained {ch['t2_chain_ms']:.1f} in {ch['b_share']:.0%} of blocks"
        if "block_max_ms" in ch:
            b_how += (f"; block by block the longer of B's and A's beside it takes {ch['block_max_ms']:.1f} ms alone, "
                      f"what the model uses")
    gb = f"A's guess block {ip['guess_block']:.1f} ms (alone: {a_how}), " if ip["guess_block"] else ""
    lines.append(f"The same work inside the pipeline and alone: {gb}a missed token's re-run {ip['miss_rerun']:.1f} ms "
                 f"(alone: T1(1) {lm['t1_1_ms']:.1f}, {bd['misses']} misses), B's block {ip['b_step']:.1f} ms (alone: "
                 f"{b_how}).")
    bs = lm["beside"]
    if not bs["side_by_side"]:
        return lines
    a_b, b_b = bs.get("t1k_block_ms", bs["t1_k_ms"]), bs.get("t2_block_ms", bs["t2_ms"])
    lines.append(f"Timed beside the other stage's work (the other core busy, as in the pipeline): A's guess block "
                 f"{a_b:.1f} ms, B's block {b_b:.1f} ms"
                 + (f", the longer of the two block by block {bs['block_max_ms']:.1f} ms" if "block_max_ms" in bs else "")
                 + f"; with these the model predicts {bs['predicted_ms_per_token']:.1f} ms per token of the decoding "
                   f"phase ({bs['predicted_speedup_vs_greedy_1t']:.2f}x greedy).")
    return lines


def method_rows(args, head_layers: list[int]) -> list[dict]:
    """(registry name, config, threads) for each row of the table."""
    # The third baseline: greedy through ppd's own stack (its layer loop and screened exact LM-head argmax, which
    # every ppd method uses), so the table separates what the stack saves from what guessing and pipelining gain.
    # The fourth: transformers' generate with the decoder matmuls packed as the stack packs them, so the table also
    # shows how much of the stack's lead generate could have by the same packing.
    baselines = [{"name": "greedy", "config": {}, "threads": 1}, {"name": "greedy", "config": {}, "threads": 2},
                 {"name": "stack_greedy", "config": {}, "threads": 1},
                 {"name": "greedy", "config": {"packed": True}, "threads": 1}]
    rows = [*baselines,
            {"name": "prompt_lookup", "config": {}, "threads": 1},
            {"name": "assistant_early_exit", "config": {"layer": args.early_exit_layer}, "threads": 1}]
    spec_layers = head_layers
    if args.self_spec_layers:
        spec_layers = [d for d in (int(x) for x in args.self_spec_layers.split(",")) if d in head_layers]
    for d in spec_layers:
        if args.self_spec_lookup in ("off", "both"):
            rows.append({"name": "self_speculative", "config": {"layer": d}, "threads": 1})
        if args.self_spec_lookup in ("only", "both"):
            rows.append({"name": "self_speculative", "config": {"layer": d, "lookup": True}, "threads": 1})
    if spec_layers:
        mid = spec_layers[len(spec_layers) // 2]
        rows.append({"name": "self_speculative", "threads": 2,
                     "config": {"layer": mid, **({"lookup": True} if args.self_spec_lookup == "only" else {})}})
        rows.append({"name": "early_exit_assisted", "config": {"layer": mid}, "threads": 1})
    for spec in filter(None, (args.ppd or "").split(",")):
        d, k, *rest = (int(x) for x in spec.split(":"))
        if d in head_layers:
            cfg = {"layer": d, "k": k, **({"lookup": rest[0]} if rest else {}),
                   **({"pin_cores": bool(rest[1])} if len(rest) > 1 else {}),
                   **({"chain": rest[2]} if len(rest) > 2 else {})}
            rows.append({"name": "ppd", "config": cfg, "threads": 1})
    if args.ppd and head_layers:
        d0 = int(args.ppd.split(",")[0].split(":")[0])
        rows.append({"name": "ppd", "config": {"layer": d0, "k": 1, "speculate": False}, "threads": 1})
    for spec in (args.lookahead or "default").split(","):
        if spec == "default":
            rows.append({"name": "lookahead", "config": {}, "threads": 1})
        else:
            w, n, g, *k = (int(x) for x in spec.split(":"))
            cfg = {"window": w, "ngram": n, "max_candidates": g, **({"key_tokens": k[0]} if k else {})}
            rows.append({"name": "lookahead", "config": cfg, "threads": 1})
    tree_presets = {"static": {}, "prune": {"prune_layer": args.prune_layer},
                    "prune_full": {"prune_layer": args.prune_layer, "prune_shortlist": 0},
                    "dynamic": {"prune_layer": args.prune_layer, "dynamic": True}}
    for preset in filter(None, (args.tree or "").split(",")):
        d = args.tree_layer or (head_layers[0] if head_layers else None)
        if d in head_layers and (preset == "static" or args.prune_layer in head_layers):
            cfg = {"layer": d, "branching": tuple(int(x) for x in args.branching.split(",")), **tree_presets[preset]}
            rows.append({"name": "tree_speculative", "config": cfg, "threads": 1})
    if args.self_spec_confidence:  # one 1-thread self-speculation row per threshold (the 2-thread row: the first)
        confs = [float(x) for x in str(args.self_spec_confidence).split(",")]
        expanded = []
        for r in rows:
            if r["name"] != "self_speculative":
                expanded.append(r)
                continue
            for c in (confs if r["threads"] == 1 else confs[:1]):
                expanded.append({**r, "config": {**r["config"], "min_confidence": c}})
        rows = expanded
    for variant in filter(None, (args.self_spec_variants or "").split(";")):
        if spec_layers:
            cfg = {"layer": spec_layers[len(spec_layers) // 2]}
            for item in filter(None, variant.split(",")):
                key, value = item.split("=")
                cfg[key.strip()] = ast.literal_eval(value.strip())
            rows.append({"name": "self_speculative", "config": cfg, "threads": 1})
    if args.methods:
        keep = set(args.methods.split(","))
        rows = baselines + [r for r in rows[len(baselines):] if r["name"] in keep]  # the baselines always run
    return rows


def plot_speedups(methods: list[dict], g1: float, g2: float, path: Path) -> None:
    """Horizontal bars: each row's speedup over greedy with 1 thread (error bar: std over runs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{m['name']} ({', '.join(f'{k}={v}' for k, v in m['config'].items())})" for m in methods]
    fig, ax = plt.subplots(figsize=(4 + 0.075 * max(map(len, labels)), 0.45 * len(methods) + 1))
    ax.barh(labels, [m["speedup_vs_greedy_1t"] for m in methods], xerr=[m["tokens_per_s_std"] / g1 for m in methods])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(g2 / g1, color="tab:red", lw=0.8, ls="--", label="greedy, 2 threads")
    ax.set_xlabel("speedup over greedy (1 thread)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def top2_gap(model, prompt: list[int], ref: list[int], pos: int) -> float:
    ids = torch.tensor([prompt + ref[:pos]], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default=None, help="a heads directory (training output); default: logit lens")
    p.add_argument("--layers", default=None, help="head layers to use for self-speculation (default: all in --heads)")
    p.add_argument("--sets", default="squad,wmt15,cnn_dailymail,mt_bench")
    p.add_argument("--per-set", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="override every task's prompt budget")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--self-spec-layers", default=None, help="self-speculation rows at these head layers (default: all); "
                                                            "the middle one also gets the 2-thread and assisted rows")
    p.add_argument("--self-spec-lookup", choices=("off", "both", "only"), default="both",
                   help="self-speculation rows drafting from the head only (off), also with drafts copied from the "
                        "text first (both), or only those (only)")
    p.add_argument("--self-spec-confidence", default=None,
                   help="self-speculation rows, one per value (comma list): stop a head draft where the head's top-1 "
                        "probability is below it (above 1: the head never drafts)")
    p.add_argument("--self-spec-variants", default=None,
                   help="more 1-thread self-speculation rows (at the middle --self-spec-layers layer), ';'-separated, "
                        "each a comma list of SelfSpeculativeConfig fields, e.g. "
                        "'lookup=True,lookup_min_match=2,lookup_tokens=7;lookup=True,lookup_candidates=2'")
    p.add_argument("--early-exit-layer", type=int, default=15)
    p.add_argument("--ppd", default=None, help="PPD settings d:k[:lookup[:pin[:chain]]],... (d must have a head; lookup: "
                                               "how many of the k guesses come from prompt lookup, default 1, 0 = the "
                                               "head's only; pin 1: each worker pinned to its own core; chain: text "
                                               "chain tokens after the lookup guess, default 6); adds the split "
                                               "without speculation at the first d")
    p.add_argument("--lookahead", default=None, help="lookahead settings W:N:G[:K],... (K: key tokens; default: its config's "
                                                     "defaults); the W/N/G sweep is one run with many of them")
    p.add_argument("--tree", default=None, help="token-tree rows: static,prune,prune_full,dynamic (ProPD's parts, one by one; "
                                               "prune_full ranks over the whole vocabulary at the pruning layer)")
    p.add_argument("--tree-layer", type=int, default=None, help="the tree's drafting layer (default: the first head)")
    p.add_argument("--prune-layer", type=int, default=None, help="the layer whose head prunes the tree")
    p.add_argument("--branching", default="2,2,1,1", help="static tree: children per node at each depth")
    p.add_argument("--methods", default=None, help="comma list of registry names to run (the baselines always run)")
    add_output_args(p, "decode")
    a = p.parse_args()

    import transformers

    from ppd_decode.data.prompts import load_prompts
    from ppd_decode.models.heads import EarlyExitHead, load_heads
    from ppd_decode.models.loading import load_model
    from ppd_decode.profiling.latency import chain_timings, measure_stage_times
    from ppd_decode.profiling.stage_load import StageLoad
    from ppd_decode.strategies import get_strategy

    model, tok = load_model(a.model)
    if a.heads:
        heads = load_heads(a.heads, model, [int(x) for x in a.layers.split(",")] if a.layers else None)
        head_kind = "trained"
    else:
        layers = [int(x) for x in (a.layers or str(a.early_exit_layer)).split(",")]
        heads = {d: EarlyExitHead.from_model(model, d) for d in layers}
        head_kind = "logit lens"
    head_layers = sorted(heads)

    prompts = {}
    for s in a.sets.split(","):
        kw = {"max_prompt_tokens": a.max_prompt_tokens} if a.max_prompt_tokens else {}
        ps, report = load_prompts(s, tok, n=a.per_set, source="local", max_new_tokens=a.max_new_tokens,
                                  context_length=model.config.max_position_embeddings, **kw)
        prompts[s] = [x.input_ids for x in ps]
        print(report)
    rows = method_rows(a, head_layers)
    for r in rows:
        cls = get_strategy(r["name"])
        r["strategy"] = cls(model, config=cls.Config(**r["config"]), heads=heads if cls.needs_heads else None)
        r.update(runs=[], mismatches=0, near_ties=0, mismatch_detail=[], accepted=0, drafted=0, steps=0, tokens=0)

    # Interleaved: every prompt is decoded by every method in turn (the order rotated from prompt to prompt), so a
    # slow drift of the machine's speed (other tenants, clocks) lands on all methods alike instead of on whichever
    # method's block it happened to hit; timing noise between runs of the same code was 10-20% with blocks.
    # PPD's stage timings are taken twice: alone, and beside the other stage's work run by this helper on the other
    # core (the two workers share the memory bus): the latency model's prediction from each. Not for the split without
    # guessing: its stages take turns.
    load = StageLoad(model)
    first = next(iter(prompts.values()))[0]
    labels = [f"{r['name']} {r['config']} t{r['threads']}" for r in rows]
    for run in range(a.runs):
        for r in rows:
            torch.set_num_threads(r["threads"])
            for _ in range(a.warmup if run == 0 else 1):
                r["strategy"].generate(first, a.max_new_tokens)
        speeds = [{s: [] for s in prompts} for _ in rows]
        turn = 0
        bar = tqdm(total=sum(map(len, prompts.values())), desc=f"run {run + 1}/{a.runs}", unit="prompt")
        for s, plist in prompts.items():
            for i, prompt in enumerate(plist):
                results = {}
                for j in [(turn + n) % len(rows) for n in range(len(rows))]:
                    r = rows[j]
                    torch.set_num_threads(r["threads"])
                    results[j] = r["strategy"].generate(prompt, a.max_new_tokens)
                turn += 1
                # PPD rows: their stage timings taken now, between prompts, so the latency model sees the machine at
                # the speed the runs saw (this shared machine's speed moves 20-40% within minutes)
                for r in rows:
                    if r["name"] == "ppd":
                        torch.set_num_threads(1)
                        cfg = r["strategy"].config
                        # with text chains (the engine keeps cfg.chain only where it guesses from the text): A's
                        # chained guess blocks and B's padded chain blocks too, at every chain length
                        chain_ks, chain_rows = chain_timings(cfg.k, cfg.chain, cfg.min_block)
                        ks = (1, cfg.k) + chain_ks
                        r.setdefault("stage_times", []).append(measure_stage_times(
                            model, heads[cfg.layer], cfg.layer, ks=ks, repeats=3,
                            context=len(prompt) + a.max_new_tokens // 2,
                            t2_rows=chain_rows, load=load if cfg.speculate else None, load_rows=cfg.k))
                ref = results[0].tokens  # rows[0] is greedy with 1 thread: the reference
                for j, r in enumerate(rows):
                    res = results[j]
                    speeds[j][s].append(len(res.tokens) / res.seconds)
                    if res.tokens != ref:
                        pos = next((q for q, (x, y) in enumerate(zip(ref, res.tokens)) if x != y),
                                   min(len(ref), len(res.tokens)))
                        gap = top2_gap(model, prompt, ref, pos) if pos < len(ref) else float("nan")
                        r["mismatches"] += 1
                        r["near_ties"] += int(gap < NEAR_TIE)
                        r["mismatch_detail"].append({"run": run, "set": s, "prompt": i, "position": pos,
                                                     "top2_gap": gap})
                    if run == 0:
                        r["step_verify_s"] = r.get("step_verify_s", 0.0) + sum(res.extra.get("verify_seconds", []))
                        r["accepted"] += res.accepted
                        r["drafted"] += res.drafted
                        # self-speculation's drafts from the text; PPD's text chains
                        for key in ("lookup_drafted", "lookup_accepted", "lookup_trees", "lookup_branch_wins",
                                    "chain_drafted", "chain_accepted", "chains_sent", "chain_blocks", "guess_blocks"):
                            if key in res.extra:
                                r[key] = r.get(key, 0) + res.extra[key]
                        for pair, c in res.extra.get("block_pairs", {}).items():  # (B's chain, A's) -> blocks
                            r.setdefault("block_pairs", {}).setdefault(pair, 0)
                            r["block_pairs"][pair] += c
                        r["steps"] += res.steps
                        r["tokens"] += len(res.tokens)
                        r["wall_s"] = r.get("wall_s", 0.0) + res.seconds
                        for w in ("a_time_s", "b_time_s"):  # PPD: where each worker's time went, part by part
                            for part, v in res.extra.get(w, {}).items():
                                r.setdefault(w, {}).setdefault(part, 0.0)
                                r[w][part] += v
                        r["prompts"] = r.get("prompts", 0) + 1
                bar.update(1)
        bar.close()
        for j, r in enumerate(rows):
            per_set = {s: statistics.mean(v) for s, v in speeds[j].items()}
            overall = statistics.mean([v for s in prompts for v in [per_set[s]] * len(prompts[s])])
            r["runs"].append({"overall": overall, "per_set": per_set, "per_prompt": speeds[j]})
            print(f"run {run + 1}/{a.runs}  {labels[j]:60s} {overall:7.2f} tok/s  mismatches so far "
                  f"{r['mismatches']}", flush=True)

    # PPD rows: the latency model's prediction from the observed match rate and stage timings measured with one
    # thread (what each worker has) between the prompts (their medians), the efficiency, and the per-token
    # communication cost.

    for r in rows:
        if r["name"] != "ppd":
            continue
        torch.set_num_threads(1)
        cfg = r["strategy"].config  # the engine's own config: its defaults filled in
        st = median_stage_times(r["stage_times"])
        p = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
        pred, chains = ppd_prediction(st, cfg, r, p)
        # the same model with each stage timed beside the other one's work, as the two workers run when guessing
        # (without guessing they take turns: the timings alone)
        sb = st.beside if cfg.speculate else st
        pred_b, chains_b = ppd_prediction(sb, cfg, r, p)
        k = cfg.k
        rt = r["strategy"].engine.round_trip_seconds()
        r["model"] = {"predicted_speedup_vs_greedy_1t": pred["speedup"], "extra_compute": pred["extra_compute"],
                      "predicted_ms_per_token": 1e3 * pred["latency"],
                      "t1_1_ms": 1e3 * st.t1_miss, "t1_k_ms": 1e3 * st.t1[k], "t2_ms": 1e3 * st.t2,
                      "greedy_step_ms": 1e3 * st.greedy, "early_head_ms": 1e3 * st.head,
                      "round_trip_ms": 1e3 * rt,
                      "beside": {"side_by_side": cfg.speculate,  # False: the stages take turns, timed alone
                                 "predicted_speedup_vs_greedy_1t": pred_b["speedup"],
                                 "predicted_ms_per_token": 1e3 * pred_b["latency"],
                                 "t1_k_ms": 1e3 * sb.t1[k], "t2_ms": 1e3 * sb.t2,
                                 **({"t1k_block_ms": 1e3 * pred_b["t1k_block"], "t2_block_ms": 1e3 * pred_b["t2_block"],
                                     "block_max_ms": 1e3 * chains_b["block_max"]} if chains_b else {})},
                      **({"chains": {**chains, "t2_chain_ms": 1e3 * chains["t2_chain"],
                                     "t1k_chain_ms": 1e3 * chains["t1k_chain"],
                                     "block_max_ms": 1e3 * chains["block_max"],
                                     "t2_block_ms": 1e3 * pred["t2_block"], "t1k_block_ms": 1e3 * pred["t1k_block"],
                                     # (B's chain length, A's) -> blocks; JSON keys are strings
                                     "block_pairs": {f"{b},{a}": c for (b, a), c in r["block_pairs"].items()}}}
                         if chains else {}),
                      # per generated token, over the first run's prompts (prefills included)
                      "wall_ms_per_token": 1e3 * r["wall_s"] / r["tokens"]}
        if "a_time_s" in r:
            r["model"]["breakdown"] = where_the_time_went(r, cfg.speculate)
    for r in rows:
        if hasattr(r["strategy"], "close"):
            r["strategy"].close()
    load.close()

    def mean_of(r, key=None):
        vals = [x["overall"] if key is None else x["per_set"][key] for x in r["runs"]]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    g1 = mean_of(rows[0])[0]
    g2 = mean_of(rows[1])[0]
    gs = mean_of(rows[2])[0]  # greedy through ppd's stack
    methods = []
    for r in rows:
        m, sd = mean_of(r)
        drafting = r["drafted"] > 0
        methods.append({
            "name": r["name"], "config": {**r["config"], "threads": r["threads"],
                                          **({"head": head_kind} if r["strategy"].needs_heads else {})},
            "tokens_per_s": m, "tokens_per_s_std": sd,
            "speedup_vs_greedy_1t": m / g1, "speedup_vs_greedy_2t": m / g2, "speedup_vs_stack_greedy": m / gs,
            "mean_accepted_tokens": (r["tokens"] / r["steps"]) if r["steps"] else None,
            "verify_ms_per_step": 1e3 * r["step_verify_s"] / r["steps"] if r.get("step_verify_s") else None,
            "match_rate": (r["accepted"] / r["drafted"]) if drafting else None,
            **({"text_drafts": {"drafted": r["lookup_drafted"], "accepted": r["lookup_accepted"],
                                "head_drafted": r["drafted"] - r["lookup_drafted"],
                                "head_accepted": r["accepted"] - r["lookup_accepted"],
                                "trees": r.get("lookup_trees", 0), "branch_wins": r.get("lookup_branch_wins", 0)}}
               if "lookup_drafted" in r else {}),
            **({"text_chains": {"drafted": r["chain_drafted"], "accepted": r["chain_accepted"]}}
               if "chain_drafted" in r else {}),
            "predicted_speedup": r.get("model", {}).get("predicted_speedup_vs_greedy_1t"),
            "efficiency": (m / g1) / r["model"]["predicted_speedup_vs_greedy_1t"] if "model" in r else None,
            # the prediction and efficiency with the stages timed beside each other (see theory.StageTimes.beside)
            "predicted_speedup_beside": r["model"]["beside"]["predicted_speedup_vs_greedy_1t"] if "model" in r else None,
            "efficiency_beside": (m / g1) / r["model"]["beside"]["predicted_speedup_vs_greedy_1t"] if "model" in r
            else None,
            "communication_fraction": (r["model"]["round_trip_ms"] / 1e3) * m if "model" in r else None,
            "latency_model": r.get("model"), "mismatches": r["mismatches"], "near_ties": r["near_ties"],
            "mismatch_detail": r["mismatch_detail"],
            "runs": r["runs"],  # per run: overall and per-set tokens/s, and every prompt's
            "per_set": {s: {"tokens_per_s": mean_of(r, s)[0], "speedup_vs_greedy_1t": mean_of(r, s)[0] /
                            mean_of(rows[0], s)[0]} for s in prompts}})
    out = {"model": a.model, "dtype": str(model.dtype).replace("torch.", ""), "max_new_tokens": a.max_new_tokens,
           "runs": a.runs, "warmup": a.warmup, "heads": a.heads or "logit lens",
           "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "prompt_sets": {s: len(v) for s, v in prompts.items()}, "methods": methods,
           "date": time.strftime("%Y-%m-%d")}
    docs = output_dir(a)
    (docs / f"{a.name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"{a.model} ({out['dtype']}), {sum(out['prompt_sets'].values())} prompts "
             f"({', '.join(f'{k} {v}' for k, v in out['prompt_sets'].items())}), {a.max_new_tokens} new tokens, "
             f"{a.runs} run(s), heads: {out['heads']}; {out['machine']['cpu']}", "",
             "| method | config | tokens/s | vs greedy 1t | vs greedy 2t | vs stack greedy | accepted/step | match rate | verify ms/step | predicted (stages alone / beside) | efficiency (alone / beside) | mismatches (near-ties) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        cfg = ", ".join(f"{k}={v}" for k, v in m["config"].items())
        acc = f"{m['mean_accepted_tokens']:.2f}" if m["mean_accepted_tokens"] else "-"
        mr = f"{m['match_rate']:.2f}" if m["match_rate"] is not None else "-"
        pr = f"{m['predicted_speedup']:.2f}x / {m['predicted_speedup_beside']:.2f}x" if m["predicted_speedup"] else "-"
        ef = f"{100 * m['efficiency']:.0f}% / {100 * m['efficiency_beside']:.0f}%" if m["efficiency"] else "-"
        vt = f"{m['verify_ms_per_step']:.1f}" if m.get("verify_ms_per_step") else "-"
        lines.append(f"| {m['name']} | {cfg} | {m['tokens_per_s']:.1f} ± {m['tokens_per_s_std']:.1f} | "
                     f"{m['speedup_vs_greedy_1t']:.2f}x | {m['speedup_vs_greedy_2t']:.2f}x | "
                     f"{m['speedup_vs_stack_greedy']:.2f}x | {acc} | {mr} | {vt} | "
                     f"{pr} | {ef} | {m['mismatches']} ({m['near_ties']}) |")
    lines += ["", "Speedup over greedy (1 thread) per prompt set:", "",
              "| method | config | " + " | ".join(prompts) + " |", "|---|---|" + "---|" * len(prompts)]
    for m in methods:
        cfg = ", ".join(f"{k}={v}" for k, v in m["config"].items())
        lines.append(f"| {m['name']} | {cfg} | " + " | ".join(
            f"{m['per_set'][s]['speedup_vs_greedy_1t']:.2f}x" for s in prompts) + " |")
    for m in methods:
        lm = m.get("latency_model")
        if lm:
            lines.append(f"\nppd {m['config']}: T1(1) {lm['t1_1_ms']:.1f} ms, T1(k) {lm['t1_k_ms']:.1f} ms, T2 "
                         f"{lm['t2_ms']:.1f} ms, greedy step {lm['greedy_step_ms']:.1f} ms, early head "
                         f"{lm['early_head_ms']:.1f} ms; worker round trip {lm['round_trip_ms']:.2f} ms = "
                         f"{100 * m['communication_fraction']:.1f}% of a token's time.")
            if "breakdown" in lm:
                lines += breakdown_lines(lm)
    (docs / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_speedups(methods, g1, g2, docs / f"{a.name}.png")
    finish(a, docs)


if __name__ == "__main__":
    main()
