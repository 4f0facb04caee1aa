"""Evaluation task data (SQuAD v1.1, WMT15 EN-FR, CNN/DailyMail) from the hub or from local JSONL files.

A task is described by a config file ``configs/task/<name>.yaml`` (``TaskConfig``): where its rows come from,
which fields a prompt uses, the prompt template and the token budget. The same ``datasets.load_dataset`` call
serves a hub name and a local file of the same schema; every row is checked for the fields the prompt needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ppd_decode.errors import TaskDataError

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = ("squad", "wmt15", "cnn_dailymail")  # the paper's evaluation tasks
BENCH_TASKS = TASKS + ("mt_bench",)  # plus the chat prompts speed benchmarks use


def configs_dir() -> Path:
    return Path(os.environ.get("PPD_CONFIGS", REPO_ROOT / "configs"))


def data_root() -> Path:
    """``$PPD_DATA``, else the ``shared/data`` folder that sits beside the repository."""
    return Path(os.environ.get("PPD_DATA", REPO_ROOT.parent / "shared" / "data"))


@dataclass
class TaskConfig:
    name: str
    hub: str | None  # None: local files only
    split: str
    fields: dict[str, str]
    reference: str
    instruction: str
    hub_config: str | None = None
    local: str | None = None
    id_field: str | None = None
    answer_prefix: str = "\nAnswer:"
    truncate: str | None = None
    max_prompt_tokens: int = 1024
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> "TaskConfig":
        """From a plain dict or an OmegaConf node (a Hydra config group entry)."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(d, DictConfig):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        known = {f.name for f in fields(cls)}
        d = dict(d)
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        cfg = cls(**d, extra=extra)
        missing_tpl = [k for k in cfg.fields if "{" + k + "}" not in cfg.instruction]
        if missing_tpl:
            raise TaskDataError(f"task {cfg.name}: fields {missing_tpl} are never used by its instruction template")
        if cfg.truncate is not None and cfg.truncate not in cfg.fields:
            raise TaskDataError(f"task {cfg.name}: truncate={cfg.truncate!r} is not one of its fields {list(cfg.fields)}")
        return cfg

    @classmethod
    def named(cls, name: str) -> "TaskConfig":
        path = configs_dir() / "task" / f"{name}.yaml"
        if not path.is_file():
            have = sorted(p.stem for p in (configs_dir() / "task").glob("*.yaml"))
            raise TaskDataError(f"no task config {path}; known tasks: {have}")
        from omegaconf import OmegaConf

        return cls.from_dict(OmegaConf.load(path))

    def local_path(self, root: Path | None = None) -> Path | None:
        return None if self.local is None else Path(root or data_root()) / self.local


def get_path(row: dict, dotted: str) -> Any:
    """``row['a']['b']`` for ``'a.b'`` (``'turns.0'`` indexes a list); None where any part is missing."""
    cur: Any = row
    for part in dotted.split("."):
        if isinstance(cur, list) and part.isdigit():
            if int(part) >= len(cur):
                return None
            cur = cur[int(part)]
        elif isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            return None
    return cur


@dataclass
class TaskRows:
    task: TaskConfig
    rows: list[dict]  # each: {"id", "inputs": {template name: str}, "reference": ...}
    source: str  # the file or hub name they came from


def load_task(task: TaskConfig | str, n: int | None = None, source: str = "auto",
              root: Path | str | None = None) -> TaskRows:
    """Load up to ``n`` rows of a task.

    ``source``: ``local`` (the JSONL under the data root), ``hub`` (``load_dataset(task.hub, task.hub_config)``),
    a path to a JSONL file or a dataset directory, or ``auto`` (local when the file exists, else hub).
    """
    import datasets

    task = TaskConfig.named(task) if isinstance(task, str) else task
    if n is not None and n < 1:
        raise TaskDataError(f"n must be >= 1, got {n}")
    sl = "" if n is None else f"[:{n}]"
    local = task.local_path(Path(root) if root else None)
    if source == "auto":
        source = "local" if local is not None and local.is_file() else "hub"
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if source == "hub":
            if task.hub is None:
                raise TaskDataError(f"task {task.name} has no hub data set; use its local file (source='local')")
            where = f"{task.hub}" + (f" ({task.hub_config})" if task.hub_config else "")
            ds = datasets.load_dataset(task.hub, task.hub_config, split=task.split + sl)
        else:
            path = local if source == "local" else Path(source)
            if path is None:
                raise TaskDataError(f"task {task.name} has no local file configured; use source='hub' or a path")
            where = str(path)
            if path.is_dir():  # a dataset directory laid out like a hub repo
                ds = datasets.load_dataset(str(path), task.hub_config, split=task.split + sl)
            elif path.is_file():
                ds = datasets.load_dataset("json", data_files=str(path), split="train" + sl)
            else:
                raise TaskDataError(
                    f"task {task.name}: data file {path} does not exist. Fix: set PPD_DATA to the folder that "
                    f"holds {task.local!r} (see shared/data/README.md), or use source='hub'.")
    except TaskDataError:
        raise
    except Exception as e:  # datasets wraps parse and network errors in many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TaskDataError(f"task {task.name}: could not load {where}: {type(e).__name__}: {msg}. Fix: check the "
                            f"file is JSON Lines in the schema of {task.hub}, or that the hub is reachable.") from e
    return TaskRows(task, validate_rows(task, ds, where), where)


def validate_rows(task: TaskConfig, rows, where: str) -> list[dict]:
    """Pick each row's prompt inputs and reference, naming the file, row and field of anything missing."""
    out = []
    need = dict(task.fields, __reference__=task.reference)
    for i, row in enumerate(rows):
        picked = {}
        for name, path in need.items():
            val = get_path(row, path)
            if val is None or (name != "__reference__" and not isinstance(val, str)):
                raise TaskDataError(
                    f"{where}: row {i} (line {i + 1}) has no field {path!r}"
                    + ("" if val is None else f" of type str (got {type(val).__name__})")
                    + f"; task {task.name} needs {sorted(need.values())}. Fix the row or the task's `fields` config.")
            picked[name] = val
        ref = picked.pop("__reference__")
        rid = get_path(row, task.id_field) if task.id_field else None
        out.append({"id": str(rid if rid is not None else i), "inputs": picked, "reference": ref})
    return out
