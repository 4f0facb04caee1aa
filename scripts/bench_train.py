#!/usr/bin/env python
"""Head-training throughput: one head, five heads from one backbone forward, and five separate single-head runs,
on the same model, data and batch shape, in one process (the real DeepSpeed training step each time).

    python scripts/bench_train.py                       # SmolLM2-135M, layers 11,15,22,26,28, distill
    python scripts/bench_train.py --model tiny-random --layers 1,2,3 --steps 6   # a quick check

Per configuration: tokens/s = the median over logging windows after the first (the first holds warm-up).
Each setup (``--setups``: name=overrides;...; by default own heads with the full softmax and with the candidate
softmax over 4,096 frequent tokens + the batch's targets, heads that share the model's frozen LM head with a
rank-256 adapter, and the default frequent-rows heads in fp32 and under bf16 autocast) gets its three rows; costs are relative to one head of the same setup, and to one head of the first setup.
``--append`` adds this run's setups to the existing JSON (then the second ratio compares across runs).
Writes train.{json,md} under outputs/bench/<name>/; ``--publish`` copies them to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir

REPO = Path(__file__).resolve().parents[1]


def run(overrides: list[str], workdir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from ppd_train.trainer import CONFIGS, train

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    t0 = time.time()
    train(cfg, run_dir=workdir)
    wall = time.time() - t0
    hist = json.loads((workdir / "metrics.json").read_text())["history"]
    rates = [h["train/tokens_per_s"] for h in hist if "train/tokens_per_s" in h][1:]
    if not rates:
        raise SystemExit("too few steps to measure: raise --steps")
    return {"tokens_per_s": statistics.median(rates), "windows": len(rates), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="11,15,22,26,28")
    p.add_argument("--objective", default="distill", choices=["ce", "distill"])
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--setups", default=";".join([
        "full softmax=head.projection=own head.train_vocab=0 trainer.autocast=null",
        "candidate softmax 4096=head.projection=own head.train_vocab=4096 trainer.autocast=null",
        "shared LM head + adapter 256=head.projection=shared head.adapter_rank=256 head.train_vocab=4096 "
        "trainer.autocast=null",
        "frequent rows 4096 (default)=head.projection=frequent head.train_vocab=4096 trainer.autocast=null",
        "frequent rows 4096 + bf16 autocast=head.projection=frequent head.train_vocab=4096 trainer.autocast=bf16"]),
                   help="name=space-separated overrides;... (the first is the reference)")
    p.add_argument("--append", action="store_true", help="add to the run's train.json instead of replacing it")
    p.add_argument("--separate", action=argparse.BooleanOptionalAction, default=True,
                   help="also time five separate single-head runs")
    add_output_args(p, "train")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    import torch
    import transformers

    layers = [int(x) for x in a.layers.split(",")]
    base = [f"model={a.model}", f"head.objective={a.objective}", f"trainer.max_steps={a.steps}",
            f"trainer.log_every={a.log_every}", f"trainer.eval_every={10 ** 9}", f"trainer.save_every={10 ** 9}",
            "trainer.eval_blocks=1", "wandb.mode=disabled", *a.overrides]
    rows = []
    one_layer = layers[1 if len(layers) > 1 else 0]
    with tempfile.TemporaryDirectory() as tmp:
        for i, setup in enumerate(a.setups.split(";")):
            loss, _, extra = setup.partition("=")
            cfg = base + extra.split()
            one = run(cfg + [f"head.layers=[{one_layer}]"], Path(tmp) / f"one{i}")
            group = [{"config": f"1 head (layer {one_layer})", **one}]
            together = run(cfg + [f"head.layers=[{a.layers}]"], Path(tmp) / f"together{i}")
            group.append({"config": f"{len(layers)} heads, one pass", **together})
            if a.separate:
                # Separate runs: the same tokens once per head, so the combined rate is 1 / sum(1 / rate).
                sep = [run(cfg + [f"head.layers=[{d}]"], Path(tmp) / f"sep{i}_{d}") for d in layers]
                group.append({"config": f"{len(layers)} heads, separate runs",
                              "tokens_per_s": 1 / sum(1 / r["tokens_per_s"] for r in sep),
                              "windows": sep[0]["windows"], "wall_s": sum(r["wall_s"] for r in sep),
                              "per_layer": {d: r for d, r in zip(layers, sep)}})
            for r in group:
                r["setup"], r["overrides"] = loss, extra.split()
                r["cost_vs_one_head"] = group[0]["tokens_per_s"] / r["tokens_per_s"]
            rows += group
    docs = output_dir(a)
    if a.append and (docs / "train.json").is_file():
        rows = json.loads((docs / "train.json").read_text())["rows"] + rows
    ref = rows[0]["tokens_per_s"]
    for r in rows:
        r["cost_vs_first_setup_one_head"] = ref / r["tokens_per_s"]
    out = {"model": a.model, "objective": a.objective, "layers": layers, "steps": a.steps, "overrides": a.overrides,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "rows": rows, "target": "five heads in one pass cost at most 1.3x one head"}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "train.json").write_text(json.dumps(out, indent=1))
    lines = [f"Head training throughput, {a.model}, objective {a.objective} (median tokens/s over logging windows)",
             "", f"| setup | configuration | tokens/s | cost vs one head (same setup) | cost vs one head of "
             f"'{rows[0]['setup']}' |", "|---|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['config']} | {r['tokens_per_s']:.0f} | {r['cost_vs_one_head']:.2f}x | "
              f"{r['cost_vs_first_setup_one_head']:.2f}x |" for r in rows]
    (docs / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    finish(a, docs)


if __name__ == "__main__":
    from ppd_decode.errors import run_cli

    run_cli(main, "bench_train")
