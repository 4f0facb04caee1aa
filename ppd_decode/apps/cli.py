"""``ppd-generate``: decode one prompt with any registered method, streaming text as it is decided.

    ppd-generate --heads outputs/train/smollm2-135m-L15-distill-argmax/heads --prompt "Who wrote Hamlet?"
    ppd-generate --method self_speculative --heads ... --check      # also run greedy and compare token ids
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", default=None, help="trained heads directory (default: the untrained logit lens)")
    p.add_argument("--layer", type=int, default=None, help="split / draft layer d (default: the deepest head)")
    p.add_argument("--k", type=int, default=4, help="PPD guesses per token")
    p.add_argument("--lookup", type=int, default=1, help="PPD: how many of the k guesses come from prompt lookup "
                                                         "(0: the head's top k only)")
    p.add_argument("--method", default="ppd")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any field of the method's config, e.g. --set lookup=true --set min_confidence=0.5 "
                        "(values parsed as JSON where they can be)")
    p.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--check", action="store_true", help="compare with plain greedy, token for token")
    a = p.parse_args(argv)

    from ppd_decode.data.prompts import encode_chat
    from ppd_decode.models.heads import EarlyExitHead, load_heads
    from ppd_decode.models.loading import load_model
    from ppd_decode.strategies import get_strategy

    model, tok = load_model(a.model)
    cls = get_strategy(a.method)
    kwargs = {}
    if cls.needs_heads:
        if a.heads:
            heads = load_heads(a.heads, model, [a.layer] if a.layer else None)
        else:
            d = a.layer or model.config.num_hidden_layers // 2
            heads = {d: EarlyExitHead.from_model(model, d)}
        layer = a.layer or max(heads)
        kwargs["heads"] = {layer: heads[layer]}
        config = cls.Config(layer=layer, **({"k": a.k, "lookup": a.lookup} if a.method == "ppd" else {}))
    else:
        config = cls.Config()
    for item in a.set:
        field, _, value = item.partition("=")
        if not hasattr(config, field):
            fields = ", ".join(f for f in vars(config))
            p.error(f"--set {item}: {a.method}'s config has no field {field!r} (it has: {fields})")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a plain string
        setattr(config, field, value)
    strategy = cls(model, config=config, **kwargs)
    ids = encode_chat(tok, a.prompt)
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

    if a.method == "ppd":
        strategy.engine.start()  # workers start once (a few seconds); the timing below is generation only
    t0 = time.perf_counter()
    if a.method == "ppd":
        res = strategy.engine.generate(ids, a.max_new_tokens, on_token=stream)
    else:
        res = strategy.generate(ids, a.max_new_tokens)
        for t in res.tokens:
            stream(t)
    dt = time.perf_counter() - t0
    print(f"\n\n[{a.method}] {len(res.tokens)} tokens in {dt:.2f}s ({len(res.tokens) / dt:.1f} tok/s)", end="")
    if res.drafted:
        print(f"; {res.accepted}/{res.drafted} guesses matched", end="")
    if res.extra.get("fallback"):
        print(f"; a worker failed, finished sequentially: {res.extra['fallback'].splitlines()[0]}", end="")
    print()
    if a.check:
        ref = get_strategy("greedy")(model).generate(ids, a.max_new_tokens)
        same = ref.tokens == res.tokens
        print(f"identical to greedy: {'yes' if same else 'NO'} (greedy: {len(ref.tokens) / ref.seconds:.1f} tok/s)")
    if hasattr(strategy, "close"):
        strategy.close()


if __name__ == "__main__":
    main()
