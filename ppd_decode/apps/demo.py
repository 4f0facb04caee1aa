"""The decoding step of ``make demo``: greedy next to exact self-speculative decoding and PPD with a trained head.

Loads the model (converting and caching it the first time), builds prompts for each evaluation task from the
local data (or the hub), decodes a few with plain greedy and with self-speculative decoding and the PPD engine on
a head: ``heads=`` names a trained head (``make demo`` passes the one it just trained, and the head shipped with
ppd for this model runs beside it, rows marked ``@shipped``), and by default the shipped heads; prints the
answers, checks they are token-identical and shows the speed.
"""

from __future__ import annotations

import statistics
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ppd_decode.apps import warm_up
from ppd_decode.data.prompts import build_prompts, context_length
from ppd_decode.data.tasks import TaskConfig, load_task
from ppd_decode.errors import PPDError
from ppd_decode.models.catalog import choose_heads
from ppd_decode.models.loading import load_model
from ppd_decode.strategies.configs import rows as decode_rows


@hydra.main(config_path="../../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.time()
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=cfg.model.device)
    print(f"model {cfg.model.spec}: {model.config.num_hidden_layers} layers, {model.dtype}, "
          f"loaded in {time.time() - t0:.1f}s")
    # the rows of configs/decode.yaml (with this run's decode.ROW.FIELD=VALUE overrides) named by `methods`
    table = OmegaConf.to_container(cfg.decode, resolve=True)
    heads, layer, label = {}, None, None
    if cfg.heads:
        choice = choose_heads(cfg.heads, model, [cfg.layer] if cfg.layer else None)
        if choice.path is not None:  # no shipped heads for this model: drafting methods are left out
            heads, label = choice.heads, choice.label
            layer = cfg.layer or choice.layer or max(heads)
    chosen = decode_rows(list(cfg.methods), base=table, layer=layer)
    if chosen[0].cls.name != "greedy":
        raise PPDError(f"the demo's first method is its reference: methods=[greedy, ...], not {cfg.methods[0]!r}")
    # The head this run trained, and beside it the one shipped with ppd for this model (same layer, same rows).
    shipped = {}
    if cfg.compare_shipped and heads and str(cfg.heads) not in ("shipped", "lens"):
        other = choose_heads("shipped", model)
        if other.path is not None and layer in other.heads:
            shipped = {layer: other.heads[layer]}
    methods = {}
    for row in chosen:
        if row.cls.needs_heads and not heads:
            continue  # drafting methods need heads
        for suffix, bank in (("", heads), ("@shipped", shipped)):
            if suffix and not (row.cls.needs_heads and bank):
                continue
            name = row.name + suffix
            methods[name] = row.build(model, bank)
            if name != chosen[0].name:
                print(f"{name}: {row.cls.name}" + (f" ({row.label})" if row.label else ""))
            engine = getattr(methods[name], "engine", None)
            if engine is not None:
                engine.start()  # two worker processes, started once for all prompts
    if heads:
        print(f"drafting with layers 1..{layer} + the head from {label}"
              + (" (rows marked @shipped: the head shipped with ppd)" if shipped else ""))
    for s in methods.values():
        warm_up(s, tok)
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
            ref = results[chosen[0].name]
            ref_text = p.reference[0] if isinstance(p.reference, list) else p.reference
            print(f"\n[{p.id}] {len(p.input_ids)} prompt tokens")
            print(f"  output:    {tok.decode(ref.tokens, skip_special_tokens=True).strip()!r}")
            print(f"  reference: {str(ref_text).strip()[:200]!r}")
            for m, r in results.items():
                speeds[m].append(len(r.tokens) / r.seconds)
                extra = ""
                if m != chosen[0].name:
                    same = r.tokens == ref.tokens
                    identical += same
                    total += 1
                    extra = (f", {r.accepted}/{r.drafted} guesses matched, identical to greedy: "
                             f"{'yes' if same else 'NO'}")
                print(f"  {m:24s} {len(r.tokens)} tokens in {r.seconds:.2f}s ({len(r.tokens) / r.seconds:.1f} tok/s{extra})")
    for s in methods.values():
        s.close()
    print("\n=== summary")
    for m, v in speeds.items():
        print(f"  {m:24s} mean {statistics.mean(v):.1f} tok/s over {len(v)} prompts")
    if total:
        print(f"  {', '.join(m for m in methods if m != chosen[0].name)}: outputs identical to greedy on "
              f"{identical}/{total} runs")


if __name__ == "__main__":
    main()
