#!/usr/bin/env python
"""Batched exact decoding at batch sizes 1..16: greedy, fixed speculation lengths and the adaptive policy.

    python scripts/bench_batching.py --heads outputs/train/<run>/heads --layer 22      # the full measurement
    python scripts/bench_batching.py --batch-sizes 1,4 --gammas 1,4 --max-new-tokens 16 --runs 1   # a quick one

Prompts: the engine benchmark's sets (the data root's ``bench/`` folder), interleaved; batch size b decodes the first
max(b, --min-prompts) of them in batches of b. Per (b, method): throughput = new tokens / wall time over those
batches, per-token latency = batch wall time / tokens of each row (mean over rows), prefill included; medians over
--runs, after a warm-up of every method. Methods: transformers' batched ``generate`` (left-padded) and our batched greedy as references, batched
self-speculation with gamma fixed, and gamma*(b) from the profiled cost model (profiled here, in this run, and
saved beside the results). Every row is compared token for token with that prompt decoded alone by ``generate``;
a mismatch is reported with the reference's top-two logit gap (a near-tie below 1e-4).
With ``--trees static,prune,dynamic`` (and ``--prune-layer``) it adds token-tree rows (``batched_tree_speculative``
drafting at ``--layer``: a static tree, the static tree with early pruning, pruning + dynamic size), the chain rows
beside them; ``--methods`` keeps only some rows. ``make bench`` runs it twice: chains at layer 22, trees at 15.
Writes <name>.{json,md,png} and <name>_cost_model.json under outputs/bench/<name>/ (name: batching by
default); ``--publish`` copies them to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir, provenance
from ppd_decode.runtime.exactness import is_near_tie

REPO = Path(__file__).resolve().parents[1]


def interleave(sets: dict[str, list[list[int]]]) -> list[list[int]]:
    out, lists = [], list(sets.values())
    for i in range(max(map(len, lists))):
        out.extend(lst[i] for lst in lists if i < len(lst))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default="shipped",
                   help="a heads directory (training output), 'shipped' (default: the heads that come with ppd for "
                        "this model, else the logit lens) or 'lens'")
    p.add_argument("--layer", type=int, default=22, help="the drafting head's layer d")
    p.add_argument("--sets", default="squad,wmt15,cnn_dailymail,mt_bench")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--gammas", default="1,2,4,8")
    p.add_argument("--min-prompts", type=int, default=4, help="prompts decoded at small batch sizes")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="prompt budget (the prefill is timed too; long prompts would hide the decode steps)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trees", default="", help="token-tree rows (batched_tree_speculative at --layer): any of "
                   "static, prune, dynamic (prune and dynamic prune at --prune-layer)")
    p.add_argument("--prune-layer", type=int, default=None, help="the pruning head's layer p (trees)")
    p.add_argument("--branching", default="2,2,1,1", help="static trees: children per node at each depth")
    p.add_argument("--methods", default=None,
                   help="only these chain rows, comma-separated (hf_generate, self_speculative, adaptive); "
                        "batched_greedy (the reference) and the --trees rows always run")
    p.add_argument("--cost-model", default=None, help="a saved cost model; default: profile it now")
    add_output_args(p, "batching")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    import transformers

    from ppd_decode.data.prompts import load_prompts
    from ppd_decode.evaluation.match_rate import greedy_continuations
    from ppd_decode.models.catalog import choose_heads
    from ppd_decode.models.loading import load_model
    from ppd_decode.profiling.gamma import CostModel, profile
    from ppd_decode.runtime.timing import stopwatch
    from ppd_decode.strategies import get_strategy

    model, tok = load_model(a.model)
    d = a.layer
    trees = [t for t in a.trees.split(",") if t]
    if any(t not in ("static", "prune", "dynamic") for t in trees):
        raise SystemExit(f"--trees takes static, prune, dynamic; got {a.trees}")
    if any(t != "static" for t in trees) and a.prune_layer is None:
        raise SystemExit("--trees prune/dynamic need --prune-layer")
    layers = [d] + ([a.prune_layer] if a.prune_layer is not None and trees else [])
    choice = choose_heads(a.heads, model, layers)
    all_heads, head_kind = choice.heads, "logit lens" if choice.path is None else "trained"
    head = all_heads[d]
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    gammas = [int(x) for x in a.gammas.split(",")]
    sets = {}
    for s in a.sets.split(","):
        ps, report = load_prompts(s, tok, n=max(max(sizes), a.min_prompts), source="local",
                                  max_new_tokens=a.max_new_tokens, context_length=model.config.max_position_embeddings,
                                  max_prompt_tokens=a.max_prompt_tokens)
        sets[s] = [x.input_ids for x in ps]
        print(report)
    prompts = interleave(sets)[:max(max(sizes), a.min_prompts)]

    docs = output_dir(a)
    cost_path = Path(a.cost_model) if a.cost_model else docs / f"{a.name}_cost_model.json"
    if a.cost_model:
        cost = CostModel.load(cost_path)
    else:
        cost = profile(model, head, d, batch_sizes=sizes, progress=True)
        cost.save(cost_path)
    alpha = float(getattr(head, "metrics", {}).get("val_top1_agree", 0.5))
    print(f"gamma*(b) at acceptance {alpha:.3f}: {cost.table(alpha)}")

    methods: list[dict] = [{"method": "hf_generate", "gamma": None}, {"method": "batched_greedy", "gamma": 0}]
    methods += [{"method": "self_speculative", "gamma": g} for g in gammas]
    methods += [{"method": "adaptive", "gamma": "adaptive"}]
    methods += [{"method": f"tree_{t}", "gamma": None} for t in trees]
    if a.methods:  # the chain rows to keep; tree rows are what --trees asks for
        keep = set(a.methods.split(",")) | {"batched_greedy"} | {f"tree_{t}" for t in trees}
        methods = [m for m in methods if m["method"] in keep]
    cls = get_strategy("batched_self_speculative")
    tree_cls = get_strategy("batched_tree_speculative")
    branching = tuple(int(x) for x in a.branching.split(","))

    def strategy(m: dict, b: int):
        if m["method"] == "batched_greedy":
            return get_strategy("batched_greedy")(model, get_strategy("batched_greedy").Config(max_batch_size=b))
        if m["method"].startswith("tree_"):
            kind = m["method"][5:]
            cfg = tree_cls.Config(layer=d, branching=branching, max_batch_size=b, dynamic=kind == "dynamic",
                                  prune_layer=None if kind == "static" else a.prune_layer)
            return tree_cls(model, cfg, heads=all_heads)  # dynamic: the cost profile is made once, at warm-up
        cfg = cls.Config(layer=d, draft_tokens=m["gamma"], max_batch_size=b, acceptance=alpha,
                         cost_model=str(cost_path))  # profiled above, in this run
        return cls(model, cfg, heads={d: head})

    reference = greedy_continuations(model, prompts, a.max_new_tokens, batch_size=1)  # each prompt alone
    for m in methods:  # warm-up: every code path once, on two prompts
        if m["method"] != "hf_generate":
            strategy(m, 2).generate_batch(prompts[:2], 4)
    results = []
    for b in sizes:
        plist = prompts[:max(b, a.min_prompts)]
        for m in methods:
            row = {**m, "batch_size": b, "prompts": len(plist), "throughput": [], "latency": [], "mismatches": 0,
                   "near_ties": 0, "accepted": 0, "drafted": 0, "steps": 0, "tokens": 0, "gammas": {}}
            for run in range(1, a.runs + 1):
                with stopwatch(model.device) as clock:
                    if m["method"] == "hf_generate":
                        outs, lat = [], []
                        for s in range(0, len(plist), b):
                            with stopwatch(model.device) as t1:
                                chunk = greedy_continuations(model, plist[s:s + b], a.max_new_tokens, batch_size=b)
                            outs += chunk
                            lat += [t1.seconds / max(1, len(c)) for c in chunk]
                        stats = None
                    else:
                        s = strategy(m, b)
                        res = s.generate_batch(plist, a.max_new_tokens)
                        outs = [r.tokens for r in res]
                        lat = [r.seconds / max(1, len(r.tokens)) for r in res]
                        stats = res
                wall = clock.seconds
                row["throughput"].append(sum(map(len, outs)) / wall)
                row["latency"].append(statistics.mean(lat))
                if run == 1:
                    for prompt, out, ref in zip(plist, outs, reference):
                        row["tokens"] += len(out)
                        if out != ref:
                            pos = next((i for i, (x, y) in enumerate(zip(out, ref)) if x != y), min(len(out), len(ref)))
                            row["mismatches"] += 1
                            row["near_ties"] += int(is_near_tie(model, prompt, ref, pos)[0])
                    if stats is not None:
                        row["accepted"] = sum(r.accepted for r in stats)
                        row["drafted"] = sum(r.drafted for r in stats)
                        row["steps"] = sum(r.steps for r in stats)
                    if m["gamma"] == "adaptive":
                        for bb, g in s.gammas:
                            row["gammas"][f"b={bb}: gamma={g}"] = row["gammas"].get(f"b={bb}: gamma={g}", 0) + 1
                        row["final_acceptance"] = s.acceptance
            row["tokens_per_s"] = statistics.median(row["throughput"])
            row["latency_per_token_s"] = statistics.median(row["latency"])
            if isinstance(m["gamma"], int):
                row["predicted_tokens_per_s"] = cost.throughput(b, m["gamma"], alpha)
            results.append(row)
            print(f"b={b:2d} {m['method']:16s} gamma={m['gamma']!s:8s} {row['tokens_per_s']:7.1f} tok/s "
                  f"latency {1000 * row['latency_per_token_s']:6.1f} ms/token  mismatches {row['mismatches']}")

    for row in results:
        base = next(r for r in results if r["batch_size"] == row["batch_size"] and r["method"] == "batched_greedy")
        row["speedup_vs_greedy"] = row["tokens_per_s"] / base["tokens_per_s"]
    best_fixed = {}
    for b in sizes:
        fixed = [r for r in results if r["batch_size"] == b and r["method"] in ("batched_greedy", "self_speculative")]
        best_fixed[b] = max(fixed, key=lambda r: r["tokens_per_s"])["gamma"]
    pv = provenance("python scripts/bench_batching.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]), model.device)
    out = {**pv, "model": a.model, "head": head_kind, "heads": choice.label, "layer": d,
           "prune_layer": a.prune_layer if trees else None,
           "branching": list(branching) if trees else None, "acceptance_prior": alpha, "threads": a.threads,
           "machine": {**pv["machine"], "transformers": transformers.__version__},
           "max_new_tokens": a.max_new_tokens, "runs": a.runs, "sets": list(sets), "prompts": len(prompts),
           "gamma_star": cost.table(alpha), "best_fixed_gamma_measured": best_fixed,
           "results": [{k: v for k, v in r.items() if k not in ("throughput", "latency")} | {
               "throughput_runs": r["throughput"]} for r in results]}
    (docs / f"{a.name}.json").write_text(json.dumps(out, indent=1))
    write_markdown(out, docs / f"{a.name}.md")
    plot(out, docs / f"{a.name}.png")
    print((docs / f"{a.name}.md").read_text())
    finish(a, docs)


def write_markdown(out: dict, path: Path) -> None:
    trees = (f" Token trees (batched_tree_speculative): drafted at layer {out['layer']}, static branching "
             f"{out['branching']}, pruning at layer {out['prune_layer']}." if out.get("branching") else "")
    lines = [f"`{out['command']}`", "",
             f"{out['model']}, {out['head']} head at layer {out['layer']} ({out['heads']} heads, validation "
             f"acceptance prior {out['acceptance_prior']:.3f}), {out['machine']['cpu']}, {out['threads']} threads, "
             f"{out['date']}, commit {out['commit']}, {out['max_new_tokens']} new tokens, median of {out['runs']} "
             f"runs; prompts from {', '.join(out['sets'])}.{trees}", "",
             f"Cost model's gamma*(b): {out['gamma_star']}; best fixed gamma measured: {out['best_fixed_gamma_measured']}.",
             "", "| batch | method | gamma | tokens/s | vs batched greedy | predicted tokens/s | latency ms/token | "
             "accepted/drafted | mismatches (near-ties) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        acc = f"{r['accepted']}/{r['drafted']}" if r["drafted"] else ""
        pred = f"{r['predicted_tokens_per_s']:.1f}" if r.get("predicted_tokens_per_s") else ""
        gamma = r["gamma"] if r["gamma"] != "adaptive" else "adaptive: " + ", ".join(r["gammas"])
        lines.append(f"| {r['batch_size']} | {r['method']} | {gamma if gamma is not None else ''} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup_vs_greedy']:.2f}x | {pred} | "
                     f"{1000 * r['latency_per_token_s']:.1f} | {acc} | {r['mismatches']} ({r['near_ties']}) |")
    path.write_text("\n".join(lines) + "\n")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {}
    for r in out["results"]:
        label = r["method"] if r["method"] != "self_speculative" else f"gamma={r['gamma']}"
        labels.setdefault(label, []).append(r)
    for label, rows in labels.items():
        xs = [r["batch_size"] for r in rows]
        style = "-o" if label in ("adaptive", "batched_greedy", "hf_generate") or label.startswith("tree") else "--."
        ax1.plot(xs, [r["tokens_per_s"] for r in rows], style, label=label)
        ax2.plot(xs, [1000 * r["latency_per_token_s"] for r in rows], style, label=label)
    for ax, title in ((ax1, "throughput (tokens/s)"), (ax2, "per-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"{out['model']}: batched exact decoding, self-speculation at layer {out['layer']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    from ppd_decode.errors import run_cli

    run_cli(main, "bench_batching")
