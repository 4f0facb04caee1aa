"""The user-facing programs: ``ppd-generate`` (cli), ``ppd-load`` (load) and the demo's decoding step (demo)."""


def warm_up(strategy, tokenizer) -> None:
    """One short untimed generation before any timed one: a strategy's first call pays one-off setup (weights
    packed, kernels built for each block shape), which is not decoding speed. A short fixed prompt, so a long user
    prompt is not prefilled twice."""
    strategy.generate(tokenizer("Hello", return_tensors="pt").input_ids[0].tolist(), 4)
