#!/usr/bin/env python
"""Copy a training run's heads into the package (ppd_decode/models/shipped_heads/<name>/), in fp16.

    python scripts/ship_heads.py --heads outputs/train/<run>/heads --name smollm2-135m --layers 13,15,22 \\
        --command "make train LAYERS=13,15,22 ARGS='...'" [--match-rates outputs/eval/.../match_rate.json] \\
        [--answers ~/.cache/ppd/self_distill/<name>.jsonl,...]

Each head keeps its directory format (config.json + model.safetensors); floating-point tensors are stored in fp16
(they load into the model's dtype), token ids as they are. Every config.json gains a ``shipped`` record (the
command that trained the run, the commit, the source run), and README.md beside the heads says what they are
and, with ``--match-rates``, what they measure (an evaluation report's rates for these heads).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import torch

from ppd_decode.errors import HeadMismatchError, run_cli
from ppd_decode.evaluation.artifacts import git_commit
from ppd_decode.models.catalog import SHIPPED
from ppd_decode.models.heads import head_dirs, read_head_config


def ship(src: Path, dst: Path, record: dict) -> int:
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(half, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = read_head_config(src)
    cfg.update({"dtype": "float16", "shipped": record})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return (dst / "model.safetensors").stat().st_size


def _count(path: Path) -> int:
    with gzip.open(path, "rt") as f:
        return sum(1 for _ in f)


def readme(name: str, heads: dict[int, dict], record: dict, rates: dict | None, answers: list[Path] = (),
           label: str | None = None) -> str:
    lines = [f"# Shipped heads for {name}", "",
             "Loaded by default by `ppd-generate`, the decode benchmark and the demo when the model they load is the "
             "one these heads were trained for (`--heads lens` decodes with the untrained logit lens instead).", "",
             f"- trained by: `{record['command']}`",
             f"- shipped at commit {record['commit']} from the run `{record['source_run']}`",
             "- weights: fp16 (loaded into the model's dtype)",
             "- `decode.json`: the drafting layer of rows that name none (`layer`) and per-row layers (`rows`); a "
             "layer the user sets wins",
             *([f"- `self_distill/`: the model's greedy answers, by prompt hash, to the prompts of the "
                f"self-distillation caches ({', '.join(f'{a.name}: {_count(a)} prompts' for a in answers)}; "
                "the heads trained on the first `data.self_distill.num_prompts` of them and validated on the "
                "`-val` file); training with the same data settings reads them instead of generating them"]
               if answers else []), "",
             "| layer | reads | projection | adapter rank | objective | data | size (MB) | validation top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for d, c in sorted(heads.items()):
        m = c.get("metrics") or {}
        agree = m.get("val_top1_agree")
        lines.append(f"| {d} | {', '.join(c.get('inputs') or ['h_d'])} | "
                     f"{c.get('projection')} | {c.get('adapter_rank') or 0} | {c.get('objective')}"
                     f"{'-' + c['distill_kind'] if c.get('distill_kind') else ''} | {c.get('data', '')} | "
                     f"{c['_bytes'] / 1e6:.1f} | {agree if agree is None else f'{agree:.3f}'} |")
    if rates:
        ks = rates["ks"]
        lines += ["", f"Match rates on the model's own greedy outputs ({rates['n']} prompts per task, up to "
                      f"{rates['max_new_tokens']} tokens, ranked as decoding ranks: over the trained rows), "
                      f"`{record.get('eval_command') or 'python -m ppd_decode.evaluation'}`, "
                      f"{record.get('eval_when', '')}:", "",
                  "| task | layer | " + " | ".join(f"p@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
        for task, t in rates["tasks"].items():
            for r in t.get("rates", []):
                if r["head"] != "lens" and r["layer"] in heads and label in (None, r["head"]):
                    lines.append(f"| {task} | {r['layer']} | " + " | ".join(f"{r[f'p@{k}']:.3f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def main(a) -> None:
    found = head_dirs(a.heads)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else sorted(found)
    missing = [d for d in layers if d not in found]
    if missing:
        raise HeadMismatchError(f"{a.heads} has no heads for layers {missing}. Fix: pick from {sorted(found)}.")
    out = SHIPPED / a.name
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": a.command, "commit": git_commit(), "source_run": str(Path(a.heads).resolve().parent.name),
              **({"eval_command": a.eval_command, "eval_when": a.eval_when} if a.eval_command else {})}
    configs = {}
    for d in layers:
        size = ship(found[d], out / f"layer{d}", record)
        configs[d] = {**read_head_config(out / f"layer{d}"), "_bytes": size}
    for stale in out.glob("layer*"):
        if stale.is_dir() and int(stale.name[5:]) not in layers:
            shutil.rmtree(stale)
    for cache in filter(None, (a.answers or "").split(",")):  # the run's self-distilled data, for fresh machines
        from ppd_train.data import write_shipped_answers

        (out / "self_distill").mkdir(exist_ok=True)
        print(f"shipped the answers of {cache} to {write_shipped_answers(Path(cache), out / 'self_distill')}")
    rates = json.loads(Path(a.match_rates).read_text()) if a.match_rates else None
    answers = sorted((out / "self_distill").glob("*.jsonl.gz"))
    (out / "README.md").write_text(readme(a.name, configs, record, rates, answers, a.eval_label))
    total = sum(c["_bytes"] for c in configs.values())
    print(f"shipped {len(layers)} heads ({total / 1e6:.1f} MB) to {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", required=True, help="a training run's heads/ directory")
    p.add_argument("--name", required=True, help="the folder under ppd_decode/models/shipped_heads/")
    p.add_argument("--layers", default=None, help="which heads (default: all)")
    p.add_argument("--command", required=True, help="the command that trained the run (recorded with the heads)")
    p.add_argument("--match-rates", default=None, help="an evaluation report (match_rate.json) for the README")
    p.add_argument("--eval-command", default=None, help="the command that produced --match-rates")
    p.add_argument("--eval-when", default="", help="its date, machine and commit, for the README")
    p.add_argument("--eval-label", default=None,
                   help="the label of these heads in --match-rates, where it scored other trained heads beside them")
    p.add_argument("--answers", default=None,
                   help="self-distillation caches the run read (comma-separated; ~/.cache/ppd/self_distill/*.jsonl): "
                        "shipped as answers by prompt hash, so training on a fresh machine skips their generation")
    torch.set_num_threads(1)
    run_cli(main, "ship_heads.py", p.parse_args())
