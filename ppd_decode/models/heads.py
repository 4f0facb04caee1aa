"""Early-exit heads and their file format (shared by training, which writes them, and decoding, which reads them).

A head maps the hidden state after decoder layer ``d`` (1-based: ``hidden_states[d]`` of a transformers model) to
vocabulary logits. By default it is a copy of the model's own final norm and LM head, so an untrained head is the
"logit lens"; an optional residual adapter (zero-initialised, so it starts as the identity) adds capacity.

On disk each head is its own directory, laid out like a hub model repo::

    layer15/config.json        {"format": "ppd-head/1", "layer": 15, "base_model": ..., "base_fingerprint": {...},
                                "hidden_size", "vocab_size", "num_hidden_layers", "objective", "data", "metrics"}
    layer15/model.safetensors  norm.weight, lm_head.weight (+ adapter.*)

A head with ``"projection": "shared"`` reuses the model's own (frozen) LM head instead of a trained copy: only the
norm and the adapter are trained and stored (kilobytes instead of a vocabulary matrix), and training five of them
adds little optimizer and gradient work to the backbone's forward.

A head with ``"projection": "frequent"`` trains its own rows for the N most frequent training tokens only (the
candidate softmax's set, ``rows``) and uses the model's own LM head for every other token: the rows a candidate
softmax moves anyway, at a tenth of the optimizer state and gradient traffic of a full copy. It stores
``rows`` + ``row_weight``; loading materialises it into an ordinary full projection, so decoding sees an "own" head.

A head with ``"inputs": ["h_d", "f_prev"]`` also reads f(t-1), the final layer's normed hidden state at the
previous position (what produced the token at position t). In the stage-pipelined deployment that state is known
when the head runs: worker B finished position t-1 while worker A computed layers 1..d of position t. It enters as
``h + W f(t-1)`` before the adapter and the norm (``W`` zero-initialised, so a fresh head is the logit lens); where
f(t-1) is unknown (a second draft token, the first token after the prompt) a learned vector takes its place, and
training shows the head both cases (``head.prev_drop``). A strategy states which inputs it supplies
(``DecodingStrategy.head_inputs``) and refuses a head that reads more.

A head with ``"inputs": [..., "h_d_prefix"]`` (a block head, ``head.block``) first runs one decoder layer of its
own, initialised from the model's layer d+1, over the layer-d states: its attention reads every earlier position's
layer-d state, which it keeps in a KV cache of its own while decoding (``HeadContext``: rows fed at a position drop
whatever was fed there or after before, so a rejected draft or guess leaves nothing behind). The block's output then
goes through the same f(t-1) term, adapter, norm and projection as any head's input.

A training run exports ``heads/layer{d}/`` for each layer it trained. The model signature (architecture sizes plus a small probe of the embedding matrix) lets ``load_heads`` refuse a
head trained for another model with an error that says so.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ppd_decode.errors import HeadMismatchError
from ppd_decode.models.kv import causal_mask, crop_cache

FORMAT = "ppd-head/1"
_PROBE = 16  # probe the first 16x16 block of the input embeddings


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def check_layer(model, layer: int) -> int:
    L = num_layers(model)
    if not isinstance(layer, int) or not 1 <= layer < L:
        raise HeadMismatchError(
            f"layer {layer!r} is not an intermediate layer of this {L}-layer model. Fix: choose d in 1..{L - 1} "
            f"(layer {L} is the final layer, whose own LM head already predicts there).")
    return layer


def model_signature(model) -> dict:
    c = model.config
    emb = model.get_input_embeddings().weight
    return {"name_or_path": getattr(c, "_name_or_path", "") or "", "model_type": c.model_type,
            "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "vocab_size": emb.shape[0],
            "embedding_probe": emb[:_PROBE, :_PROBE].detach().float().cpu().flatten().tolist()}


def check_signature(saved: dict, model, where: str) -> None:
    mine = model_signature(model)
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        if saved.get(key) != mine[key]:
            raise HeadMismatchError(
                f"{where} holds heads for another model ({key}: {saved.get(key)!r} there, {mine[key]!r} here; "
                f"trained for {saved.get('name_or_path') or 'an unnamed model'!r}). Fix: load the model the heads "
                f"were trained for, or train heads for this one.")
    probe = torch.tensor(saved["embedding_probe"])
    ours = torch.tensor(mine["embedding_probe"])
    # Tolerant enough for a dtype change (fp32 vs bf16), strict enough to tell two checkpoints apart.
    if not torch.allclose(probe, ours, rtol=2e-2, atol=1e-3):
        raise HeadMismatchError(
            f"{where} holds heads trained for a model with the same shape but other weights "
            f"({saved.get('name_or_path')!r}). Fix: load that model, or train heads for this one.")


def previous_states(final: torch.Tensor, drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """f(t-1) at every position of ``final`` [..., T, H] (the final layer's normed states, positions along the
    second-last dimension), and where it counts as known [..., T]: never at the first position (nothing before it,
    as decoding meets the first token after a prompt), and with ``drop`` not at a random fraction of the others,
    so a head that reads f(t-1) also learns to guess without it (decoding's second draft tokens)."""
    prev = torch.cat([torch.zeros_like(final[..., :1, :]), final[..., :-1, :]], dim=-2)
    known = torch.ones(final.shape[:-1], dtype=torch.bool, device=final.device)
    known[..., 0] = False
    if drop > 0:
        known &= torch.rand(known.shape, device=final.device) >= drop
    return prev, known


def ranked_size(head) -> int:
    """How many tokens a head's guesses are ranked among (``EarlyExitHead.ranked``): its shortlist or the vocabulary."""
    short = getattr(head, "shortlist", None)
    return len(short) if short is not None else head.lm_head.out_features


class ResidualAdapter(nn.Module):
    """h + up(act(down(h))), with ``up`` zero-initialised so a fresh adapter changes nothing."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        self.act = nn.SiLU()
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


PROJECTIONS = ("own", "shared", "frequent")
# What a head may read: its layer's state at t, the final state at t-1, its layer's states at every earlier position
H_D, F_PREV, H_PREFIX = "h_d", "f_prev", "h_d_prefix"
INPUTS = (H_D, F_PREV, H_PREFIX)


class EarlyExitHead(nn.Module):
    def __init__(self, layer: int, norm: nn.Module, lm_head: nn.Linear, adapter_rank: int = 0,
                 projection: str = "own", rows: torch.Tensor | None = None, reads_prev: bool = False,
                 block: nn.Module | None = None, rotary: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        # one decoder layer over the layer-d states of all positions (a block head), with its rotary embedding
        self.block, self.rotary = block, rotary
        self.adapter_rank = adapter_rank
        self.projection = projection
        self.reads_prev = bool(reads_prev)
        self.adapter = ResidualAdapter(lm_head.in_features, adapter_rank) if adapter_rank else None
        if self.reads_prev:
            H = lm_head.in_features
            self.prev_proj = nn.Linear(H, H, bias=False)
            nn.init.zeros_(self.prev_proj.weight)
            self.prev_null = nn.Parameter(torch.zeros(H))  # W f(t-1) where f(t-1) is unknown
        self.norm = norm
        if projection == "own":
            self.lm_head = lm_head
        else:
            # The model's own LM head, frozen: held outside the module tree, so that casting or moving the head (as
            # DeepSpeed's bf16 engine casts everything it trains) never touches the model's weights.
            self._frozen_lm_head = (lm_head,)
        if projection == "frequent":
            rows = torch.as_tensor(rows, dtype=torch.long, device=lm_head.weight.device)
            if rows.ndim != 1 or not len(rows) or not bool((rows[1:] > rows[:-1]).all()) \
                    or int(rows[-1]) >= lm_head.out_features or int(rows[0]) < 0:
                raise HeadMismatchError(f"a frequent-rows head needs sorted, distinct token ids within the vocabulary "
                                        f"of {lm_head.out_features}; got {rows.tolist()[:8]}...")
            self.register_buffer("rows", rows)
            self.row_weight = nn.Parameter(lm_head.weight.detach()[rows].clone())

    @property
    def lm_head(self) -> nn.Linear:
        """The vocabulary projection: the head's own (a submodule), or the model's, frozen."""
        own = self._modules.get("lm_head")
        return own if own is not None else self._frozen_lm_head[0]

    @property
    def inputs(self) -> tuple[str, ...]:
        """What the head reads (``INPUTS``): a strategy must supply all of them."""
        return (H_D,) + ((F_PREV,) if self.reads_prev else ()) + ((H_PREFIX,) if self.block is not None else ())

    @classmethod
    def from_model(cls, model, layer: int, adapter_rank: int = 0, projection: str = "own",
                   rows: torch.Tensor | None = None, reads_prev: bool = False,
                   block: bool = False) -> "EarlyExitHead":
        """A head initialised from the model's own final norm and LM head: ``projection="own"`` copies the LM head
        (tied embeddings stay intact), ``"shared"`` reuses the model's own, frozen, and ``"frequent"`` reuses it
        except for trained copies of the ``rows`` (token ids). ``block``: a block head, its decoder layer a copy of
        the model's layer d+1 (the layer that reads h_d in the model itself)."""
        check_layer(model, layer)
        if projection not in PROJECTIONS:
            raise HeadMismatchError(f"unknown head projection {projection!r}; use one of {list(PROJECTIONS)}")
        if (projection == "frequent") != (rows is not None):
            raise HeadMismatchError("token rows go with projection='frequent' (and only with it)")
        base = model.get_output_embeddings()
        if projection in ("shared", "frequent"):
            lm_head = base.requires_grad_(False)
        else:
            lm_head = nn.Linear(base.in_features, base.out_features, bias=False,
                                device=base.weight.device, dtype=base.weight.dtype)
            with torch.no_grad():
                lm_head.weight.copy_(base.weight)
        norm = copy.deepcopy(model.model.norm).to(device=base.weight.device, dtype=base.weight.dtype)
        layer_module = rotary = None
        if block:
            layer_module = copy.deepcopy(model.model.layers[layer]).requires_grad_(True)
            layer_module.self_attn.layer_idx = 0  # the only layer of the head's own cache
            rotary = copy.deepcopy(model.model.rotary_emb)
        # the parts made here (adapter, f(t-1) term, block) to the model's device and dtype; the model's own frozen
        # LM head is outside the head's module tree, so this never touches it
        return cls(layer, norm, lm_head, adapter_rank, projection, rows, reads_prev, layer_module, rotary).to(
            device=base.weight.device, dtype=base.weight.dtype)

    def trainable(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if self.projection == "own" or not name.startswith("lm_head.")]

    def own_state_dict(self) -> dict:
        """What a saved head holds: everything but a shared projection (that is the model's own LM head)."""
        return {k: v for k, v in self.state_dict().items()
                if self.projection == "own" or not k.startswith("lm_head.")}

    def float_trainable(self) -> "EarlyExitHead":
        """fp32 trainable weights. A shared or frequent-rows head's projection keeps the model's dtype: it is the
        model's, held outside the module tree that ``float()`` casts."""
        return self.float()

    def extend_rows(self, more: torch.Tensor) -> "EarlyExitHead":
        """This frequent-rows head with the token ids ``more`` among its own rows as well (a wider shortlist): the
        rows it had keep their trained weights, the new ones start from the model's LM head, as a new head's do."""
        if self.projection != "frequent":
            raise HeadMismatchError(f"only a frequent-rows head has own rows to extend (this one: {self.projection})")
        more = torch.as_tensor(more, dtype=torch.long, device=self.rows.device)
        if len(more) and (int(more.min()) < 0 or int(more.max()) >= self.lm_head.out_features):
            raise HeadMismatchError(f"token ids must lie within the vocabulary of {self.lm_head.out_features}")
        rows = torch.unique(torch.cat([self.rows, more]))  # sorted and distinct, as a head's rows must be
        weight = self.lm_head.weight.detach().index_select(0, rows).to(self.row_weight.dtype).clone()
        weight[torch.searchsorted(rows, self.rows)] = self.row_weight.detach()
        self.rows = rows
        self.row_weight = nn.Parameter(weight, requires_grad=self.row_weight.requires_grad)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The full [vocab, hidden] projection (a frequent-rows head: the model's rows with its own in place)."""
        w = self.lm_head.weight
        if self.projection == "frequent":
            w = w.index_copy(0, self.rows, self.row_weight.to(w.dtype))
        return w

    def materialize(self) -> "EarlyExitHead":
        """A frequent-rows head as an ordinary own projection (what decoding reads: ``lm_head.weight``)."""
        if self.projection != "frequent":
            return self
        w = self.weight.detach()
        self.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.lm_head.weight.data.copy_(w)
        rows = self.rows
        del self.row_weight, self.rows
        # The trained rows, where guesses come from (see ``guess``); not saved: a saved head keeps its ``rows``.
        self.register_buffer("shortlist", rows, persistent=False)
        self.register_buffer("shortlist_weight", w.index_select(0, rows).contiguous(), persistent=False)
        self.projection, self.stored_as = "own", "frequent"
        return self

    def guess(self, hidden: torch.Tensor, k: int, prev: torch.Tensor | None = None) -> torch.Tensor:
        """The head's top-``k`` token ids [..., k] for drafting and guessing. A head with a ``shortlist`` (the
        frequent rows it was trained on) ranks only those: a fraction of the full projection's cost, and a better
        guess than the full vocabulary, whose untrained rows (the base model's) score on another scale than the
        trained ones (docs/results.md). Guesses never decide what is emitted, so this costs no exactness."""
        logits, short = self._ranking(hidden, k, prev)
        i = logits.topk(k, dim=-1).indices
        return i if short is None else short[i]

    def _ranking(self, hidden: torch.Tensor, k: int, prev: torch.Tensor | None, known: torch.Tensor | None = None):
        """The logits decoding ranks ``k`` candidates on, and the token id of each column (None: the vocabulary)."""
        short = getattr(self, "shortlist", None)
        if short is None or k > len(short):
            return self(hidden, prev, known), None
        return self.shortlist_logits(hidden, prev, known), short

    def shortlist_logits(self, hidden: torch.Tensor, prev: torch.Tensor | None = None,
                         known: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the shortlist rows (a materialised frequent-rows head), f(t-1) where ``known``."""
        w = self.shortlist_weight
        return nn.functional.linear(self.features(hidden.to(self.norm.weight.dtype), prev, known).to(w.dtype), w)

    def guess_with_confidence(self, hidden: torch.Tensor,
                              prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's top-1 token ids [...] and their softmax probabilities (over the shortlist where the head has
        one, the set its candidate softmax was trained on): how sure the head is, for stopping a draft early."""
        i, p = self.ranked(hidden, 1, prev)
        return i[..., 0], p[..., 0]

    def ranked(self, hidden: torch.Tensor, k: int, prev: torch.Tensor | None = None,
               known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's top-``k`` token ids [..., k] and their softmax probabilities, as ``guess`` ranks them: over the
        shortlist where the head has one (the set its candidate softmax was trained on; over the full vocabulary a
        frequent-rows head's trained rows compete with untrained ones on another scale), else the vocabulary. What
        token trees branch on. ``prev``/``known`` as for ``features``."""
        logits, short = self._ranking(hidden, k, prev, known)
        p, i = logits.float().softmax(-1).topk(k, dim=-1)
        return (i if short is None else short[i]), p

    def contextual(self, hidden: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """A block head's decoder layer over ``hidden`` [B, q, H], the layer-d states of positions start..start+q-1
        (causal among themselves, after the ``start`` positions already in ``cache``; no cache: the sequence starts
        at position 0, as in training). Any other head returns ``hidden`` as it is. Right padding is harmless: a
        causal row never reads the padding after it."""
        if self.block is None:
            return hidden
        hidden = hidden.to(self.norm.weight.dtype)
        q = hidden.shape[1]
        pos = torch.arange(start, start + q, device=hidden.device)[None]
        mask = causal_mask(q, start, hidden.dtype, hidden.device)
        # (positionally: the cache argument's keyword changed name across transformers versions)
        out = self.block(hidden, mask, pos, cache, cache is not None,
                         position_embeddings=self.rotary(hidden, position_ids=pos))
        return out if torch.is_tensor(out) else out[0]

    def context(self) -> "HeadContext":
        """What a decoding strategy feeds the layer-d states of the accepted text through (see ``HeadContext``)."""
        return HeadContext(self)

    def features(self, hidden: torch.Tensor, prev: torch.Tensor | None = None,
                 known: torch.Tensor | None = None) -> torch.Tensor:
        """What the vocabulary projection reads: f(t-1)'s term (a head that reads it), adapter (if any), norm.

        ``prev`` is f(t-1) shaped like ``hidden`` (None: unknown everywhere); ``known`` (bool, ``hidden``'s shape
        without the last dimension) marks where it is known, the learned stand-in filling the rest. A head that does
        not read f(t-1) ignores both."""
        if self.reads_prev:
            null = self.prev_null.to(hidden.dtype)
            if prev is None:
                hidden = hidden + null
            else:
                mixed = self.prev_proj(prev.to(hidden.dtype))
                if known is not None:
                    mixed = torch.where(known[..., None], mixed, null)
                hidden = hidden + mixed
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        return self.norm(hidden)

    def forward(self, hidden: torch.Tensor, prev: torch.Tensor | None = None,
                known: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight
        return nn.functional.linear(self.features(hidden.to(self.norm.weight.dtype), prev, known).to(w.dtype), w)

    def candidate_logits(self, hidden: torch.Tensor, candidates: torch.Tensor, prev: torch.Tensor | None = None,
                         known: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the ``candidates`` rows only (training's candidate softmax); gradients reach only those rows.
        A frequent-rows head needs its ``rows`` among the candidates (the candidate set always holds them)."""
        w = self.lm_head.weight[candidates]
        if self.projection == "frequent":
            at = torch.searchsorted(candidates, self.rows).clamp(max=len(candidates) - 1)
            if not bool((candidates[at] == self.rows).all()):
                raise HeadMismatchError("the candidate set misses some of this head's own rows; train with "
                                        "head.train_vocab equal to the number of rows it was built with")
            w = w.index_copy(0, at, self.row_weight.to(w.dtype))
        return nn.functional.linear(self.features(hidden.to(self.norm.weight.dtype), prev, known).to(w.dtype), w)


class HeadContext:
    """A head's view of the text decoded so far. ``read(hidden, start)`` takes the layer-d states of positions
    start..start+q-1 and returns what the head's projection reads there: for a block head its decoder layer's output,
    attending to every position fed before (a KV cache of its own); for any other head ``hidden`` itself.

    Feeding position ``start`` first drops whatever was fed at ``start`` or later (a rejected guess or draft), so
    the cache always holds the accepted text: a strategy feeds each position's state once it is known and never
    needs to roll back on its own. A gap (a position never fed) is a bug in the strategy, and raises."""

    def __init__(self, head: EarlyExitHead):
        self.head = head
        self.cache = None
        if head.block is not None:
            from transformers import DynamicCache

            self.cache = DynamicCache()
        self.length = 0  # positions fed (and kept)

    def read(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        if self.cache is None:
            return hidden
        if start > self.length:
            raise RuntimeError(f"the head context holds {self.length} positions; position {start} cannot follow "
                               f"them (positions {self.length}..{start - 1} were never fed)")
        if start < self.length:
            crop_cache(self.cache, start)
        self.length = start + hidden.shape[1]
        return self.head.contextual(hidden, self.cache, start)


def save_head(directory: str | Path, head: EarlyExitHead, model, meta: dict | None = None) -> Path:
    """One head as a hub-style directory: ``config.json`` + ``model.safetensors``. Written atomically."""
    from safetensors.torch import save_file

    d = Path(directory)
    tmp = d.with_name(d.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sig = model_signature(model)
    config = {"format": FORMAT, "layer": head.layer, "adapter_rank": head.adapter_rank, "inputs": list(head.inputs),
              "projection": head.projection, **({"own_rows": len(head.rows)} if head.projection == "frequent" else {}),
              "base_model": sig["name_or_path"], "base_fingerprint": sig,
              "num_hidden_layers": sig["num_hidden_layers"], "hidden_size": sig["hidden_size"],
              "vocab_size": sig["vocab_size"], "dtype": str(head.lm_head.weight.dtype).replace("torch.", ""),
              **(meta or {})}
    save_file({k: v.detach().cpu().contiguous() for k, v in head.own_state_dict().items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if d.exists():
        import shutil

        shutil.rmtree(d)
    tmp.rename(d)
    return d


def save_heads(directory: str | Path, heads: dict[int, EarlyExitHead], model, meta: dict | None = None,
               per_head_meta: dict[int, dict] | None = None) -> Path:
    """Several heads: ``directory/layer{d}/`` each (see ``save_head``)."""
    d = Path(directory)
    for layer, head in heads.items():
        save_head(d / f"layer{layer}", head, model, {**(meta or {}), **((per_head_meta or {}).get(layer, {}))})
    return d


def head_dirs(path: str | Path) -> dict[int, Path]:
    """``{layer: directory}`` for a single head directory or a directory of ``layer{d}/`` heads."""
    p = Path(path)
    cands = [p] if (p / "config.json").is_file() else sorted(p.glob("layer*/"))
    out = {}
    for c in cands:
        info = read_head_config(c)
        out[int(info["layer"])] = c
    if not out:
        raise HeadMismatchError(f"{p} holds no heads (expected config.json + model.safetensors, or layer*/ "
                                f"subdirectories of them). Fix: pass the directory a training run exported.")
    return out


def read_head_config(directory: str | Path) -> dict:
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file() or not (d / "model.safetensors").is_file():
        raise HeadMismatchError(f"{d} is not a head directory (needs config.json and model.safetensors). "
                                f"Fix: pass the directory a training run exported its heads to.")
    info = json.loads(cfg_path.read_text())
    if info.get("format") != FORMAT:
        raise HeadMismatchError(f"{cfg_path} has format {info.get('format')!r}; this ppd reads {FORMAT!r}.")
    return info


def load_heads(path: str | Path, model, layers: list[int] | None = None,
               materialize: bool = True) -> dict[int, EarlyExitHead]:
    """Heads saved by ``save_head(s)``, checked against ``model``, on its device and dtype; ``materialize=False``
    keeps a frequent-rows head as it trains (its ``rows`` and ``row_weight``), to continue training it."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise HeadMismatchError(f"{path} does not exist. Fix: pass the directory a training run exported heads to.")
    found = head_dirs(path)
    want = sorted(found) if layers is None else list(layers)
    missing = [x for x in want if x not in found]
    if missing:
        raise HeadMismatchError(f"{path} has heads for layers {sorted(found)}, not {missing}. "
                                f"Fix: pick from {sorted(found)} or train them.")
    out = {}
    for layer in want:
        info = read_head_config(found[layer])
        check_signature(info["base_fingerprint"], model, str(found[layer]))
        state = load_file(str(found[layer] / "model.safetensors"))
        projection = info.get("projection", "own")
        inputs = list(info.get("inputs") or [H_D])
        unknown = [x for x in inputs if x not in INPUTS]
        if unknown or H_D not in inputs:
            raise HeadMismatchError(f"{found[layer]} reads inputs {inputs}; this ppd knows {list(INPUTS)} (and every "
                                    f"head reads {H_D!r}). Fix: upgrade ppd, or use heads it can read.")
        if projection == "frequent" and "rows" not in state:
            raise HeadMismatchError(f"{found[layer]} is a frequent-rows head without its 'rows'; re-export the head.")
        head = EarlyExitHead.from_model(model, layer, info.get("adapter_rank", 0), projection,
                                        rows=state["rows"] if projection == "frequent" else None,
                                        reads_prev=F_PREV in inputs, block=H_PREFIX in inputs)
        missing, unexpected = head.load_state_dict(state, strict=False)
        if unexpected or any(k in head.own_state_dict() for k in missing):  # only a shared projection may be absent
            raise HeadMismatchError(f"{found[layer]} does not hold the weights its config.json describes "
                                    f"(missing {missing}, unexpected {unexpected}); re-export the head.")
        head.metrics = dict(info.get("metrics") or {})  # validation agreement: a prior for drafting policies
        out[layer] = (head.materialize() if materialize else head).eval()
    return out
