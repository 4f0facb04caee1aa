"""The decoding step of ``make demo``: greedy next to exact self-speculative decoding and PPD with a trained head.

Loads the model (converting and caching it the first time), builds prompts for each evaluation task from the
local data (or the hub), decodes a few with plain greedy and, when ``heads=`` names a trained head, with
self-speculative decoding and the PPD engine on that head; prints the answers, checks they are token-identical and
shows the speed.
"""

from __future__ import annotations

import statistics
import time

import hydra
import torch
from omegaconf import DictConfig

from ppd_decode.data.prompts import build_prompts, context_length
from ppd_decode.data.tasks import TaskConfig, load_task
from ppd_decode.models.heads import load_heads
from ppd_decode.models.loading import load_model
from ppd_decode.strategies import get_strategy


@hydra.main(config_path="../../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.time()
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=cfg.model.device)
    print(f"model {cfg.model.spec}: {model.config.num_hidden_layers} layers, {model.dtype}, "
          f"loaded in {time.time() - t0:.1f}s")
    methods = {"greedy": get_strategy("greedy")(model)}
    if cfg.heads:
        heads = load_heads(cfg.heads, model, [cfg.layer] if cfg.layer else None)
        cls = get_strategy("self_speculative")
        layer = cfg.layer or max(heads)
        methods["self_speculative"] = cls(model, cls.Config(layer=layer, lookup=cfg.self_spec_lookup,
                                                             min_confidence=cfg.self_spec_min_confidence),
                                           heads={layer: heads[layer]})
        ppd = get_strategy("ppd")
        methods["ppd"] = ppd(model, ppd.Config(layer=layer, k=cfg.k, chain=cfg.ppd_chain), heads={layer: heads[layer]})
        methods["ppd"].engine.start()  # two worker processes, started once for all prompts
        print(f"self-speculative decoding drafts from the text"
              f"{'' if cfg.self_spec_lookup else ' (off)'} and with layers 1..{layer} + the trained head from "
              f"{cfg.heads} (where it is at least {cfg.self_spec_min_confidence} sure); "
              f"PPD splits the model at layer {layer} over two worker processes and guesses k={cfg.k} tokens"
              f"{f', the text guess with a chain of up to {cfg.ppd_chain}' if cfg.ppd_chain else ''}")
    warm = tok("Hello", return_tensors="pt").input_ids[0].tolist()
    for s in methods.values():  # one short untimed run each: first calls pay one-off setup, not decoding
        s.generate(warm, 4)
    speeds = {name: [] for name in methods}
    identical = 0
    total = 0
    for name, task_cfg in cfg.tasks.items():
        task = TaskConfig.from_dict(task_cfg)
        rows = load_task(task, n=cfg.n, source=cfg.source)
        prompts, report = build_prompts(rows, tok, max_new_tokens=cfg.max_new_tokens,
                                        context_length=context_length(model))
        print(f"\n=== {name} ({rows.source}) — {report}")
        for p in prompts:
            results = {m: s.generate(p.input_ids, cfg.max_new_tokens) for m, s in methods.items()}
            ref = results["greedy"]
            ref_text = p.reference[0] if isinstance(p.reference, list) else p.reference
            print(f"\n[{p.id}] {len(p.input_ids)} prompt tokens")
            print(f"  output:    {tok.decode(ref.tokens, skip_special_tokens=True).strip()!r}")
            print(f"  reference: {str(ref_text).strip()[:200]!r}")
            for m, r in results.items():
                speeds[m].append(len(r.tokens) / r.seconds)
                extra = ""
                if m != "greedy":
                    same = r.tokens == ref.tokens
                    identical += same
                    total += 1
                    extra = (f", {r.accepted}/{r.drafted} guesses matched, identical to greedy: "
                             f"{'yes' if same else 'NO'}")
                print(f"  {m:17s} {len(r.tokens)} tokens in {r.seconds:.2f}s ({len(r.tokens) / r.seconds:.1f} tok/s{extra})")
    for s in methods.values():
        if hasattr(s, "close"):
            s.close()
    print("\n=== summary")
    for m, v in speeds.items():
        print(f"  {m:17s} mean {statistics.mean(v):.1f} tok/s over {len(v)} prompts")
    if total:
        print(f"  self-speculative and PPD outputs identical to greedy on {identical}/{total} runs")


if __name__ == "__main__":
    main()
