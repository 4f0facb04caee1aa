"""One interface for every decoding method: a config dataclass, a strategy class, a registry by name.

A strategy is built once for a model (and, where it drafts, its early-exit heads) and then serves many prompts:
``strategy.generate(prompt_ids, max_new_tokens)`` returns the new tokens and statistics. Every registered strategy
must be token-identical to ``model.generate(do_sample=False)``; the exactness tests and the benchmark iterate over
the registry, so registering a method is all it takes to have it tested and measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from ppd_decode.errors import HeadMismatchError, PPDError, PromptTooLongError
from ppd_decode.models.heads import H_D, check_layer
from ppd_decode.runtime.stack import eos_ids
from ppd_decode.runtime.timing import stopwatch

REGISTRY: dict[str, type["DecodingStrategy"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str) -> type["DecodingStrategy"]:
    if name not in REGISTRY:
        raise PPDError(f"unknown decoding strategy {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def pick_head(strategy: "DecodingStrategy", layer: int | None):
    """The (layer, head) a drafting strategy uses: ``layer``, or the only head given; a clear error otherwise."""
    if not strategy.heads:
        raise HeadMismatchError(f"{strategy.name} needs an early-exit head: pass heads={{d: head}} "
                                f"(ppd_decode.models.heads.load_heads) or train one with `make train LAYER=d`")
    if layer is None:
        if len(strategy.heads) != 1:
            raise HeadMismatchError(f"several heads given ({sorted(strategy.heads)}): set config.layer to one of them")
        layer = next(iter(strategy.heads))
    if layer not in strategy.heads:
        raise HeadMismatchError(f"no head for layer {layer}; heads given: {sorted(strategy.heads)}. Fix: set the "
                                f"method's layer to one of them, or train one with `make train LAYER={layer}`")
    check_layer(strategy.model, layer)
    head = strategy.heads[layer]
    missing = [x for x in getattr(head, "inputs", (H_D,)) if x not in strategy.head_inputs]
    if missing:
        able = sorted(n for n, c in REGISTRY.items() if c.needs_heads and set(head.inputs) <= set(c.head_inputs))
        raise HeadMismatchError(f"the head at layer {layer} reads {missing} (f_prev: the final layer's state at the "
                                f"previous position; h_d_prefix: its layer's states at every earlier position), "
                                f"which {strategy.name} does not supply. Fix: decode with {', '.join(able)}, or use "
                                f"a head trained without head.reads_prev and head.block")
    return layer, head


@dataclass
class Stats:
    """A method's own per-request statistics; each strategy declares its subclass (``Strategy.Stats``) with typed
    fields. ``merge`` adds requests up field by field: numbers add, lists extend, dicts of numbers add key by key,
    anything else keeps the latest value that is not None."""

    def merge(self, other: "Stats") -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, bool) or not isinstance(mine, (int, float, list, dict)):
                if theirs is not None:
                    setattr(self, f.name, theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, f.name, _add(mine, theirs))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _add(a, b):
    """a + b, key by key for (nested) dicts of numbers; never changes either argument."""
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    return a + b


@dataclass
class DecodeResult:
    tokens: list[int]  # the new tokens only (EOS included when generation stopped on it)
    steps: int = 0  # forward passes of the full model (verification steps for drafting methods)
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    stats: Stats = field(default_factory=Stats)  # the method's own statistics (its ``Stats`` subclass)

    @property
    def mean_accepted_tokens(self) -> float:
        """New tokens per full-model step (1.0 for plain greedy)."""
        return len(self.tokens) / self.steps if self.steps else 0.0


@dataclass
class Totals:
    """One benchmark row's decodes added up (what ``DecodingStrategy.summary`` reads)."""

    tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    wall_s: float = 0.0
    prompts: int = 0
    stats: Stats | None = None
    tokens_per_s: float = 0.0  # the row's measured speed (mean over runs)

    def add(self, res: DecodeResult) -> None:
        self.tokens += len(res.tokens)
        self.steps += res.steps
        self.drafted += res.drafted
        self.accepted += res.accepted
        self.wall_s += res.seconds
        self.prompts += 1
        if self.stats is None:
            self.stats = type(res.stats)()
        self.stats.merge(res.stats)


