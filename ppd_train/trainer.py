"""The head-training job: a frozen backbone, a bank of early-exit heads trained by DeepSpeed, W&B, resume, export.

One backbone forward per micro batch feeds every requested head; each head's loss is independent of the others
(sum of losses, no shared gradient clipping), so training five heads together is numerically the same as training
each alone on the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ppd_decode.errors import PPDError
from ppd_decode.models.features import FrozenBackbone
from ppd_decode.models.heads import EarlyExitHead, check_layer, load_heads, previous_states, save_heads
from ppd_decode.models.loading import load_model

from .config import typed
from .data import DataConfig, build_training_data
from .objectives import (
    agreement,
    candidate_loss,
    candidate_set,
    check_objective,
    frequent_tokens,
    new_frequent_tokens,
    head_loss,
    needs_final_layer,
    targets,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# run_name joins the layer list: outputs/train/smollm2-135m-L11-15-distill
OmegaConf.register_new_resolver("ppd_join", lambda xs: "-".join(str(x) for x in xs), replace=True)
# ... and names the objective: "ce", "distill-kl", "distill-argmax"
OmegaConf.register_new_resolver("ppd_objective", lambda obj, kind: obj if obj != "distill" else f"{obj}-{kind}",
                                replace=True)
# ... and marks heads that read f(t-1), so they never resume another kind's checkpoints: "-prev"
OmegaConf.register_new_resolver("ppd_prev", lambda reads: "-prev" if str(reads).lower() == "true" else "",
                                replace=True)
# ... and block heads the same way: "-block"
OmegaConf.register_new_resolver("ppd_block", lambda block: "-block" if str(block).lower() == "true" else "",
                                replace=True)
# ... and heads continued from others (head.init_from) by where they came from, so such a run never resumes a run
# that started from the logit lens: "-from-1a2b3c"
OmegaConf.register_new_resolver(
    "ppd_init", lambda src: "" if src is None else "-from-" + hashlib.sha1(str(src).encode()).hexdigest()[:6],
    replace=True)


class HeadBank(nn.Module):
    """All heads of a run, as the one module DeepSpeed trains."""

    def __init__(self, heads: dict[int, EarlyExitHead], objective: str, kind: str, temperature: float,
                 frequent: torch.Tensor | None = None):
        super().__init__()
        self.heads = nn.ModuleDict({str(d): h for d, h in heads.items()})
        self.objective, self.kind, self.temperature = objective, kind, temperature
        # Candidate softmax when set (see objectives); a buffer so it follows the module's device (not saved: it is
        # recomputed from the training data, deterministically).
        self.register_buffer("frequent", frequent, persistent=False)
        self.shared = all(h.projection == "shared" for h in heads.values())
        # Frequent-rows heads built on this run's frequent tokens share every row but their own (see forward).
        self.frequent_rows = frequent is not None and all(
            h.projection == "frequent" and torch.equal(h.rows.cpu(), frequent.cpu()) for h in heads.values())

    def forward(self, hidden: dict[int, torch.Tensor], input_ids, teacher_logits, prev=None, known=None):
        """``prev``/``known``: f(t-1) and where it is known, for heads that read it (see ``heads.previous_states``)."""
        args = (self.objective, self.kind, self.temperature)
        hidden = self.contextual(hidden)
        if self.frequent is None:
            return self._total({int(d): head_loss(h(hidden[int(d)], prev, known), input_ids, teacher_logits, *args)
                                for d, h in self.heads.items()})
        # Everything the heads share is computed once: the candidate set, the targets' places in it and, when the
        # heads share the model's LM head, its candidate rows, applied to all heads' features in one product.
        t = targets(input_ids, teacher_logits, self.objective, self.kind)  # one argmax over the vocabulary
        cands = candidate_set(self.frequent, t if t is not None else teacher_logits.argmax(-1))
        index = torch.searchsorted(cands, t.reshape(-1)) if t is not None else None
        if self.frequent_rows:
            return self._frequent_rows_loss(hidden, input_ids, teacher_logits, cands, t, args, prev, known)
        if self.shared:
            heads = list(self.heads.items())
            w = heads[0][1].lm_head.weight[cands]
            feats = torch.cat([h.features(hidden[int(d)].to(h.norm.weight.dtype), prev, known) for d, h in heads])
            logits = nn.functional.linear(feats.to(w.dtype), w).split(input_ids.shape[0])
            return self._total({int(d): candidate_loss(z, input_ids, teacher_logits, cands, *args, target_index=index)
                                for (d, _), z in zip(heads, logits)})
        return self._total({int(d): candidate_loss(h.candidate_logits(hidden[int(d)], cands, prev, known), input_ids,
                                                   teacher_logits, cands, *args, target_index=index)
                            for d, h in self.heads.items()})

    def _frequent_rows_loss(self, hidden, input_ids, teacher_logits, cands, t, args, prev=None, known=None):
        """Frequent-rows heads: the candidate set reordered as [the heads' own rows | the rest]; each head's own
        rows get their own product, the rest (the model's LM head rows, the same for every head) one product for all
        heads' features together. The softmax does not care about the order, only the targets' places must follow."""
        rest = cands[~torch.isin(cands, self.frequent)]
        order = torch.cat([self.frequent, rest])
        index = None
        if t is not None:
            place = torch.empty_like(cands)
            place[torch.searchsorted(cands, order)] = torch.arange(len(order), device=cands.device)
            index = place[torch.searchsorted(cands, t.reshape(-1))]
        heads = list(self.heads.items())
        base = heads[0][1].lm_head.weight
        feats = [h.features(hidden[int(d)].to(h.norm.weight.dtype), prev, known) for d, h in heads]
        rest_logits = nn.functional.linear(torch.cat(feats).to(base.dtype), base[rest]).split(input_ids.shape[0])
        losses = {}
        for (d, h), f, z_rest in zip(heads, feats, rest_logits):
            z = torch.cat([nn.functional.linear(f.to(h.row_weight.dtype), h.row_weight), z_rest.to(h.row_weight.dtype)], -1)
            losses[int(d)] = candidate_loss(z, input_ids, teacher_logits, order, *args, target_index=index)
        return self._total(losses)

    def contextual(self, hidden: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each head's input over the whole training block: a block head's decoder layer over its layer's states
        (causal, from the block's first position), every other head's layer state as it is."""
        return {**hidden, **{int(d): h.contextual(hidden[int(d)]) for d, h in self.heads.items() if h.block is not None}}

    @staticmethod
    def _total(losses: dict[int, torch.Tensor]):
        return sum(losses.values()), losses


# ---------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (``deepspeed_shm_comm``) at init.

    On the CPU accelerator every first ``init_distributed`` in a process builds (or re-checks) that C++ op with g++
    and ninja under a file lock in ``~/.cache/torch_extensions``. Training here all-reduces through gloo and never calls
    it (it serves DeepSpeed's inference all-reduce), and a process killed while it holds the lock (a SIGKILLed run, a
    job's time limit) leaves the lock behind, so every later run on that machine waits on it forever. DeepSpeed keeps
    its op probe in one module-level dict (``deepspeed.ops.__compatible_ops__``) that ``build_shm_op`` reads."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed():
    """torchrun sets RANK/WORLD_SIZE; a plain `python -m ppd_train` becomes a world of one."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend)
    return device, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


# ------------------------------------------------------------------------------------------- DeepSpeed config
def deepspeed_config(name_or_path: str, *, micro_batch: int, grad_accum: int, world: int, lr: float,
                     weight_decay: float, betas, warmup_steps: int, total_steps: int) -> dict:
    """Load ``configs/deepspeed/<name>.json`` and fill its ``"auto"`` values from the trainer config
    (the convention of transformers' DeepSpeed integration)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS / "deepspeed" / f"{name_or_path}.json"
    if not path.is_file():
        have = sorted(p.stem for p in (CONFIGS / "deepspeed").glob("*.json"))
        raise PPDError(f"no DeepSpeed config {path}; use trainer.deepspeed=<one of {have}> or a path to a JSON file")
    cfg = json.loads(path.read_text())
    auto = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world, "lr": lr, "weight_decay": weight_decay,
            "betas": list(betas), "warmup_max_lr": lr, "warmup_num_steps": warmup_steps,
            "total_num_steps": total_steps, "warmup_min_lr": 0.0}

    def fill(node):
        if isinstance(node, dict):
            return {k: (auto[k] if v == "auto" and k in auto else fill(v)) for k, v in node.items()}
        return node

    return fill(cfg)


# ----------------------------------------------------------------------------------------------------- train
def validate(cfg, model=None) -> None:
    """Bad input fails here, before any compute is spent."""
    cfg = typed(cfg)
    check_objective(cfg.head.objective, cfg.head.distill_kind)
    from ppd_decode.models.heads import PROJECTIONS

    if cfg.head.projection not in PROJECTIONS:
        raise PPDError(f"unknown head.projection {cfg.head.projection!r}; use one of {list(PROJECTIONS)}")
    if cfg.head.projection == "frequent" and not int(cfg.head.train_vocab or 0):
        raise PPDError("head.projection=frequent trains own rows for the head.train_vocab most frequent tokens; "
                       "set head.train_vocab to a positive number (e.g. 4096)")
    if cfg.trainer.autocast not in (None, "bf16"):
        raise PPDError(f"unknown trainer.autocast {cfg.trainer.autocast!r}; use bf16 or null")
    layers = list(cfg.head.layers)
    if not layers:
        raise PPDError("head.layers is empty; name at least one layer, e.g. head.layers=[15] (or make train LAYER=15)")
    if model is not None:
        for d in layers:
            check_layer(model, d)
        ctx = getattr(model.config, "max_position_embeddings", None)
        if ctx is not None and cfg.trainer.seq_len > ctx:
            raise PPDError(f"trainer.seq_len={cfg.trainer.seq_len} exceeds the model's context of {ctx} positions. "
                           f"Fix: trainer.seq_len={ctx} or less.")
    if cfg.trainer.seq_len < 2:
        raise PPDError("trainer.seq_len must be at least 2")
    if not 0.0 <= float(cfg.head.prev_drop) < 1.0:
        raise PPDError(f"head.prev_drop={cfg.head.prev_drop} must be in [0, 1): the fraction of positions trained "
                       f"without f(t-1)")


def warm_start(cfg, model, layers: list[int], blocks: torch.Tensor | None = None) -> dict[int, EarlyExitHead]:
    """``head.init_from``: the heads to continue training from, fp32 and trainable: a run's exported ``heads/`` or
    the shipped ones (``shipped``), e.g. to train good heads further on new data. They must be of the kind the config
    describes: loading them into another kind would drop or leave untrained the weights that differ. Frequent-rows
    heads keep their rows; a larger ``head.train_vocab`` adds the training ``blocks``' most frequent tokens that are
    not among them yet (new data, e.g. another language, brings tokens the first rows were never counted on)."""
    from ppd_decode.models.catalog import resolve_heads

    path = resolve_heads(cfg.head.init_from, model)
    if path is None:
        raise PPDError(f"head.init_from={cfg.head.init_from!r} names no heads for {cfg.model.spec}. Fix: pass a "
                       f"heads directory a run exported (outputs/train/<run>/heads), or leave it null.")
    heads = load_heads(path, model, layers, materialize=False)
    want = {"projection": cfg.head.projection, "adapter_rank": int(cfg.head.adapter_rank),
            "reads_prev": bool(cfg.head.reads_prev), "block": cfg.head.block}
    for d, h in heads.items():
        have = {"projection": h.projection,
                "adapter_rank": h.adapter_rank, "reads_prev": h.reads_prev, "block": h.block is not None}
        diff = {k: v for k, v in have.items() if v != want[k]}
        if diff:
            raise PPDError(f"{path}: the layer-{d} head is not of the configured kind ({diff} there). Fix: "
                           + " ".join(f"head.{k}={str(v).lower() if isinstance(v, bool) else v}"
                                      for k, v in diff.items()) + ".")
        if h.projection == "frequent" and len(h.rows) > int(cfg.head.train_vocab):
            raise PPDError(f"{path}: the layer-{d} head has {len(h.rows)} own rows, more than head.train_vocab="
                           f"{cfg.head.train_vocab}; rows are never dropped. Fix: head.train_vocab={len(h.rows)} (or "
                           f"more, to add the data's most frequent other tokens).")
    rows = [h.rows for h in heads.values() if h.projection == "frequent"]
    if any(not torch.equal(r, rows[0]) for r in rows):
        raise PPDError(f"{path}: its heads were trained on different token rows; continue them in separate runs.")
    if rows and len(rows[0]) < int(cfg.head.train_vocab):
        if blocks is None:
            raise PPDError(f"{path}: head.train_vocab={cfg.head.train_vocab} asks for more rows than the heads' "
                           f"{len(rows[0])}, and no training data was given to count the new ones on")
        more = new_frequent_tokens(blocks, rows[0], int(cfg.head.train_vocab) - len(rows[0]),
                                   model.get_output_embeddings().weight.shape[0])
        heads = {d: h.extend_rows(more) for d, h in heads.items()}
    return {d: h.train().float_trainable() for d, h in heads.items()}


def _all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order (a Python object through torch.distributed)."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _minutes_due(minutes: float | None, since: float, device) -> bool:
    """Whether ``minutes`` have passed since ``since`` by rank 0's clock, the same answer on every rank (saving a
    checkpoint is collective: ranks deciding by their own clocks could wait on each other forever)."""
    if not minutes:
        return False
    due = torch.tensor([float(time.time() - since >= 60 * float(minutes))], device=device)
    torch.distributed.broadcast(due, src=0)
    return bool(due.item())


def _batch_rows(perm: torch.Tensor, micro_index: int, micro: int, world: int, rank: int) -> torch.Tensor:
    start = (micro_index * world + rank) * micro
    return perm[start:start + micro]


def decoding_shortlist(head) -> torch.Tensor | None:
    """The rows a head guesses from in decoding (a frequent-rows head's, trained or loaded), or None: all."""
    short = getattr(head, "shortlist", None)
    return head.rows if short is None and head.projection == "frequent" else short


@torch.no_grad()
def evaluate(backbone: FrozenBackbone, bank: HeadBank, val: torch.Tensor, micro: int, device,
             scored: torch.Tensor | None = None) -> dict:
    """Mean validation loss and top-1/top-5 agreement with the final layer, per head, as decoding sees it: over the
    positions ``scored`` marks (the answers, where decoding predicts) and ranked as decoding ranks (a frequent-rows
    head over its rows; ``val/top{k}_agree_full`` over the whole vocabulary beside it). The loss is over every
    position."""
    bank.eval()
    sums: dict[str, float] = {}
    n = 0
    if scored is None:
        scored = torch.ones_like(val, dtype=torch.bool)
    weight = scored.sum().item()  # (the agreements are means over the scored positions of every batch)
    reads_prev = any(h.reads_prev for h in bank.heads.values())
    for i in range(0, len(val), micro):
        ids = val[i:i + micro].to(device)
        mask = scored[i:i + micro].to(device)
        w = mask.sum().item()
        if reads_prev:
            hidden, teacher, final = backbone(ids, final_logits=True, final_hidden=True)
            prev, known = previous_states(final)
        else:
            (hidden, teacher), prev, known = backbone(ids, final_logits=True), None, None
        hidden = bank.contextual(hidden)
        for d, head in bank.heads.items():
            logits = head(hidden[int(d)], prev, known)
            short = decoding_shortlist(head)
            if w:
                ranked = {"": short, "_full": None} if short is not None else {"": None}
                for suffix, rows in ranked.items():
                    for k, v in agreement(logits, teacher, ks=(1, 5), scored=mask, shortlist=rows).items():
                        key = f"val/top{k}_agree{suffix}/layer{d}"
                        sums[key] = sums.get(key, 0.0) + v * w
                if head.reads_prev:  # the same head where decoding cannot give it f(t-1)
                    for k, v in agreement(head(hidden[int(d)]), teacher, ks=(1, 5), scored=mask,
                                          shortlist=short).items():
                        key = f"val/top{k}_agree_noprev/layer{d}"
                        sums[key] = sums.get(key, 0.0) + v * w
            loss = head_loss(logits, ids, teacher, bank.objective, bank.kind, bank.temperature).item()
            sums[f"val/loss/layer{d}"] = sums.get(f"val/loss/layer{d}", 0.0) + loss * len(ids)
        n += len(ids)
    bank.train()
    return {k: v / (n if "/loss/" in k else weight) for k, v in sums.items()}


def train(cfg, run_dir: str | Path | None = None) -> dict:
    """Run (or resume) one training job described by a Hydra config. Returns the final metrics."""
    import deepspeed

    cfg = typed(cfg)
    validate(cfg)
    run_dir = Path(run_dir or cfg.output_dir)
    device, rank, world = init_distributed()
    is_main = rank == 0
    if device.type == "cpu":
        # torchrun pins every rank to one thread; share this node's cores between its ranks instead.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(int(cfg.trainer.threads or max(1, (os.cpu_count() or 1) // local_world)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=device)
    validate(cfg, model)
    layers = sorted(set(int(d) for d in cfg.head.layers))
    objective, kind = cfg.head.objective, cfg.head.distill_kind
    seq_len, micro, accum = int(cfg.trainer.seq_len), int(cfg.trainer.micro_batch), int(cfg.trainer.grad_accum)

    data_cfg = DataConfig.from_cfg(cfg.data)
    data = build_training_data(data_cfg, tok, seq_len, model=model, model_spec=cfg.model.spec, rank=rank,
                               world=world, gather=_all_gather)
    if cfg.trainer.data_only:
        # Self-distillation is the slow part of a run: a cluster (or an idle machine) can pay for it once, sharded
        # over every rank, before any training is scheduled; the training run then reads the same cache.
        summary = {"data_only": True, "source": data.source, "conversations": data.conversations,
                   "train_blocks": len(data.train), "val_blocks": len(data.val), "seq_len": seq_len}
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "data.json").write_text(json.dumps(summary, indent=1))
            print(f"data ready: {summary}", flush=True)
        return summary
    val = data.val[: int(cfg.trainer.eval_blocks)]
    val_scored = None if data.val_scored is None else data.val_scored[: int(cfg.trainer.eval_blocks)]
    global_batch = micro * accum * world
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        raise PPDError(f"{len(data.train)} training blocks are fewer than one global batch ({global_batch} = micro "
                       f"{micro} x accum {accum} x world {world}). Fix: more data (data.max_train_tokens) or a "
                       f"smaller batch.")
    total_steps = int(cfg.trainer.max_steps or 0) or int(cfg.trainer.epochs) * steps_per_epoch
    warmup = max(1, int(round(float(cfg.trainer.warmup_ratio) * total_steps)))  # DeepSpeed needs >= 1

    projection = cfg.head.projection
    train_vocab = int(cfg.head.train_vocab or 0)
    heads = warm_start(cfg, model, layers, data.train) if cfg.head.init_from else {}
    if heads and projection == "frequent":  # the candidate set keeps the rows the heads were trained on
        frequent = next(iter(heads.values())).rows
    else:
        frequent = frequent_tokens(data.train, train_vocab, model.get_output_embeddings().weight.shape[0]) if train_vocab else None
    for d in ([] if heads else layers):  # (warm_start returns every layer or raises)
        # each head's random init (the adapter's) depends on its layer only, not on the other heads
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed * 1000 + d)
            heads[d] = EarlyExitHead.from_model(model, d, int(cfg.head.adapter_rank), projection,
                                                rows=frequent if projection == "frequent" else None,
                                                reads_prev=bool(cfg.head.reads_prev),
                                                block=bool(cfg.head.block)).float_trainable()
    bank = HeadBank(heads, objective, kind, float(cfg.head.temperature), frequent).to(device)
    ds_cfg = deepspeed_config(cfg.trainer.deepspeed, micro_batch=micro, grad_accum=accum, world=world,
                              lr=float(cfg.trainer.lr), weight_decay=float(cfg.trainer.weight_decay),
                              betas=cfg.trainer.betas, warmup_steps=warmup, total_steps=total_steps)
    trainable = [p for h in heads.values() for p in h.trainable()]
    engine, _, _, scheduler = deepspeed.initialize(model=bank, model_parameters=trainable, config=ds_cfg)
    backbone = FrozenBackbone(model, layers)
    need_teacher = needs_final_layer(objective)
    autocast = cfg.trainer.autocast == "bf16"

    ckpt_dir = run_dir / "checkpoints"
    step, resumed_at = 0, None
    layout = {"world_size": world, "micro_batch": micro, "grad_accum": accum, "heads": _head_shapes(heads)}
    if (ckpt_dir / "latest").is_file():
        _check_layout(ckpt_dir, layout, run_dir)
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = resumed_at = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        if is_main:
            print(f"[ppd_train] resumed from {ckpt_dir} at step {step}/{total_steps}")

    run = _init_wandb(cfg, run_dir, data, total_steps) if is_main else None
    keep_best = bool(cfg.trainer.keep_best)
    best_path = run_dir / "best_heads.pt"
    # only a resumed run continues a best-so-far (a fresh run in the same directory starts its own)
    best = torch.load(best_path, weights_only=True) if keep_best and is_main and step and best_path.is_file() else {}
    history = []
    t_last, tokens_since = time.time(), 0
    log_every, eval_every = int(cfg.trainer.log_every), int(cfg.trainer.eval_every)
    save_every = int(cfg.trainer.save_every)
    save_minutes, t_saved = cfg.trainer.save_every_minutes, time.time()
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train heads", disable=not is_main, dynamic_ncols=True)
    last = None  # the last step's validation scores
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        losses = {}
        for m in range(accum):
            ids = data.train[_batch_rows(perm, in_epoch * accum + m, micro, world, rank)].to(device)
            prev = known = None
            if cfg.head.reads_prev:
                hidden, teacher, final = backbone(ids, final_logits=need_teacher, final_hidden=True)
                prev, known = previous_states(final, float(cfg.head.prev_drop))
            else:
                hidden, teacher = backbone(ids, final_logits=need_teacher)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):  # the heads' products only
                loss, per_head = engine(hidden, ids, teacher, prev, known)
            engine.backward(loss)
            engine.step()
            for d, v in per_head.items():
                losses[d] = losses.get(d, 0.0) + v.item() / accum
        step += 1
        tokens_since += global_batch * seq_len
        bar.update(1)
        metrics = {}
        if step % log_every == 0 or step == total_steps:
            dt = time.time() - t_last
            metrics.update({f"train/loss/layer{d}": v for d, v in losses.items()})
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": tokens_since / dt,
                            "train/epoch": step / steps_per_epoch})
            t_last, tokens_since = time.time(), 0
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}")
        if step % eval_every == 0 or step == total_steps:
            scores = evaluate(backbone, engine.module, val, micro, device, val_scored)
            metrics.update(scores)
            if keep_best and is_main:
                _track_best(best, best_path, engine.module, scores, step)
            if step == total_steps:
                last = scores
        if metrics and is_main:
            history.append({"step": step, **metrics})
            if run is not None:
                run.log(metrics, step=step)
        if step % save_every == 0 or step == total_steps or _minutes_due(save_minutes, t_saved, device):
            t_saved = time.time()
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}",
                                   client_state={"step": step, "torch_rng": torch.get_rng_state()})
            if is_main:
                (ckpt_dir / "layout.json").write_text(json.dumps(layout))
                _prune_checkpoints(ckpt_dir, keep=int(cfg.trainer.keep_checkpoints))
        if cfg.trainer.debug_kill_at_step == step:  # fault injection: the resume test's SIGKILL
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    if last is None:  # resumed after its last step: the loop did not score it in this process
        last = evaluate(backbone, engine.module, val, micro, device, val_scored)
        if keep_best and is_main:
            _track_best(best, best_path, engine.module, last, total_steps)
    final, selected = dict(last), {}
    if keep_best and is_main:
        for d, rec in best.items():  # each head independently: the backbone is frozen, heads never interact
            engine.module.heads[str(d)].load_state_dict(rec["state"], strict=False)
            final.update({k: v for k, v in rec["metrics"].items() if k.endswith(f"/layer{d}")})
            selected[d] = rec["step"]
    result = {"final": final, "steps": total_steps, "train_blocks": len(data.train), "seq_len": seq_len,
              "selected_steps": selected, "last": last, "resumed_at_step": resumed_at,
              # this process's peak (a resumed run's from its resumption on): what a GPU user sizes a node by
              "peak_device_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
              else None}
    if is_main:
        _export(run_dir, engine.module, model, cfg, data, final, selected)
        (run_dir / "metrics.json").write_text(json.dumps({**result, "history": history}, indent=1))
        if run is not None:
            run.summary.update(final)
            run.finish()
        print(f"[ppd_train] done: heads in {run_dir / 'heads'}")
        for d in layers:
            at = f" (step {selected[d]} of {total_steps}, the best validation top-1)" if d in selected else ""
            print(f"  layer {d}: val top-1 agreement {final[f'val/top1_agree/layer{d}']:.3f}, "
                  f"top-5 {final[f'val/top5_agree/layer{d}']:.3f}{at}")
    torch.distributed.barrier()
    return result


