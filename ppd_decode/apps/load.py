"""``ppd-load``: load a model spec and greedy-answer one question."""

from __future__ import annotations

import argparse
import time

import torch

from ppd_decode.data.prompts import encode_chat
from ppd_decode.errors import run_cli
from ppd_decode.models.loading import DEFAULT_MODEL, load_model


def main(argv: list[str] | None = None) -> None:
    """``ppd-load``: load a model spec and greedy-answer one question (a smoke test of the loading path)."""
    run_cli(_main, "ppd-load", argv)


def _main(argv: list[str] | None = None) -> None:
    """Load a model spec and greedy-answer one question (a smoke test of the whole loading path)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(a.model, dtype=a.dtype, device=a.device)
    print(f"loaded {a.model} ({model.config.num_hidden_layers} layers, {model.dtype}) in {time.time() - t0:.1f}s")
    ids = torch.tensor([encode_chat(tok, a.prompt)], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
