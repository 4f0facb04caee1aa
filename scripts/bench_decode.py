#!/usr/bin/env python
"""Decoding rows side by side, measured the Spec-Bench way (docs/benchmarking.md).

    python scripts/bench_decode.py --heads outputs/train/<run>/heads            # the full measurement
    python scripts/bench_decode.py --heads ... --per-set 5 --max-new-tokens 64 --runs 1   # a quick one
    python scripts/bench_decode.py --heads ... --rows ppd,ppd_d15 decode.ppd_d15.method=ppd decode.ppd_d15.layer=15
    python scripts/bench_decode.py --oracle 0,0.25,0.5,0.75,1 --rows ppd_split --name oracle   # the engine alone

A row is a named setting of configs/decode.yaml (or any registered method's name, at its defaults), changed or
added with decode.ROW.FIELD=VALUE overrides; the script has no code of its own for any method: a method's extra
account (PPD's latency model) comes from its strategy's ``probe`` and ``summary``.

Greedy, batch size 1. Warm-up first, then only the generation call is timed. Per-prompt speed = new tokens / wall
time; a method's tokens/s = mean over prompts. Methods take turns prompt by prompt (interleaved), so a drift of the
machine's speed is shared by all of them; the whole measurement is repeated (--runs) and reported as mean and
standard deviation over runs; speedups are against greedy measured in the same run with 1 and with 2 threads.
Every output is compared token for token with greedy; a mismatch is reported with the reference's top-two logit
gap at the first differing position (a near-tie below ppd_decode.runtime.exactness's threshold: 1e-4 in fp32, two
units in the last place of the logit in bf16/fp16).

``--oracle P,...`` adds a PPD row per p whose guesses come from the greedy reference (the true next token with
probability p; ``PPDConfig.oracle_p``), so PPD's measured speed-up can be drawn against the latency model's
prediction over p whatever the head: <name>_oracle.png and a table of the curve. Writes <name>.{json,md,png}
under outputs/bench/<name>/ (name: decode by default); ``--publish`` copies them to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir, provenance
from ppd_decode.runtime.exactness import is_near_tie
from ppd_decode.strategies.base import Totals

REPO = Path(__file__).resolve().parents[1]


def plot_speedups(methods: list[dict], g1: float, g2: float, path: Path) -> None:
    """Horizontal bars: each row's speedup over greedy with 1 thread (error bar: std over runs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{m['row']} ({m['label']})" if m["label"] else m["row"] for m in methods]
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


BASELINES = ("greedy", "greedy_2t", "stack_greedy", "greedy_packed")  # always run: rows[0] is the reference
DEFAULT_ROWS = "prompt_lookup,self_speculative_text,self_speculative_text_2t,ppd,ppd_split,lookahead"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model's; PPD's stages default to it)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the model's own)")
    p.add_argument("--heads", default="shipped",
                   help="a heads directory (training output), 'shipped' (default: the heads that come with ppd for "
                        "this model, else the logit lens) or 'lens'")
    p.add_argument("--layers", default=None, help="which of the heads to load (default: all in --heads)")
    p.add_argument("--layer", type=int, default=None,
                   help="the head a drafting row uses when it names no layer (default: the deepest loaded)")
    p.add_argument("--rows", default=DEFAULT_ROWS,
                   help=f"rows of configs/decode.yaml to measure, comma-separated (the baselines {', '.join(BASELINES)} "
                        "always run)")
    p.add_argument("overrides", nargs="*", metavar="decode.ROW.FIELD=VALUE",
                   help="change a row's config, or add a row (decode.ppd_d15.method=ppd decode.ppd_d15.layer=15)")
    p.add_argument("--sets", default="squad,wmt15,cnn_dailymail,mt_bench",
                   help="prompt sets of the data root's bench/ folder, or random (random token ids)")
    p.add_argument("--per-set", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="override every task's prompt budget")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--oracle", default=None, help="comma-separated match probabilities p: one oracle PPD row each "
                                                  "(the ppd row's settings, guesses from the greedy reference)")
    add_output_args(p, "decode")
    return p.parse_args()




def load_prompt_sets(a, tok, model) -> dict[str, list[list[int]]]:
    from ppd_decode.data.prompts import load_prompts

    prompts = {}
    for s in a.sets.split(","):
        if s == "random":  # random token ids (a random-weight model has no text to read)
            g = torch.Generator().manual_seed(0)
            n = a.max_prompt_tokens or 128
            prompts[s] = [torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist()
                          for _ in range(a.per_set)]
            continue
        ps, report = load_prompts(s, tok, n=a.per_set, source="local", max_new_tokens=a.max_new_tokens,
                                  max_prompt_tokens=a.max_prompt_tokens,  # (None: each task's own budget)
                                  context_length=model.config.max_position_embeddings)
        prompts[s] = [x.input_ids for x in ps]
        print(report)
    return prompts