class DecodingStrategy:
    """Build once for a model (and its heads), then ``generate`` many prompts; ``close()`` (or a ``with`` block)
    releases what the strategy holds (worker processes). What a method can do is declared, not discovered."""

    name: ClassVar[str]
    Config: ClassVar[type] = None  # a dataclass
    Stats: ClassVar[type[Stats]] = Stats  # the typed statistics every DecodeResult of this method carries
    needs_heads: ClassVar[bool] = False  # drafts with early-exit heads: pass heads={layer: head}
    spawns_workers: ClassVar[bool] = False  # runs worker processes (released by close())
    batched: ClassVar[bool] = False  # also decodes several prompts together: generate_batch(prompts, n)
    # what the method can feed a head (ppd_decode.models.heads.INPUTS); pick_head refuses a head that reads more
    head_inputs: ClassVar[tuple[str, ...]] = (H_D,)

    def __init__(self, model, config=None, heads: dict | None = None, tokenizer=None):
        self.model = model
        self.config = config if config is not None else self.Config()
        self.heads = heads or {}
        self.tokenizer = tokenizer
        gen = model.generation_config
        self.eos = eos_ids(model)
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else next(iter(self.eos), 0)

    def check_request(self, prompt_ids, max_new_tokens: int) -> torch.Tensor:
        """Refuse a bad request before any work."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise PPDError("one prompt at a time (batch size 1)")
            ids = ids[0]
        if ids.numel() == 0:
            raise PPDError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise PPDError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ctx = getattr(self.model.config, "max_position_embeddings", None)
        if ctx is not None and ids.numel() + max_new_tokens > ctx:
            raise PromptTooLongError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                     f"model's context of {ctx}. Fix: shorten the prompt or lower max_new_tokens.")
        return ids.to(self.model.device)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, reference: list[int] | None = None) -> DecodeResult:
        """``reference``: the greedy continuation, for a strategy that ``wants_reference`` (benchmarking's oracle)."""
        ids = self.check_request(prompt_ids, max_new_tokens)
        if (reference is not None) != self.wants_reference():
            raise PPDError(f"{self.name}: a greedy reference goes with an oracle guess source (oracle_p) only")
        with stopwatch(self.model.device) as t:
            result = self._generate(ids, max_new_tokens) if reference is None else \
                self._generate(ids, max_new_tokens, reference=reference)
        result.seconds = t.seconds
        return result

    def wants_reference(self) -> bool:
        """True where the method guesses from the greedy reference (benchmarking only: PPD's ``oracle_p``)."""
        return False

    def _generate(self, ids: torch.Tensor, max_new_tokens: int) -> DecodeResult:
        raise NotImplementedError

    def generate_batch(self, prompts: list, max_new_tokens: int) -> list[DecodeResult]:
        raise PPDError(f"{self.name} decodes one prompt at a time; the batched methods: "
                       f"{sorted(n for n, c in REGISTRY.items() if c.batched)}")

    def new_result(self, tokens: list[int], **kw) -> DecodeResult:
        """An empty result carrying this method's statistics."""
        return DecodeResult(tokens, stats=self.Stats(), **kw)

    def probe(self, prompt_len: int, max_new_tokens: int) -> None:
        """A measurement the benchmark lets the method take between prompts (none by default)."""

    def summary(self, totals: "Totals") -> dict:
        """What the benchmark reports for the method beyond its speed, from its probes and its first run's totals:
        ``predicted_speedup`` (and ``_beside``) for a latency model, ``lines`` of text, any JSON-able details."""
        return {}

    def close(self) -> None:
        """Release worker processes or other resources; the strategy may not be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self, out: list[int], new: list[int], max_new_tokens: int) -> bool:
        """Append ``new`` to ``out`` under generate's stopping rules; True when generation is over."""
        for t in new:
            out.append(t)
            if t in self.eos or len(out) >= max_new_tokens:
                return True
        return False
