"""The training config's schema: ``configs/train.yaml``'s ``head``, ``trainer`` and ``wandb`` groups as dataclasses.

``typed(cfg)`` merges a composed Hydra config into these (OmegaConf structured configs, the way Hydra's docs use a
schema), so a key the code does not know is an error and the code reads every value by attribute, with no defaults
of its own that could drift from the YAML. The defaults here equal ``configs/train.yaml`` (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf


@dataclass
class HeadConfig:
    layers: list[int] = field(default_factory=lambda: [15])
    objective: str = "distill"  # ce | distill
    distill_kind: str = "argmax"  # argmax | kl
    temperature: float = 1.0
    projection: str = "frequent"  # frequent | own | shared
    adapter_rank: int = 0
    train_vocab: int = 4096
    reads_prev: bool = False  # the head also reads f(t-1), the final layer's state at the previous position
    prev_drop: float = 0.25  # fraction of positions trained with f(t-1) unknown (as decoding meets them)
    block: bool = False  # a block head: one decoder layer of its own over the layer-d states of every position
    init_from: str | None = None  # heads to continue training from (a heads directory, or "shipped"); null: the lens


@dataclass
class TrainerConfig:
    deepspeed: str = "zero2_cpu"
    lr: float = 2.0e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_ratio: float = 0.04
    epochs: int = 1
    max_steps: int | None = None
    seq_len: int = 256
    micro_batch: int = 4
    grad_accum: int = 1
    log_every: int = 5
    eval_every: int = 50
    eval_blocks: int = 16
    save_every: int = 50
    save_every_minutes: float | None = None  # also checkpoint when this long has passed since the last save
    keep_checkpoints: int = 2
    keep_best: bool = True  # export each head as it was at its best validation top-1, not at the last step
    threads: int | None = None
    autocast: str | None = None  # bf16 | null
    data_only: bool = False  # prepare the training data (self-distillation included), then stop
    debug_kill_at_step: int | None = None


@dataclass
class WandbConfig:
    project: str = "ppd-heads"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled


SCHEMA = {"head": HeadConfig, "trainer": TrainerConfig, "wandb": WandbConfig}


def typed(cfg):
    """``cfg`` with its schema-covered groups merged into their dataclasses (unknown keys raise)."""
    cfg = cfg.copy()
    for name, schema in SCHEMA.items():
        with_struct = OmegaConf.merge(OmegaConf.structured(schema), cfg.get(name) or {})
        OmegaConf.set_struct(with_struct, True)
        cfg[name] = with_struct
    return cfg
