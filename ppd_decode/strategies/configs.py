"""One config language for decoding: the rows of ``configs/decode.yaml`` plus dotted overrides.

A row names a registered method and sets fields of its config dataclass; ``decode.ROW.FIELD=VALUE`` overrides a
field (values parsed as YAML, as Hydra parses them) or adds a row. Hydra's ``++decode.ROW.FIELD=VALUE`` ("add or
override", what a Hydra app such as the demo needs for a field its row leaves out) is accepted too.
``ppd-generate``, the benchmark and the demo all read their methods this way, so a setting is written the same
everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ppd_decode.errors import PPDError
from ppd_decode.strategies.base import REGISTRY, get_strategy

DECODE_YAML = Path(__file__).resolve().parents[2] / "configs" / "decode.yaml"


@dataclass
class Row:
    """One decoding setting: the strategy class, its config and the torch threads it runs with."""

    name: str
    cls: type
    config: object
    threads: int = 1

    def build(self, model, heads=None, tokenizer=None):
        return self.cls(model, config=dataclasses.replace(self.config),
                        heads=heads if self.cls.needs_heads else None, tokenizer=tokenizer)

    def changed(self) -> dict:
        """The row's settings that differ from its method's defaults."""
        default = self.cls.Config()
        return {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                if getattr(self.config, f.name) != getattr(default, f.name)}

    @property
    def label(self) -> str:
        """Those settings as text, e.g. ``layer=13, k=2`` (and the threads when not 1)."""
        diff = [f"{k}={v}" for k, v in self.changed().items()]
        return ", ".join(diff + ([f"threads={self.threads}"] if self.threads != 1 else []))


def load_rows(overrides: list[str] | tuple = (), base: dict | None = None) -> dict[str, dict]:
    """The rows of ``configs/decode.yaml`` (or ``base``), with ``decode.ROW.FIELD=VALUE`` overrides applied."""
    from omegaconf import OmegaConf

    if base is None:
        base = OmegaConf.to_container(OmegaConf.load(DECODE_YAML), resolve=True)["decode"]
    overrides = [o.lstrip("+") for o in overrides]  # Hydra's "add" and "add or override" forms mean the same here
    bad = [o for o in overrides if not o.startswith("decode.") or "=" not in o or o.split("=")[0].count(".") != 2]
    if bad:
        raise PPDError(f"{bad[0]!r} is not a decoding override. Fix: write decode.ROW.FIELD=VALUE, e.g. "
                       f"decode.ppd.k=2 (rows: {', '.join(base)})")
    merged = OmegaConf.merge(OmegaConf.create({"decode": base}), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_container(merged, resolve=True)["decode"]


def make_row(name: str, spec: dict | None) -> Row:
    """A row from its YAML mapping; an unknown method or field is refused with the ones there are."""
    spec = dict(spec or {})
    method = spec.pop("method", name)
    if method not in REGISTRY:
        raise PPDError(f"row {name!r}: unknown decoding method {method!r}. Fix: set decode.{name}.method to one of "
                       f"{sorted(REGISTRY)}")
    cls = get_strategy(method)
    threads = int(spec.pop("threads", 1))
    known = {f.name: f for f in dataclasses.fields(cls.Config)}
    for key in spec:
        if key not in known:
            raise PPDError(f"decode.{name}.{key}: {method}'s config has no field {key!r} "
                           f"(it has: {', '.join(known)})")
    values = {k: (tuple(v) if isinstance(v, list) and isinstance(_default(known[k]), tuple) else v)
              for k, v in spec.items()}
    return Row(name, cls, cls.Config(**values), threads)


def rows(names: list[str], overrides: list[str] | tuple = (), base: dict | None = None,
         layer: int | None = None) -> list[Row]:
    """The named rows with the overrides applied; a drafting row without a layer gets ``layer``."""
    table = load_rows(overrides, base)
    table.update({n: {} for n in names if n not in table and n in REGISTRY})  # any registered method, at defaults
    missing = [n for n in names if n not in table]
    if missing:
        raise PPDError(f"no decoding row {missing[0]!r}. Fix: use one of {', '.join(table)}, or add it with "
                       f"decode.{missing[0]}.method=<method>")
    return fill_layer([make_row(n, table[n]) for n in names], layer)


def fill_layer(rows: list[Row], layer: int | None, by_row: dict[str, int] | None = None) -> list[Row]:
    """Give every drafting row that names no layer ``by_row[row name]`` if there is one, else ``layer`` (None:
    leave them as they are)."""
    for r in rows:
        at = (by_row or {}).get(r.name, layer)
        if at is not None and r.cls.needs_heads and getattr(r.config, "layer", 0) is None:
            r.config.layer = at
    return rows


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
