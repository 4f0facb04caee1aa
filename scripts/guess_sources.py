"""How often each guess source holds the greedy token: an early head's top k (over the whole vocabulary or its shortlist
of trained frequent rows), prompt lookup alone, and the two together as PPD combines them (lookup first, the head
fills the rest), and how the head's confidence (its top-1 probability over the shortlist) sorts right guesses from
wrong ones: what self-speculation's ``min_confidence`` stop relies on. A head that reads f(t-1) is given it as the
stage-pipelined deployment has it (every position but the first). Writes <name>.{json,md} under
outputs/bench/<name>/; ``--publish`` copies them to docs/benchmarks/.

Two columns bound what a ranking that reads the text (the copied token as a head input or a bias) could add to these
two sources: "lookup first, top-1" is PPD's first guess today, "lookup or shortlist top-1" the share of positions
where either source's first guess is right, which no ordering of the two first guesses can exceed; PPD's k guesses
already hold both.

    python scripts/guess_sources.py --heads shipped --layers 13,15 --per-set 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir, provenance

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default="shipped", help="a heads directory (training output), or 'shipped'")
    p.add_argument("--layers", default="11,15,22")
    p.add_argument("--sets", default="squad,wmt15,cnn_dailymail,mt_bench")
    p.add_argument("--per-set", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="override every task's prompt budget")
    p.add_argument("--k", type=int, default=4, help="guesses per token (PPD's k)")
    p.add_argument("--head-first", default="0.5,0.7,0.9",
                   help="confidences at which the head's top-1 goes before the text's guess: one 'head first if "
                        "sure' column each")
    add_output_args(p, "guess_sources")
    a = p.parse_args()

    from tqdm import tqdm

    from ppd_decode.data.prompts import load_prompts
    from ppd_decode.evaluation.match_rate import FINAL, greedy_continuations
    from ppd_decode.models.catalog import choose_heads
    from ppd_decode.models.heads import previous_states, ranked_size
    from ppd_decode.models.loading import load_model
    from ppd_decode.runtime.text_guesses import NextTokenLookup, merge_guesses

    model, tok = load_model(a.model)
    layers = [int(x) for x in a.layers.split(",")]
    choice = choose_heads(a.heads, model, layers)
    heads = choice.heads
    reads_prev = any(h.reads_prev for h in heads.values())
    k = a.k
    thresholds = (0.3, 0.5, 0.7, 0.9)
    firsts = [float(x) for x in a.head_first.split(",") if x]
    sources = ["head top-1", f"head top-{k}", "shortlist top-1", f"shortlist top-{k}", "lookup",
               "lookup first, top-1", *(f"head first if >= {c}, top-1" for c in firsts),
               "lookup or shortlist top-1", f"lookup + shortlist top-{k - 1}"]
    pv = provenance("python scripts/guess_sources.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]), model.device)
    report = {**pv, "model": a.model, "heads": choice.label, "k": k, "max_new_tokens": a.max_new_tokens,
              "inputs": {d: list(heads[d].inputs) for d in layers},
              "shortlist_rows": {d: ranked_size(heads[d]) for d in layers}, "sets": {}}
    for s in a.sets.split(","):
        ps, _ = load_prompts(s, tok, n=a.per_set, source="local", max_new_tokens=a.max_new_tokens,
                             max_prompt_tokens=a.max_prompt_tokens,  # (None: each task's own budget)
                             context_length=model.config.max_position_embeddings)
        prompts = [x.input_ids for x in ps]
        conts, states = greedy_continuations(model, prompts, a.max_new_tokens, batch_size=8, capture_layers=layers,
                                             capture_final=reads_prev,
                                             progress=tqdm(total=len(prompts), desc=f"{s}: greedy", leave=False))
        hits = {d: dict.fromkeys(sources, 0) for d in layers}
        sure = {d: {t: [0, 0] for t in thresholds} for d in layers}  # positions at or above t, right ones among them
        positions = sum(map(len, conts))
        with torch.no_grad():
            for prompt, cont, st in zip(prompts, conts, states):
                if not cont:
                    continue
                prev, known = previous_states(st[FINAL]) if reads_prev else (None, None)
                target = torch.tensor(cont)
                lookup = NextTokenLookup()
                lookup.extend(prompt)
                found = []
                for y in cont:  # the lookup's guess for each position, from the text before it
                    found.append(lookup.candidates(1))
                    lookup.extend([y])
                for d in layers:
                    head = heads[d]
                    fp = (prev, known) if head.reads_prev else (None, None)
                    full = head(st[d], *fp).topk(k, dim=-1).indices.tolist()
                    top, probs = head.ranked(st[d], k, *fp)  # the ranking decoding uses (its shortlist)
                    short = top.tolist()
                    top1, conf = top[:, 0], probs[:, 0]
                    for t in thresholds:
                        above = conf >= t
                        sure[d][t][0] += int(above.sum())
                        sure[d][t][1] += int((above & (top1 == target)).sum())
                    for y, f, sh, lk, c in zip(cont, full, short, found, conf.tolist()):
                        h = hits[d]
                        h["head top-1"] += y == f[0]
                        h[f"head top-{k}"] += y in f
                        h["shortlist top-1"] += y == sh[0]
                        h[f"shortlist top-{k}"] += y in sh
                        h["lookup"] += y in lk
                        merged = merge_guesses(lk, sh, k)
                        h["lookup first, top-1"] += y == merged[0]
                        for t in firsts:
                            h[f"head first if >= {t}, top-1"] += y == (sh[0] if c >= t else merged[0])
                        h["lookup or shortlist top-1"] += y in lk or y == sh[0]
                        h[f"lookup + shortlist top-{k - 1}"] += y in merged
        report["sets"][s] = {"positions": positions,
                             "rates": {d: {src: n / max(1, positions) for src, n in hits[d].items()} for d in layers},
                             # per threshold: the share of positions where the head is at least that sure, and how
                             # often its top-1 is right there
                             "confidence": {d: {t: {"coverage": n / max(1, positions), "precision": r / max(1, n)}
                                                for t, (n, r) in sure[d].items()} for d in layers}}
        print(s, positions, "positions", flush=True)

    docs = output_dir(a)
    (docs / f"{a.name}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Guess sources: how often the greedy token is among the guesses ({a.model}, {a.per_set} prompts per set, "
             f"up to {a.max_new_tokens} greedy tokens, heads {report['heads']})", "",
             f"`{report['command']}`; {report['machine']['cpu']}, {report['date']}, commit {report['commit']}.", "",
             "`shortlist`: the ranking decoding uses, over the head's trained frequent rows "
             f"({', '.join(f'{n} at d={d}' for d, n in report['shortlist_rows'].items())}); heads that read f(t-1) "
             "are given it at every position but the first, as the stage-pipelined deployment has it. `lookup`: the "
             "token that followed the text's last 1-3 tokens before. `lookup first, top-1`: PPD's first guess; "
             "`head first if >= c`: the head's top-1 where its confidence is at least c, else PPD's first guess; "
             "`lookup or shortlist top-1`: either source's first guess is right (no ordering of the two "
             f"can do better at top-1); the last column is PPD's default guess set (k = {k}).", "",
             "| set | d | positions | " + " | ".join(sources) + " |", "|---|---|---|" + "---|" * len(sources)]
    for s, r in report["sets"].items():
        for d in layers:
            lines.append(f"| {s} | {d} | {r['positions']} | " +
                         " | ".join(f"{r['rates'][d][src]:.3f}" for src in sources) + " |")
    lines += ["", "The head's confidence (top-1 probability over its shortlist): share of positions at or above each "
              "threshold / how often its top-1 is the greedy token there.", "",
              "| set | d | " + " | ".join(f">= {t}" for t in thresholds) + " |", "|---|---|" + "---|" * len(thresholds)]
    for s, r in report["sets"].items():
        for d in layers:
            c = r["confidence"][d]
            lines.append(f"| {s} | {d} | " + " | ".join(f"{c[t]['coverage']:.2f} / {c[t]['precision']:.2f}"
                                                        for t in thresholds) + " |")
    (docs / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    finish(a, docs)


if __name__ == "__main__":
    from ppd_decode.errors import run_cli

    run_cli(main, "guess_sources")
