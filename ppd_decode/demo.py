"""``make demo``: the main job on the embedded default, end to end (grows as the pipeline grows).

Today: load the model (converting and caching it the first time), build prompts for each evaluation task from
the local data (or the hub), greedy-decode a few of them and print the answers next to the references.
"""

from __future__ import annotations

import time

import hydra
import torch
from omegaconf import DictConfig

from .modeling import load_model
from .prompts import build_prompts, context_length
from .tasks import TaskConfig, load_task


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.time()
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=cfg.model.device)
    print(f"model {cfg.model.spec}: {model.config.num_hidden_layers} layers, {model.dtype}, "
          f"loaded in {time.time() - t0:.1f}s")
    for name, task_cfg in cfg.tasks.items():
        task = TaskConfig.from_dict(task_cfg)
        rows = load_task(task, n=cfg.n, source=cfg.source)
        prompts, report = build_prompts(rows, tok, max_new_tokens=cfg.max_new_tokens,
                                        context_length=context_length(model))
        print(f"\n=== {name} ({rows.source}) — {report}")
        for p in prompts:
            ids = torch.tensor([p.input_ids], device=model.device)
            t = time.time()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:]
            dt = time.time() - t
            ref = p.reference[0] if isinstance(p.reference, list) else p.reference
            print(f"\n[{p.id}] {len(p.input_ids)} prompt tokens, {len(new)} new in {dt:.1f}s "
                  f"({len(new) / dt:.1f} tok/s)")
            print(f"  output:    {tok.decode(new, skip_special_tokens=True).strip()!r}")
            print(f"  reference: {str(ref).strip()[:200]!r}")


if __name__ == "__main__":
    main()