def _head_shapes(heads: dict[int, EarlyExitHead]) -> dict:
    """What a checkpoint's head weights are shaped by, per layer (JSON keys are strings)."""
    return {str(d): {"projection": h.projection, "own_rows": len(h.rows) if h.projection == "frequent" else None,
                     "adapter_rank": int(h.adapter_rank), "reads_prev": bool(h.reads_prev), "block": h.block is not None}
            for d, h in sorted(heads.items())}


def _check_layout(ckpt_dir: Path, layout: dict, run_dir: Path) -> None:
    """A run resumes only as it was laid out: the ZeRO partitions and the order of the batches depend on the world
    size and the batch shape, so another layout stops here, before DeepSpeed reads anything."""
    saved_path = ckpt_dir / "layout.json"
    if not saved_path.is_file():
        return  # written by an older ppd: DeepSpeed's own checks apply
    saved = json.loads(saved_path.read_text())
    if "heads" in saved and saved["heads"] != layout.get("heads"):  # (older layouts did not record the heads)
        there, here, parts = saved["heads"], layout.get("heads") or {}, []
        for d in sorted(set(there) | set(here), key=int):
            a, b = there.get(d, {}), here.get(d, {})
            fields = [f"{k} {a.get(k)} there, {b.get(k)} here" for k in sorted({**a, **b}) if a.get(k) != b.get(k)]
            if fields:
                parts.append(f"layer {d}: " + ", ".join(fields))
        diff = "; ".join(parts)
        raise PPDError(f"{run_dir} holds checkpoints of other heads ({diff}): the run name does not carry every head "
                       f"setting, and such a change is another run. Fix: start a new run (run_name=<new name>), or "
                       f"relaunch with the head settings that wrote it")
    batch = {k: v for k, v in layout.items() if k != "heads"}
    if {k: saved.get(k) for k in batch} != batch:
        diff = ", ".join(f"{k} {saved.get(k)} there, {v} here" for k, v in batch.items() if saved.get(k) != v)
        raise PPDError(f"{run_dir} was trained with another layout ({diff}); its checkpoints resume only with the "
                       f"same one. Fix: relaunch with NPROC={saved.get('world_size')} (torchrun --nproc_per_node) and "
                       f"trainer.micro_batch={saved.get('micro_batch')} trainer.grad_accum={saved.get('grad_accum')}, "
                       f"or start a new run (run_name=<new name>)")


