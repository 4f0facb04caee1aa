"""PPD's own account in the benchmark: stage timings between prompts, the latency model's prediction from them and
from the observed match rate, and where each worker's time went (docs/method.md, the stage-pipelined deployment)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics

import torch

from ppd_decode.profiling.latency import (
    chain_timings,
    chained_block_times,
    measure_stage_times,
    side_by_side_block_time,
    stage_pipelined,
)


@contextlib.contextmanager
def _one_thread():
    """Time as each worker runs: one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe(strategy, prompt_len: int, max_new_tokens: int) -> None:
    """Time PPD's stages now (between prompts, so the latency model sees the machine at the speed the decodes saw):
    alone, and beside the other stage's work kept running on the other core (not for the split without guessing,
    whose stages take turns). With text chains, A's chained guess blocks and B's padded chain blocks too."""
    from ppd_decode.profiling.stage_load import StageLoad

    cfg, model = strategy.config, strategy.model
    if cfg.speculate and strategy._load is None:
        strategy._load = StageLoad(model)
    chain_ks, chain_rows = chain_timings(cfg.k, cfg.chain, cfg.min_block)
    with _one_thread():
        strategy._stage_times.append(measure_stage_times(
            model, strategy.engine.head, cfg.layer, ks=(1, cfg.k) + chain_ks, repeats=3,
            context=prompt_len + max_new_tokens // 2, t2_rows=chain_rows,
            load=strategy._load if cfg.speculate else None, load_rows=cfg.k))


def summary(strategy, totals) -> dict:
    """The prediction (stages timed alone and beside each other), the per-token communication cost and the
    breakdown of each worker's time, from the probes and the first run's totals."""
    if not strategy._stage_times:
        return {}
    cfg = strategy.config
    st = median_stage_times(strategy._stage_times)
    p = totals.accepted / totals.drafted if totals.drafted else 0.0
    pred, chains = ppd_prediction(st, cfg, totals, p)
    sb = st.beside if cfg.speculate else st
    pred_b, chains_b = ppd_prediction(sb, cfg, totals, p)
    with _one_thread():
        rt = strategy.engine.round_trip_seconds()
    k = cfg.k
    lm = {"predicted_speedup_vs_greedy_1t": pred["speedup"], "extra_compute": pred["extra_compute"],
          "predicted_ms_per_token": 1e3 * pred["latency"],
          "t1_1_ms": 1e3 * st.t1_miss, "t1_k_ms": 1e3 * st.t1[k], "t2_ms": 1e3 * st.t2,
          "greedy_step_ms": 1e3 * st.greedy, "early_head_ms": 1e3 * st.head, "round_trip_ms": 1e3 * rt,
          "beside": {"side_by_side": cfg.speculate,  # False: the stages take turns, timed alone
                     "predicted_speedup_vs_greedy_1t": pred_b["speedup"],
                     "predicted_ms_per_token": 1e3 * pred_b["latency"],
                     "t1_k_ms": 1e3 * sb.t1[k], "t2_ms": 1e3 * sb.t2,
                     **({"t1k_block_ms": 1e3 * pred_b["t1k_block"], "t2_block_ms": 1e3 * pred_b["t2_block"],
                         "block_max_ms": 1e3 * chains_b["block_max"]} if chains_b else {})},
          **({"chains": {**chains, "t2_chain_ms": 1e3 * chains["t2_chain"], "t1k_chain_ms": 1e3 * chains["t1k_chain"],
                         "block_max_ms": 1e3 * chains["block_max"],
                         "t2_block_ms": 1e3 * pred["t2_block"], "t1k_block_ms": 1e3 * pred["t1k_block"],
                         "block_pairs": {f"{b},{a}": c for (b, a), c in totals.stats.block_pairs.items()}}}
             if chains else {}),
          "wall_ms_per_token": 1e3 * totals.wall_s / totals.tokens}
    if totals.stats.a_time_s:
        lm["breakdown"] = bd = where_the_time_went(totals, cfg.speculate)
        lm["inside"] = inside_prediction(bd, st.greedy, p if cfg.speculate else 0.0, chains)
    tps = totals.tokens_per_s
    lines = [f"T1(1) {lm['t1_1_ms']:.1f} ms, T1(k) {lm['t1_k_ms']:.1f} ms, T2 {lm['t2_ms']:.1f} ms, greedy step "
             f"{lm['greedy_step_ms']:.1f} ms, early head {lm['early_head_ms']:.1f} ms; worker round trip "
             f"{lm['round_trip_ms']:.2f} ms = {100 * rt * tps:.1f}% of a token's time."]
    if "breakdown" in lm:
        lines += breakdown_lines(lm)
    return {"predicted_speedup": pred["speedup"], "predicted_speedup_beside": pred_b["speedup"],
            "communication_fraction": rt * tps, "latency_model": lm, "lines": lines}