def measure(rows: list[dict], prompts: dict, a, model) -> None:
    """Interleaved: every prompt is decoded by every row in turn (the order rotated from prompt to prompt), so a
    slow drift of the machine's speed (other tenants, clocks) lands on all rows alike instead of on whichever row's
    block it happened to hit. Between prompts each strategy may take its own measurements (``probe``)."""
    first = next(iter(prompts.values()))[0]
    refs = references(rows, prompts, a)

    def ref_for(r, key):  # the greedy reference, for a row whose guesses come from it (the oracle)
        return {"reference": refs[key]} if r["strategy"].wants_reference() else {}

    first_key = (next(iter(prompts)), 0)
    for run in range(a.runs):
        for r in rows:
            torch.set_num_threads(r["row"].threads)
            for _ in range(a.warmup if run == 0 else 1):
                r["strategy"].generate(first, a.max_new_tokens, **ref_for(r, first_key))
        speeds = [{s: [] for s in prompts} for _ in rows]
        turn = 0
        bar = tqdm(total=sum(map(len, prompts.values())), desc=f"run {run + 1}/{a.runs}", unit="prompt")
        for s, plist in prompts.items():
            for i, prompt in enumerate(plist):
                results = {}
                for j in [(turn + n) % len(rows) for n in range(len(rows))]:
                    torch.set_num_threads(rows[j]["row"].threads)
                    results[j] = rows[j]["strategy"].generate(prompt, a.max_new_tokens, **ref_for(rows[j], (s, i)))
                turn += 1
                for r in rows:
                    r["strategy"].probe(len(prompt), a.max_new_tokens)
                ref = results[0].tokens  # rows[0] is greedy with 1 thread: the reference
                for j, r in enumerate(rows):
                    res = results[j]
                    speeds[j][s].append(len(res.tokens) / res.seconds)
                    if res.tokens != ref:
                        pos = next((q for q, (x, y) in enumerate(zip(ref, res.tokens)) if x != y),
                                   min(len(ref), len(res.tokens)))
                        tie, gap = is_near_tie(model, prompt, ref, pos) if pos < len(ref) else (False, float("nan"))
                        r["mismatches"] += 1
                        r["near_ties"] += int(tie)
                        r["mismatch_detail"].append({"run": run, "set": s, "prompt": i, "position": pos,
                                                     "top2_gap": gap})
                    if run == 0:
                        r["totals"].add(res)
                bar.update(1)
        bar.close()
        for j, r in enumerate(rows):
            per_set = {s: statistics.mean(v) for s, v in speeds[j].items()}
            overall = statistics.mean([v for s in prompts for v in [per_set[s]] * len(prompts[s])])
            r["runs"].append({"overall": overall, "per_set": per_set, "per_prompt": speeds[j]})
            print(f"run {run + 1}/{a.runs}  {r['row'].name:28s} {overall:7.2f} tok/s  mismatches so far "
                  f"{r['mismatches']}", flush=True)


def references(rows: list[dict], prompts: dict, a) -> dict:
    """Each prompt's greedy output (rows[0]), decoded before the timed runs, where a row guesses from it."""
    if not any(r["strategy"].wants_reference() for r in rows):
        return {}
    return {(s, i): rows[0]["strategy"].generate(p, a.max_new_tokens).tokens
            for s, plist in prompts.items() for i, p in enumerate(plist)}


def oracle_rows(a) -> tuple[list[str], list[str]]:
    """Row names and overrides for --oracle: the ppd row's settings (its YAML and the command's decode.ppd.*
    overrides) with guesses from the reference at each p."""
    if not a.oracle:
        return [], []
    from ppd_decode.strategies.configs import load_rows

    yaml_ppd = {k: v for k, v in (load_rows().get("ppd") or {}).items() if k != "method"}
    user_ppd = [o.lstrip("+")[len("decode.ppd."):] for o in a.overrides if o.lstrip("+").startswith("decode.ppd.")]
    names, overrides = [], []
    for p in (float(x) for x in a.oracle.split(",")):
        name = f"ppd_oracle_{round(100 * p)}"
        names.append(name)
        overrides += [f"decode.{name}.method=ppd", *(f"decode.{name}.{k}={json.dumps(v)}" for k, v in yaml_ppd.items()),
                      *(f"decode.{name}.{o}" for o in user_ppd), f"decode.{name}.oracle_p={p}"]
    return names, overrides


