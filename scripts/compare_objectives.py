#!/usr/bin/env python
"""Which training objective makes heads agree best with the final layer? Trains the same layers on the same data
with each objective (one `python -m ppd_train` run each), then tabulates validation top-1/top-5 agreement.

    python scripts/compare_objectives.py --layers 8,15,22 --tokens 100000

Writes objectives.{json,md,png} under outputs/bench/<name>/ (``--publish`` copies them to docs/benchmarks/).
Runs resume: an interrupted comparison picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir

REPO = Path(__file__).resolve().parents[1]
# Each run pins its whole head recipe, so the table stays reproducible when the defaults change.
OWN = ["head.projection=own", "head.adapter_rank=0", "trainer.autocast=null"]
SHARED = ["head.projection=shared", "head.adapter_rank=256", "trainer.autocast=null"]
ARGMAX = ["head.objective=distill", "head.distill_kind=argmax"]
FULL, CAND = "head.train_vocab=0", "head.train_vocab=4096"
OBJECTIVES = {
    "ce": ["head.objective=ce", *OWN, FULL, "trainer.lr=5e-4"],
    "distill-kl": ["head.objective=distill", "head.distill_kind=kl", *OWN, FULL, "trainer.lr=5e-4"],
    "distill-argmax": [*ARGMAX, *OWN, FULL, "trainer.lr=5e-4"],
    # the same objective with the candidate softmax (4,096 frequent tokens + the batch's targets)
    "distill-argmax-cand4096": [*ARGMAX, *OWN, CAND, "trainer.lr=5e-4"],
    "distill-argmax-cand4096-lr2e-3": [*ARGMAX, *OWN, CAND, "trainer.lr=2e-3"],
    # the model's own LM head, frozen; a rank-256 residual adapter + norm train (tiny heads, cheap steps)
    "distill-argmax-shared-a256": [*ARGMAX, *SHARED, CAND, "trainer.lr=5e-4"],
    "distill-argmax-shared-a256-lr2e-3": [*ARGMAX, *SHARED, CAND, "trainer.lr=2e-3"],
    "distill-argmax-shared-a256-lr1e-2": [*ARGMAX, *SHARED, CAND, "trainer.lr=1e-2"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="8,15,22")
    p.add_argument("--tokens", type=int, default=102_400, help="training tokens per run (data.max_train_tokens)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--runs", default=str(REPO / "outputs" / "compare_objectives"), help="the training runs' folder")
    add_output_args(p, "objectives")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = p.parse_args()
    results = {}
    for name in a.objectives.split(","):
        run_dir = Path(a.runs) / name
        if not (run_dir / "metrics.json").is_file():
            cmd = [sys.executable, "-m", "ppd_train", f"model={a.model}", f"head.layers=[{a.layers}]",
                   f"data.max_train_tokens={a.tokens}", f"output_dir={run_dir}", *OBJECTIVES[name], *a.overrides]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        results[name] = json.loads((run_dir / "metrics.json").read_text())
    layers = [int(x) for x in a.layers.split(",")]
    rows = []
    for name, m in results.items():
        for d in layers:
            rows.append({"objective": name, "layer": d, "top1": m["final"][f"val/top1_agree/layer{d}"],
                         "top5": m["final"][f"val/top5_agree/layer{d}"], "steps": m["steps"]})
    docs = output_dir(a)
    (docs / "objectives.json").write_text(json.dumps(
        {"model": a.model, "layers": layers, "train_tokens": a.tokens, "overrides": a.overrides, "rows": rows,
         "recipes": {n: OBJECTIVES[n] for n in results}},
        indent=1))
    lines = [f"Validation agreement with the final layer's top-1 ({a.model}, layers {a.layers}, dolly; training "
             f"steps per run in the last column; every run's overrides in objectives.json)", "",
             "| recipe | " + " | ".join(f"d={d} top-1 | d={d} top-5" for d in layers) + " | steps |",
             "|---|" + "---|---|" * len(layers) + "---|"]
    for n in results:
        rs = [next(r for r in rows if r["objective"] == n and r["layer"] == d) for d in layers]
        lines.append(f"| {n} | " + " | ".join(f"{r['top1']:.3f} | {r['top5']:.3f}" for r in rs) +
                     f" | {rs[0]['steps']} |")
    (docs / "objectives.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for n in results:
            ax.plot(layers, [r["top1"] for r in rows if r["objective"] == n], marker="o", label=f"{n} top-1")
            ax.plot(layers, [r["top5"] for r in rows if r["objective"] == n], marker="x", ls="--", label=f"{n} top-5")
        ax.set_xlabel("layer d")
        ax.set_ylabel("agreement with final top-1")
        ax.set_title(f"Head objectives, {a.model}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(docs / "objectives.png", dpi=120)
    except ImportError:
        pass
    finish(a, docs)


if __name__ == "__main__":
    from ppd_decode.errors import run_cli

    run_cli(main, "compare_objectives")