def _prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _track_best(best: dict, path: Path, bank: HeadBank, scores: dict, step: int) -> None:
    """Keep each head's weights from the evaluation where its validation top-1 was highest (a later one wins a tie).
    Small heads on a small corpus overfit within an epoch, so the last step is often not the best; the file lets an
    interrupted run resume with what it had found."""
    changed = False
    for d, head in bank.heads.items():
        score = scores[f"val/top1_agree/layer{d}"]
        if int(d) not in best or score >= best[int(d)]["metrics"][f"val/top1_agree/layer{d}"]:
            trained = {id(p) for p in head.trainable()}
            state = {n: p.detach().to("cpu", copy=True) for n, p in head.named_parameters() if id(p) in trained}
            best[int(d)] = {"step": step, "metrics": {k: v for k, v in scores.items() if k.endswith(f"/layer{d}")},
                            "state": state}
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(best, tmp)
        os.replace(tmp, path)  # a kill mid-write leaves the previous file whole


def _export(run_dir: Path, bank: HeadBank, model, cfg, data, final: dict, selected: dict | None = None) -> None:
    heads = {int(d): h for d, h in bank.heads.items()}
    meta = {"objective": cfg.head.objective, "distill_kind": cfg.head.distill_kind,
            "data": data.source, "model_spec": cfg.model.spec,
            **({"init_from": str(cfg.head.init_from)} if cfg.head.init_from else {})}  # what training continued
    per_head = {d: {"metrics": {k.split("/layer")[0].replace("val/", "val_"): v for k, v in final.items()
                                if k.endswith(f"/layer{d}")}} for d in heads}
    for d, step in (selected or {}).items():
        per_head[d]["selected_step"] = step
    save_heads(run_dir / "heads", heads, model, meta, per_head)


def _init_wandb(cfg, run_dir: Path, data, total_steps: int):
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.update(data_source=data.source, train_blocks=len(data.train), total_steps=total_steps)
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.run_name, id=run_id,
                      resume="allow", dir=str(run_dir), mode=cfg.wandb.mode, config=config)