def oracle_curve(methods: list[dict], path: Path) -> list[str]:
    """Measured against predicted speed-up over greedy (1 thread) for the oracle rows, as a table and a plot."""
    rows = [m for m in methods if m["settings"].get("oracle_p") is not None]
    if not rows:
        return []
    lines = ["", "Oracle guesses (the engine alone): measured against the latency model, over p. The speed-ups are "
             "whole decodes (prefill included); the decoding phase alone, in ms per token: measured, predicted from "
             "the stages timed alone, and predicted from the same stages' times inside the pipeline (what remains "
             "is the model's schedule, not the stages' speed)", "",
             "| p asked | match rate | measured vs greedy 1t | predicted (stages alone) | measured / predicted | "
             "prefill share | decoding ms/token | predicted alone | predicted from in-pipeline times |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        lm = m.get("latency_model") or {}
        bd, ins = lm.get("breakdown") or {}, lm.get("inside") or {}
        phase = "- | - | - | - |"
        if bd and ins:
            phase = (f"{bd['prefill_ms_per_token'] / lm['wall_ms_per_token']:.0%} | {bd['decoding_ms_per_token']:.1f} | "
                     f"{lm['predicted_ms_per_token']:.1f} ({lm['predicted_ms_per_token'] / bd['decoding_ms_per_token']:.0%}) | "
                     f"{ins['predicted_ms_per_token']:.1f} ({ins['structure_efficiency']:.0%}) |")
        lines.append(f"| {m['settings']['oracle_p']:.2f} | {m['match_rate']:.3f} | {m['speedup_vs_greedy_1t']:.2f}x | "
                     f"{m['predicted_speedup']:.2f}x | {100 * m['efficiency']:.0f}% | {phase}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return lines
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [m["match_rate"] for m in rows]
    ax.plot(xs, [m["speedup_vs_greedy_1t"] for m in rows], "o-", label="measured")
    ax.plot(xs, [m["predicted_speedup"] for m in rows], "s--", label="latency model (stages timed alone)")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("match rate p")
    ax.set_ylabel("speedup over greedy (1 thread)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return lines


def jsonable(x):
    if isinstance(x, dict):
        return {(",".join(map(str, k)) if isinstance(k, tuple) else str(k)): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def summarise(rows: list[dict], prompts: dict, head_kind: str) -> list[dict]:
    def mean_of(r, key=None):
        vals = [x["overall"] if key is None else x["per_set"][key] for x in r["runs"]]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    g1, g2, gs = (mean_of(rows[i])[0] for i in range(3))  # greedy 1 thread, 2 threads, through ppd's stack
    methods = []
    for r in rows:
        m, sd = mean_of(r)
        t = r["totals"]
        t.tokens_per_s = m
        extra = r["strategy"].summary(t)  # the method's own account (PPD: its latency model), from its probes
        pred = extra.get("predicted_speedup")
        pred_b = extra.get("predicted_speedup_beside")
        row = r["row"]
        methods.append({
            # name: the registry name; config: what tells two rows of one method apart (docs/benchmarking.md)
            "name": row.cls.name, "row": row.name, "label": row.label,
            "config": {**jsonable(row.changed()), "threads": row.threads,
                       **({"head": head_kind} if row.cls.needs_heads else {})},
            "settings": jsonable(dataclasses.asdict(row.config)),
            "tokens_per_s": m, "tokens_per_s_std": sd,
            "speedup_vs_greedy_1t": m / g1, "speedup_vs_greedy_2t": m / g2, "speedup_vs_stack_greedy": m / gs,
            "mean_accepted_tokens": (t.tokens / t.steps) if t.steps else None,
            "match_rate": (t.accepted / t.drafted) if t.drafted else None,
            "drafted": t.drafted, "accepted": t.accepted, "stats": jsonable(t.stats.as_dict()),
            "predicted_speedup": pred, "predicted_speedup_beside": pred_b,
            "efficiency": (m / g1) / pred if pred else None,
            "efficiency_beside": (m / g1) / pred_b if pred_b else None,
            **{k: jsonable(v) for k, v in extra.items() if k not in ("predicted_speedup", "predicted_speedup_beside")},
            "mismatches": r["mismatches"], "near_ties": r["near_ties"], "mismatch_detail": r["mismatch_detail"],
            "runs": r["runs"],  # per run: overall and per-set tokens/s, and every prompt's
            "per_set": {s: {"tokens_per_s": mean_of(r, s)[0], "speedup_vs_greedy_1t": mean_of(r, s)[0] /
                            mean_of(rows[0], s)[0]} for s in prompts}})
    return methods


def markdown(out: dict, prompts: dict, command: str) -> list[str]:
    methods = out["methods"]
    lines = [f"`{command}`", "",
             f"{out['model']} ({out['dtype']}), {sum(out['prompt_sets'].values())} prompts "
             f"({', '.join(f'{k} {v}' for k, v in out['prompt_sets'].items())}), {out['max_new_tokens']} new tokens, "
             f"{out['runs']} run(s), heads: {out['heads']}; {out['machine']['gpu'] or out['machine']['cpu']}, {out['date']}, commit "
             f"{out['commit']}", "",
             "| row | method | config | tokens/s | vs greedy 1t | vs greedy 2t | vs stack greedy | accepted/step | "
             "match rate | predicted (stages alone / beside) | efficiency (alone / beside) | mismatches (near-ties) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        acc = f"{m['mean_accepted_tokens']:.2f}" if m["mean_accepted_tokens"] else "-"
        mr = f"{m['match_rate']:.2f}" if m["match_rate"] is not None else "-"
        pr = f"{m['predicted_speedup']:.2f}x / {m['predicted_speedup_beside']:.2f}x" if m["predicted_speedup"] else "-"
        ef = f"{100 * m['efficiency']:.0f}% / {100 * m['efficiency_beside']:.0f}%" if m["efficiency"] else "-"
        lines.append(f"| {m['row']} | {m['name']} | {m['label']} | {m['tokens_per_s']:.1f} ± "
                     f"{m['tokens_per_s_std']:.1f} | {m['speedup_vs_greedy_1t']:.2f}x | {m['speedup_vs_greedy_2t']:.2f}x"
                     f" | {m['speedup_vs_stack_greedy']:.2f}x | {acc} | {mr} | {pr} | {ef} | {m['mismatches']} "
                     f"({m['near_ties']}) |")
    lines += ["", "Speedup over greedy (1 thread) per prompt set:", "",
              "| row | " + " | ".join(prompts) + " |", "|---|" + "---|" * len(prompts)]
    for m in methods:
        lines.append(f"| {m['row']} | " + " | ".join(f"{m['per_set'][s]['speedup_vs_greedy_1t']:.2f}x"
                                                     for s in prompts) + " |")
    for m in methods:
        if m.get("lines"):
            lines += ["", f"{m['row']}: " + m["lines"][0], *m["lines"][1:]]
    return lines


def main() -> None:
    a = parse_args()
    import transformers

    from ppd_decode.models.catalog import choose_heads
    from ppd_decode.models.loading import load_model
    from ppd_decode.strategies.configs import fill_layer
    from ppd_decode.strategies.configs import rows as decode_rows

    extra, oracle_overrides = oracle_rows(a)
    names = list(BASELINES) + [n for n in a.rows.split(",") if n and n not in BASELINES] + extra
    chosen = decode_rows(names, oracle_overrides + list(a.overrides))  # bad settings fail before the model loads
    model, tok = load_model(a.model, device=a.device, dtype=a.dtype)
    if model.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: exactness is checked against it
    choice = choose_heads(a.heads, model, [int(x) for x in a.layers.split(",")] if a.layers else None)
    heads, head_kind = choice.heads, "logit lens" if choice.path is None else "trained"
    by_row = {**choice.row_layers, **({n: choice.row_layers["ppd"] for n in extra} if "ppd" in choice.row_layers
                                      else {})}  # oracle rows split where the ppd row does
    fill_layer(chosen, a.layer or choice.layer or max(heads), None if a.layer else by_row)
    prompts = load_prompt_sets(a, tok, model)
    rows = [{"row": row, "strategy": row.build(model, heads), "runs": [], "mismatches": 0, "near_ties": 0,
             "mismatch_detail": [], "totals": Totals()} for row in chosen]
    try:
        measure(rows, prompts, a, model)
        methods = summarise(rows, prompts, head_kind)
    finally:
        for r in rows:
            r["strategy"].close()
    command = "python scripts/bench_decode.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    pv = provenance(command, model.device)
    out = {**pv, "model": a.model, "dtype": str(model.dtype).replace("torch.", ""),
           "max_new_tokens": a.max_new_tokens, "runs": a.runs, "warmup": a.warmup, "heads": choice.label,
           "machine": {**pv["machine"], "transformers": transformers.__version__},
           "prompt_sets": {s: len(v) for s, v in prompts.items()}, "methods": methods}
    docs = output_dir(a)
    (docs / f"{a.name}.json").write_text(json.dumps(out, indent=1))
    lines = markdown(out, prompts, command) + oracle_curve(methods, docs / f"{a.name}_oracle.png")
    (docs / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_speedups(methods, methods[0]["tokens_per_s"], methods[1]["tokens_per_s"], docs / f"{a.name}.png")
    finish(a, docs)


if __name__ == "__main__":
    from ppd_decode.errors import run_cli

    run_cli(main, "bench_decode")
