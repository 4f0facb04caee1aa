"""Heads that come with ppd, and how a tool's ``heads`` setting picks them.

``ppd_decode/models/shipped_heads/<name>/`` holds trained heads for a model ppd embeds (``layer{d}/`` directories in
the ordinary head format, weights stored in fp16 to keep the package small; they load into the model's dtype), with
a ``README.md`` saying how they were made and what they measure. A tool's ``heads`` setting is resolved here:

- ``shipped`` (the default of ``ppd-generate``, the decode benchmark and the demo): the shipped heads whose
  fingerprint matches the loaded model; for a model without shipped heads, the untrained logit lens;
- ``lens``: the untrained logit lens (the model's own final norm and LM head at layer d), no trained head;
- anything else: a directory of heads (a training run's ``heads/``, or one ``layer{d}/``).

Shipped heads may come with ``decode.json``: the drafting layer a row uses when neither the row nor the tool names
one (``layer``), and per-row layers (``rows``: ``{"ppd": 13}``), measured for those heads; a setting the user gives
always wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ppd_decode.errors import HeadMismatchError
from ppd_decode.models.heads import EarlyExitHead, check_signature, head_dirs, load_heads, read_head_config

SHIPPED = Path(__file__).resolve().parent / "shipped_heads"
SHIPPED_SPEC, LENS_SPEC = "shipped", "lens"


def shipped_heads_for(model) -> Path | None:
    """The shipped heads directory trained for ``model`` (its architecture and weights), or None."""
    if not SHIPPED.is_dir():
        return None
    for d in sorted(p for p in SHIPPED.iterdir() if p.is_dir()):
        try:
            first = next(iter(head_dirs(d).values()))
            check_signature(read_head_config(first)["base_fingerprint"], model, str(d))
        except HeadMismatchError:
            continue
        return d
    return None


def resolve_heads(spec: str | Path | None, model) -> Path | None:
    """The heads directory a ``heads`` setting names, or None for the logit lens (see the module docstring)."""
    if spec is None or str(spec) == SHIPPED_SPEC:
        return shipped_heads_for(model)
    if str(spec) == LENS_SPEC:
        return None
    return Path(spec)


@dataclass
class HeadsChoice:
    """What a ``heads`` setting loaded: the heads by layer, a label for reports, and the heads' own decode defaults."""

    heads: dict[int, EarlyExitHead]
    label: str  # "shipped (<name>)", "logit lens", or the directory
    path: Path | None = None
    layer: int | None = None  # the drafting layer for rows that name none
    row_layers: dict[str, int] = field(default_factory=dict)


def choose_heads(spec: str | Path | None, model, layers: list[int] | None = None,
                 lens_layers: list[int] | None = None) -> HeadsChoice:
    """Load what ``spec`` names (see the module docstring). ``layers`` picks among the heads; the logit lens is built
    at ``layers``, else ``lens_layers``, else the middle layer."""
    path = resolve_heads(spec, model)
    if path is None:
        at = list(layers or lens_layers or [model.config.num_hidden_layers // 2])
        return HeadsChoice({d: EarlyExitHead.from_model(model, d) for d in at}, "logit lens")
    heads = load_heads(path, model, layers)
    shipped = path.resolve().parent == SHIPPED
    defaults = json.loads((path / "decode.json").read_text()) if shipped and (path / "decode.json").is_file() else {}
    layer = defaults.get("layer") if defaults.get("layer") in heads else None
    row_layers = {r: d for r, d in (defaults.get("rows") or {}).items() if d in heads}
    return HeadsChoice(heads, f"shipped ({path.name})" if shipped else str(path), path, layer, row_layers)