def median_stage_times(samples: list):
    """The median of each stage timing over samples taken between prompts (``profiling.latency.StageTimes``), the
    timings beside the other stage's work (``.beside``) too."""
    med = statistics.median
    first = samples[0]
    return dataclasses.replace(first, t1={k: med(x.t1[k] for x in samples) for k in first.t1},
                               t2_rows={r: med(x.t2_rows[r] for x in samples) for r in first.t2_rows or {}} or None,
                               beside=median_stage_times([x.beside for x in samples]) if first.beside else None,
                               **{f: med(getattr(x, f) for x in samples) for f in ("t1_miss", "t2", "greedy", "head",
                                                                                    "layer")})


def ppd_prediction(st, cfg, t, p: float) -> tuple[dict, dict | None]:
    """The latency model's prediction for a PPD row from stage timings ``st``, the observed match rate ``p`` and,
    with text chains, the chains the engine reported (``t``: the row's ``Totals``); and the chain mix it used."""
    k, s = cfg.k, t.stats
    chains = None
    if cfg.chain:  # (the engine keeps a chain only where it guesses from the text)
        blocks = t.tokens - s.chain_accepted
        t1k_chain, t2_chain = chained_block_times(st, k, cfg.min_block, s.block_pairs)
        chains = {"b_share": s.chains_sent / blocks, "a_share": s.chain_blocks / max(1, s.guess_blocks),
                  "t2_chain": t2_chain, "t1k_chain": t1k_chain, "tokens_per_block": t.tokens / blocks}
        # the earlier form, max(mean B block, mean A block), kept beside it for comparison
        means_only = stage_pipelined(p, st.t1[k], st.t1_miss, st.t2, st.greedy, chains)
        chains["block_max"] = side_by_side_block_time(st, k, cfg.min_block, s.block_pairs)
        chains["predicted_speedup_max_of_means"] = means_only["speedup"]
    spec = cfg.speculate
    return stage_pipelined(p if spec else 0.0, st.t1[k] if spec else 0.0, st.t1_miss, st.t2, st.greedy, chains), chains


def inside_prediction(bd: dict, t_greedy: float, p: float, chains: dict | None) -> dict:
    """The latency model fed with the stage times measured inside the pipeline (``where_the_time_went``'s mean guess
    block, re-run and B block) instead of timed alone: what is left between it and the measured decoding phase is
    the model's structure (the schedule it assumes), not the stages' speed. On a CPU the stages run slower side by
    side than alone (they share the memory bus), which the prediction from timings alone cannot know."""
    ip = bd["in_pipeline_ms"]
    per_block = {"b_share": 0.0, "a_share": 0.0, "t2_chain": 0.0, "t1k_chain": 0.0,
                 "tokens_per_block": chains["tokens_per_block"]} if chains else None  # (the means mix chains in)
    pred = stage_pipelined(p, 1e-3 * (ip["guess_block"] or 0.0), 1e-3 * ip["miss_rerun"], 1e-3 * ip["b_step"],
                           t_greedy, per_block)
    return {"predicted_ms_per_token": 1e3 * pred["latency"], "decoding_ms_per_token": bd["decoding_ms_per_token"],
            "structure_efficiency": pred["latency"] * 1e3 / bd["decoding_ms_per_token"]}


def where_the_time_went(t, spec: bool) -> dict:
    """A PPD row's worker times (``t``: its ``Totals``, summed part by part over the first run's prompts) per
    generated token, and the in-pipeline cost of each kind of work next to the same work timed alone."""
    a, b, n = t.stats.a_time_s, t.stats.b_time_s, t.tokens
    decoded = n - t.prompts  # tokens after each prompt's first: the decoding phase
    blocks = decoded - t.stats.chain_accepted  # B's blocks (with text chains, one decides several tokens)
    misses = (t.drafted - t.accepted) if spec else decoded
    per_token = lambda parts: {k: 1e3 * v / n for k, v in parts.items()}  # noqa: E731
    return {"a_ms_per_token": per_token(a), "b_ms_per_token": per_token(b),
            "decoding_ms_per_token": 1e3 * (t.wall_s - max(a["prefill"], b["prefill"])) / max(1, decoded),
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
    if "inside" in lm:
        ins = lm["inside"]
        lines.append(f"With these in-pipeline times the model predicts {ins['predicted_ms_per_token']:.1f} ms per token "
                     f"of the decoding phase ({100 * ins['structure_efficiency']:.0f}% of the measured "
                     f"{ins['decoding_ms_per_token']:.1f}).")
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
