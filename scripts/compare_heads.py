#!/usr/bin/env python
"""Which head is worth pipelining? Head kind x input x data on equal budgets, judged by the match rates decoding sees.

    python scripts/compare_heads.py --layers 11,13,15,22 --tokens 200000                 # every cell
    python scripts/compare_heads.py --recipes frequent,frequent+f_prev --data self-distilled --n 20   # some cells

Each cell is one training run (``python -m ppd_train``, all layers from one backbone forward, the same token budget
and epochs for every cell) and one evaluation of its heads (``python -m ppd_decode.evaluation``: p_k on the model's
own greedy outputs, ranked as decoding ranks, f(t-1) fed where the pipeline has it). Beside the rates: the run's
training throughput and each head's decode-time cost per token (its guess for one row, the work it adds to worker
A's critical path and to every draft step), timed here. Runs and evaluations resume: an interrupted comparison
picks up where it stopped. Writes heads.{json,md,png} under outputs/bench/<name>/ (``--publish``: docs/benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir

REPO = Path(__file__).resolve().parents[1]
# Each cell pins its whole recipe, so the table stays reproducible when the defaults change.
BASE = ["head.objective=distill", "head.distill_kind=argmax", "head.projection=frequent", "head.train_vocab=4096",
        "trainer.lr=2e-3", "trainer.autocast=null"]
RECIPES = {
    "frequent": ["head.adapter_rank=0", "head.reads_prev=false", "head.block=false"],
    "frequent+f_prev": ["head.adapter_rank=0", "head.reads_prev=true", "head.block=false"],
    # a residual MLP of twice the width before the norm
    "mlp": ["head.adapter_rank=1152", "head.reads_prev=false", "head.block=false"],
    "mlp+f_prev": ["head.adapter_rank=1152", "head.reads_prev=true", "head.block=false"],
    # a decoder layer of its own (from layer d+1) over every position's layer-d state
    "block": ["head.adapter_rank=0", "head.reads_prev=false", "head.block=true"],
    "block+f_prev": ["head.adapter_rank=0", "head.reads_prev=true", "head.block=true"],
}
# A block head reads the prompt's states too, which only the teacher-forced evaluation has.
EVAL = {"block": ["measure=teacher_forced"], "block+f_prev": ["measure=teacher_forced"]}
DATA = {
    "dolly": ["data=dolly"],
    "self-distilled": ["data=dolly_self_distill"],  # the model's own greedy answers to dolly's prompts
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def head_cost_ms(model, head_dir: Path, repeats: int = 200, context: int = 256) -> dict[int, float]:
    """Median milliseconds of each head's guess (top-4) for one row, as decoding calls it, one thread (a block
    head: its layer over the row, after ``context`` cached positions, and then the guess)."""
    from ppd_decode.models.heads import load_heads
    from ppd_decode.profiling.step_cost import median_time

    torch.set_num_threads(1)
    out = {}
    for d, head in load_heads(head_dir, model).items():
        h = torch.randn(1, model.config.hidden_size, dtype=model.dtype)
        prev = torch.randn_like(h) if head.reads_prev else None
        ctx = head.context()
        with torch.no_grad():
            ctx.read(torch.randn(1, context, h.shape[-1], dtype=model.dtype), 0)
            out[d] = 1e3 * median_time(lambda: head.guess(ctx.read(h[None], context)[0], 4, prev), repeats,
                                       model.device)
    return out


def main(a) -> None:
    from ppd_decode.models.loading import load_model

    layers = [int(x) for x in a.layers.split(",")]
    recipes, datas = a.recipes.split(","), a.data.split(",")
    for name in recipes + datas:
        if name not in RECIPES and name not in DATA:
            from ppd_decode.errors import PPDError

            raise PPDError(f"unknown recipe or data {name!r}. Fix: recipes from {list(RECIPES)}, data from {list(DATA)}")
    pairs = [(r, d) for d in datas for r in recipes]
    if a.cells:  # an explicit list instead of every recipe x data
        pairs = [tuple(c.split("@")) for c in a.cells.split(",")]
        bad = [c for c in pairs if len(c) != 2 or c[0] not in RECIPES or c[1] not in DATA]
        if bad:
            from ppd_decode.errors import PPDError

            raise PPDError(f"--cells {bad}: each cell is recipe@data. Fix: recipes from {list(RECIPES)}, data from "
                           f"{list(DATA)}")
    cells = []
    model, _ = load_model(a.model)
    for recipe, data in pairs:
        run_dir = Path(a.runs) / f"{recipe}-{data}"
        if not (run_dir / "metrics.json").is_file():
            run([sys.executable, "-m", "ppd_train", f"model={a.model}", f"head.layers=[{a.layers}]", *DATA[data],
                 f"data.max_train_tokens={a.tokens}", f"data.self_distill.num_prompts={a.self_distill_prompts}",
                 f"trainer.epochs={a.epochs}", "wandb.mode=disabled", f"output_dir={run_dir}", *BASE,
                 *RECIPES[recipe], *a.overrides])
        eval_dir = run_dir / "eval"
        if not (eval_dir / "match_rate.json").is_file():
            run([sys.executable, "-m", "ppd_decode.evaluation", f"model={a.model}", f"heads=[{run_dir / 'heads'}]",
                 "lens_layers=[]", "ks=[1,2,4,5,10]", f"n={a.n}", f"max_new_tokens={a.max_new_tokens}", "timing.enabled=false",
                 "cost_baseline=false", "wandb.mode=disabled", f"hydra.run.dir={eval_dir}",
                 *EVAL.get(recipe, []), *a.eval_overrides.split()])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        report = json.loads((eval_dir / "match_rate.json").read_text())
        speeds = [h["train/tokens_per_s"] for h in metrics["history"] if "train/tokens_per_s" in h][1:]
        cost = head_cost_ms(model, run_dir / "heads")
        for d in layers:
            cell = {"recipe": recipe, "data": data, "layer": d, "steps": metrics["steps"],
                    "train_tokens_per_s": statistics.median(speeds) if speeds else None, "head_ms": cost[d],
                    "val_top1": metrics["final"][f"val/top1_agree/layer{d}"],
                    "selected_step": metrics.get("selected_steps", {}).get(str(d)), "tasks": {}}
            for task, t in report["tasks"].items():
                r = next((r for r in t.get("rates", []) if r["layer"] == d), None)
                if r:
                    cell["tasks"][task] = {k: r[k] for k in r if k.startswith(("p@", "full@", "noprev@"))}
            cells.append(cell)
    write(a, cells, layers)


def write(a, cells: list[dict], layers: list[int]) -> None:
    docs = output_dir(a)
    (docs / f"{a.name}.json").write_text(json.dumps({"model": a.model, "layers": layers, "train_tokens": a.tokens,
                                                     "epochs": a.epochs, "n": a.n, "base": BASE,
                                                     "recipes": RECIPES, "data": DATA, "cells": cells}, indent=1))
    tasks = sorted({t for c in cells for t in c["tasks"]})
    lines = [f"Heads on equal budgets ({a.model}; {a.tokens} training tokens, {a.epochs} epoch(s) per cell; match "
             f"rates on {a.n} prompts per task, up to {a.max_new_tokens} greedy tokens, ranked as decoding ranks; "
             f"`{' '.join(['python scripts/compare_heads.py', *sys.argv[1:]])}`)", "",
             "| recipe | data | d | " + " | ".join(f"{t} p@1 / p@4" for t in tasks)
             + " | p@1 without f(t-1) (SQuAD) | exported step / steps | train tok/s | head ms/token |",
             "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for c in cells:
        rates = [c["tasks"].get(t, {}) for t in tasks]
        cols = [f"{r.get('p@1', float('nan')):.3f} / {r.get('p@4', float('nan')):.3f}" for r in rates]
        alone = c["tasks"].get("squad", {}).get("noprev@1")
        tps = c["train_tokens_per_s"]
        lines.append(f"| {c['recipe']} | {c['data']} | {c['layer']} | " + " | ".join(cols)
                     + f" | {'-' if alone is None else f'{alone:.3f}'} | {c.get('selected_step') or c['steps']} / "
                     f"{c['steps']} | {'-' if tps is None else f'{tps:.0f}'} | "
                     f"{c['head_ms']:.3f} |")
    (docs / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        finish(a, docs)
        return
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for key in sorted({(c["recipe"], c["data"]) for c in cells}):
            cs = sorted((c for c in cells if (c["recipe"], c["data"]) == key), key=lambda c: c["layer"])
            ax.plot([c["layer"] for c in cs], [c["tasks"].get(task, {}).get("p@1", float("nan")) for c in cs],
                    marker="o", label=f"{key[0]}, {key[1]}")
        ax.set_title(f"{task}: p@1 (decoding's ranking)")
        ax.set_xlabel("layer d")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / f"{a.name}.png", dpi=110)
    finish(a, docs)


if __name__ == "__main__":
    from ppd_decode.errors import run_cli

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="11,13,15,22")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--data", default=",".join(DATA))
    p.add_argument("--cells", default="", help="recipe@data,... (instead of every --recipes x --data)")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens per cell (data.max_train_tokens)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--self-distill-prompts", type=int, default=800, help="prompts the model answers (self-distilled)")
    p.add_argument("--n", type=int, default=100, help="prompts per task in each cell's evaluation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", default=str(REPO / "outputs" / "compare_heads"), help="the cells' training runs")
    p.add_argument("--eval-overrides", default="", help="extra overrides for every evaluation (space-separated)")
    add_output_args(p, "heads")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run")
    run_cli(main, "compare_heads", p.parse_args())
