"""``ppd-generate``: decode one prompt with any decoding row (configs/decode.yaml), streaming text as it is decided.

    ppd-generate --heads outputs/train/smollm2-135m-L15-distill-argmax/heads --prompt "Who wrote Hamlet?"
    ppd-generate --method self_speculative_text --heads ... --check   # also run greedy and compare token ids
    ppd-generate --heads ... decode.ppd.k=2 decode.ppd.chain=0        # any field of the row's config
"""

from __future__ import annotations

import argparse
import sys

from ppd_decode.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default="shipped",
                   help="a trained heads directory, 'shipped' (default: the heads that come with ppd for this model, "
                        "else the logit lens) or 'lens' (the untrained logit lens)")
    p.add_argument("--layer", type=int, default=None,
                   help="the head a drafting row uses when it names no layer (default: the deepest head)")
    p.add_argument("--method", default="ppd", help="a row of configs/decode.yaml (or one added by an override)")
    p.add_argument("overrides", nargs="*", metavar="decode.ROW.FIELD=VALUE",
                   help="set any field of a row's config, e.g. decode.ppd.k=2 (values parsed as YAML)")
    p.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--check", action="store_true", help="compare with plain greedy, token for token")
    a = p.parse_args(argv)
    run_cli(run, "ppd-generate", a)  # a user's mistake: one line that names the fix, not a traceback


def run(a: argparse.Namespace) -> None:
    from ppd_decode.apps import warm_up
    from ppd_decode.data.prompts import encode_chat
    from ppd_decode.models.catalog import choose_heads
    from ppd_decode.models.loading import load_model
    from ppd_decode.runtime.timing import stopwatch
    from ppd_decode.strategies import get_strategy
    from ppd_decode.strategies.configs import fill_layer, rows

    row = rows([a.method], a.overrides)[0]  # bad settings fail before the model loads
    model, tok = load_model(a.model)
    heads, heads_label = None, None
    if row.cls.needs_heads:
        choice = choose_heads(a.heads, model, [a.layer] if a.layer else None)
        heads = choice.heads
        # a head for another layer is refused by the strategy
        fill_layer([row], a.layer or choice.layer or max(heads), None if a.layer else choice.row_layers)
        heads_label = choice.label
    ids = encode_chat(tok, a.prompt)
    with row.build(model, heads) as strategy:
        strategy.check_request(ids, a.max_new_tokens)
        shown = ""
        decided: list[int] = []

        def stream(t: int) -> None:
            nonlocal shown
            decided.append(t)
            text = tok.decode(decided, skip_special_tokens=True)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

        engine = getattr(strategy, "engine", None)  # the PPD engine streams tokens as B decides them
        if engine is not None:
            engine.start()  # workers start once (a few seconds); the timing below is generation only
        warm_up(strategy, tok)  # (the line below reports decoding speed, not a first call's setup)
        with stopwatch(model.device) as clock:
            if engine is not None:
                res = engine.generate(ids, a.max_new_tokens, on_token=stream)
            else:
                res = strategy.generate(ids, a.max_new_tokens)
                for t in res.tokens:
                    stream(t)
        dt = clock.seconds
        print(f"\n\n[{a.method}] {len(res.tokens)} tokens in {dt:.2f}s ({len(res.tokens) / dt:.1f} tok/s)", end="")
        if heads_label:
            print(f"; heads: {heads_label}, layer {row.config.layer}", end="")
        if res.drafted:
            print(f"; {res.accepted}/{res.drafted} guesses matched", end="")
        if getattr(res.stats, "fallback", None):
            print(f"; a worker failed, finished sequentially: {res.stats.fallback.splitlines()[0]}", end="")
        print()
        if a.check:
            greedy = get_strategy("greedy")(model)
            warm_up(greedy, tok)  # (so the two speeds compare)
            ref = greedy.generate(ids, a.max_new_tokens)
            same = ref.tokens == res.tokens
            print(f"identical to greedy: {'yes' if same else 'NO'} (greedy: {len(ref.tokens) / ref.seconds:.1f} tok/s)")


if __name__ == "__main__":
    main()
