"""Training data for heads: chat-format corpora through ``datasets``, optional self-distillation, packing.

Rows are ``{"messages": [{"role", "content"}, ...]}`` (the hub's chat schema), from local JSONL files under the
data root or a hub name. A deterministic slice is held out for validation. In self-distillation mode the base
model answers each first user turn itself (batched greedy generation, cached to disk and resumable), and the heads
train on those conversations: the distribution they meet at decode time. Conversations are rendered with the
tokenizer's chat template and packed into fixed-length blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ppd_decode.data.tasks import TASKS, TaskConfig, data_root
from ppd_decode.errors import TaskDataError
from ppd_decode.models.packed_linear import packed_linears

EVAL_FOLDERS = tuple(TASKS) + ("bench",)
SORT_WINDOW = 8  # self-distillation sorts this many batches of prompts by length, and flushes them together


@dataclass
class DataConfig:
    name: str = "dolly"
    files: tuple[str, ...] = ("train/dolly15k.jsonl",)  # relative to the data root, or absolute
    hub: str | None = None  # a hub data set in chat format instead of files
    split: str = "train"
    max_examples: int | None = None
    val_examples: int = 200
    max_train_tokens: int | None = 100_000  # the data budget: blocks beyond it are dropped (None: all)
    seed: int = 0
    self_distill: bool = False
    sd_max_new_tokens: int = 128
    sd_max_prompt_tokens: int = 384
    sd_batch_size: int = 32
    sd_num_prompts: int | None = None
    # held-out prompts answered too, so validation scores the heads on the model's own text, as decoding does
    # (None: every held-out prompt; 0: validate on the held-out human text instead)
    sd_val_prompts: int | None = 64
    # prompts in the evaluation tasks' formats made from the training corpus's own text, answered by the model too:
    # {task name: how many} (``task_format_prompts``); empty: none
    sd_task_prompts: dict[str, int] | None = None

    @classmethod
    def from_cfg(cls, c) -> "DataConfig":
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(c, resolve=True) if not isinstance(c, dict) else dict(c)
        sd = d.pop("self_distill", {}) or {}
        if isinstance(sd, dict):
            d["self_distill"] = bool(sd.get("enabled", False))
            for k in ("max_new_tokens", "max_prompt_tokens", "batch_size", "num_prompts", "val_prompts", "task_prompts"):
                if k in sd:
                    d[f"sd_{k}"] = sd[k]
        else:
            d["self_distill"] = bool(sd)
        d["files"] = tuple(d.get("files") or ())
        d["sd_task_prompts"] = {str(k): int(v) for k, v in (d.get("sd_task_prompts") or {}).items() if v} or None
        return cls(**d)


def resolve_files(cfg: DataConfig) -> list[Path]:
    root = data_root()
    paths = [Path(f) if Path(f).is_absolute() else root / f for f in cfg.files]
    for p in paths:
        # Heads are evaluated on these sets; training on them would inflate every match rate we report.
        if p.resolve().parent.name in EVAL_FOLDERS and p.resolve().parent.parent == root.resolve():
            raise TaskDataError(f"{p} is evaluation data: heads must never train on it. "
                                f"Fix: use the chat corpora under {root / 'train'} (data=dolly).")
        if not p.is_file():
            raise TaskDataError(f"training data file {p} does not exist. Fix: set PPD_DATA to the folder that "
                                f"holds {cfg.files} or pass data.files=[...] / data.hub=<name>.")
    return paths


def load_conversations(cfg: DataConfig) -> list[list[dict]]:
    import datasets

    datasets.disable_progress_bars()
    sl = "" if cfg.max_examples is None else f"[:{cfg.max_examples}]"
    if cfg.hub:
        where = cfg.hub
        ds = datasets.load_dataset(cfg.hub, split=cfg.split + sl)
    else:
        paths = resolve_files(cfg)
        where = ", ".join(map(str, paths))
        try:
            ds = datasets.load_dataset("json", data_files=[str(p) for p in paths], split="train" + sl)
        except Exception as e:
            raise TaskDataError(f"could not read {where}: {type(e).__name__}: {e}") from e
    convs = []
    for i, row in enumerate(ds):
        msgs = row.get("messages")
        if not msgs or not all(isinstance(m, dict) and m.get("role") and isinstance(m.get("content"), str)
                                for m in msgs):
            raise TaskDataError(f"{where}: row {i} has no usable 'messages' field (a list of {{role, content}}). "
                                f"Fix the row, or point data.files at chat-format JSONL.")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not convs:
        raise TaskDataError(f"{where} holds no rows: nothing to train on. Fix data.files / data.max_examples.")
    return convs


def split_train_val(convs: list, val_examples: int, seed: int) -> tuple[list, list]:
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_val = min(val_examples, len(convs) // 5)  # never more than a fifth of a small corpus
    val = [convs[i] for i in order[:n_val]]
    train = [convs[i] for i in order[n_val:]]
    if not train:
        raise TaskDataError(f"after holding out {n_val} validation rows no training rows remain. "
                            f"Fix: lower data.val_examples or add data.")
    return train, val


def render(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
    ids = tokenizer(text)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def answer_positions(tokenizer, messages: list[dict], ids: list[int]) -> list[bool]:
    """For each position of ``ids`` (= ``render(tokenizer, messages)``): is the next token part of the answer? These
    are the positions decoding predicts from (the prompt's last one, then every answer token but the last); the
    match rate is scored there. Where the prompt's rendering is not a prefix of ``ids`` (no chat template, one
    message) every position but the last counts."""
    from ppd_decode.data.prompts import render as render_prompt

    start = 0
    if len(messages) >= 2 and messages[0]["role"] == "user":
        prompt = render_prompt(tokenizer, messages[0]["content"])[1]
        start = len(prompt) if ids[:len(prompt)] == prompt else 0
    first = max(start - 1, 0)
    return [first <= t < len(ids) - 1 for t in range(len(ids))]


def pack(token_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate and cut into [N, seq_len] blocks (the remainder is dropped)."""
    flat = [t for ids in token_lists for t in ids]
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ------------------------------------------------------------------------------------------- self-distillation
def self_distill_cache_path(cfg: DataConfig, model_spec: str, cache_root: Path) -> Path:
    # The prompt order depends only on the seed, so the first n answers are the same for any num_prompts >= n: the
    # key leaves num_prompts out, and asking for more prompts later extends the same file instead of starting over.
    key = json.dumps([model_spec, cfg.files, cfg.hub, cfg.max_examples, cfg.seed, cfg.sd_max_new_tokens,
                      cfg.sd_max_prompt_tokens], sort_keys=True)
    h = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_root / "self_distill" / f"{cfg.name}-{h}.jsonl"


def generation_key(cfg: DataConfig, model_spec: str) -> dict:
    """What an answer depends on besides its prompt: the model and the generation settings."""
    return {"model": model_spec, "max_new_tokens": cfg.sd_max_new_tokens, "max_prompt_tokens": cfg.sd_max_prompt_tokens}


def declare(cache: Path, key: dict) -> None:
    """Write the generation key of ``cache`` beside it (``<stem>.json``), so other configurations can reuse its
    answers (``known_answers``)."""
    side = cache.with_suffix(".json")
    if not side.is_file() or json.loads(side.read_text()) != key:
        side.parent.mkdir(parents=True, exist_ok=True)
        tmp = side.with_name(f"{side.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(key))
        tmp.replace(side)


def known_answers(cache: Path, key: dict) -> dict[str, str]:
    """The answers, by prompt, that the other caches beside ``cache`` with the same generation key hold: a prompt
    answered for one configuration (e.g. dolly alone) is not generated again for another (dolly + gpteacher, another
    seed or split)."""
    known = {}
    for side in sorted(cache.parent.glob("*.json")):
        if side == cache.with_suffix(".json"):
            continue
        try:
            if json.loads(side.read_text()) != key:
                continue
        except (OSError, json.JSONDecodeError):
            continue
        for r in _read_rows(side.with_suffix(".jsonl"), repair=False):
            known.setdefault(r["prompt"], r["response"])
    return known


def _read_rows(path: Path, repair: bool = True) -> list[dict]:
    """The rows of a self-distillation file; a line cut by a kill is dropped (and, with ``repair``, the file is
    rewritten without it: only for a file no other process reads)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: regenerate from here
    if repair:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def shipped_answers_path(cache: Path) -> Path | None:
    """Where the package keeps a self-distillation cache's answers, beside the heads trained on them
    (``shipped_heads/<name>/self_distill/``, written by ``scripts/ship_heads.py --answers``), or None: the same file
    name (its key holds the model, the data files and the generation settings), prompts by their SHA-1."""
    from ppd_decode.models.catalog import SHIPPED

    return next(iter(sorted(SHIPPED.glob(f"*/self_distill/{cache.stem}.jsonl.gz"))), None)


def prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()


def _with_shipped(done: list[dict], prompts: list[str], cache: Path) -> list[dict]:
    """``done`` continued, in prompt order, by the answers the package ships for this cache (up to the first prompt
    it has no answer for), so a fresh machine generates only what nobody has generated before."""
    path = shipped_answers_path(cache)
    if len(done) >= len(prompts) or path is None:
        return done
    import gzip

    with gzip.open(path, "rt") as f:
        shipped = {r["sha1"]: r["response"] for r in map(json.loads, f)}
    more = []
    for p in prompts[len(done):]:
        if prompt_key(p) not in shipped:
            break
        more.append({"prompt": p, "response": shipped[prompt_key(p)]})
    return done + more


def write_shipped_answers(cache: Path, out: Path) -> Path:
    """A self-distillation cache as the package ships it (answers keyed by the prompt's SHA-1: no prompt text);
    ``out`` is a directory (the file keeps the cache's name) or a file."""
    import gzip

    if out.is_dir():
        out = out / f"{cache.stem}.jsonl.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:  # (mtime 0: the same answers give the same bytes)
        for r in _read_rows(cache, repair=False):
            f.write((json.dumps({"sha1": prompt_key(r["prompt"]), "response": r["response"]}) + "\n").encode())
    tmp.replace(out)
    return out


def _check_prompts(rows: list[dict], prompts: list[str], path: Path) -> None:
    if any(r["prompt"] != p for r, p in zip(rows, prompts)):
        raise TaskDataError(f"{path} holds answers to other prompts than this configuration's (the data files "
                            f"changed under the same names?). Fix: delete {path} to generate them again.")


@torch.no_grad()
def _answer(prompts: list[str], model, tokenizer, cfg: DataConfig, path: Path, progress: bool,
            shipped: bool = False, known: dict[str, str] | None = None) -> None:
    """Append to ``path`` the model's greedy answer to each of ``prompts`` it does not hold yet (batched, flushed
    every ``SORT_WINDOW`` batches: an interrupted run resumes where it stopped); with ``shipped``, first those the
    package ships for this cache (a rank's shard file has none). Prompts in ``known`` take that answer instead."""
    from tqdm import tqdm

    from ppd_decode.data.prompts import render as render_prompt

    path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_rows(path)
    _check_prompts(done, prompts, path)
    if shipped:
        filled = _with_shipped(done, prompts, path)
        if len(filled) > len(done):
            with path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in filled[len(done):]))
            done = filled
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    todo = prompts[len(done):]
    bs = cfg.sd_batch_size
    window = bs * SORT_WINDOW
    known = known or {}
    bar = tqdm(total=sum(p not in known for p in todo), desc="self-distill: generating", unit="prompt",
               disable=not progress or not todo)
    with path.open("a") as f, packed_linears(model):  # (on a CPU; elsewhere the model's own linears)
        for w in range(0, len(todo), window):
            # Batches of similar prompt lengths: a batch pads to its longest prompt, and instruction prompts vary in
            # length by orders of magnitude. The window is written in prompt order.
            chunk = todo[w:w + window]
            answers = {i: known[p] for i, p in enumerate(chunk) if p in known}
            rendered = {i: render_prompt(tokenizer, p)[1] for i, p in enumerate(chunk) if i not in answers}
            order = sorted(rendered, key=lambda i: len(rendered[i]))
            for j in range(0, len(order), bs):
                rows = order[j:j + bs]
                width = max(len(rendered[i]) for i in rows)
                ids = torch.tensor([[pad] * (width - len(rendered[i])) + rendered[i] for i in rows],
                                   device=model.device)
                mask = torch.tensor([[0] * (width - len(rendered[i])) + [1] * len(rendered[i]) for i in rows],
                                    device=model.device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.sd_max_new_tokens,
                                     do_sample=False, pad_token_id=pad)
                for i, row in zip(rows, out[:, width:].tolist()):
                    answers[i] = tokenizer.decode(row, skip_special_tokens=True)
                bar.update(len(rows))
            f.write("".join(json.dumps({"prompt": p, "response": answers[i]}) + "\n" for i, p in enumerate(chunk)))
            f.flush()
    bar.close()


def self_distill(convs: list[list[dict]], model, tokenizer, cfg: DataConfig, cache: Path,
                 progress: bool = True, rank: int = 0, world: int = 1, gather=None,
                 known: dict[str, str] | None = None) -> None:
    """Write (first user turn, the model's own greedy answer) for each conversation to ``cache``. Resumable: rows
    already in it are not generated again.

    With several ranks (``gather``: all-gather of a Python object, e.g. ``torch.distributed.all_gather_object``)
    each rank answers its shard of the missing prompts (every ``world``-th), into a shard file of its own that
    resumes too; the shards are then gathered and merged in prompt order, and every rank writes the merged cache
    (atomically: on a filesystem the nodes share they write the same bytes; without one, each node has its copy).
    Adding ranks divides the time; the result is the one-rank result."""
    from ppd_decode.data.prompts import render as render_prompt

    # Prompts over the budget are left out (cutting them would drop the chat template's header).
    prompts = [c[0]["content"] for c in convs if c[0]["role"] == "user"
               and len(render_prompt(tokenizer, c[0]["content"])[1]) <= cfg.sd_max_prompt_tokens]
    if cfg.sd_num_prompts is not None:
        prompts = prompts[: cfg.sd_num_prompts]
    if world == 1:
        _answer(prompts, model, tokenizer, cfg, cache, progress, shipped=True, known=known)
        return
    done = _read_rows(cache, repair=False)  # other ranks may be reading it (a shared filesystem)
    _check_prompts(done, prompts, cache)
    done = _with_shipped(done, prompts, cache)  # (written with the merge below)
    n = min(gather(len(done)))  # node-local caches may differ: all ranks start from what every one has
    todo = prompts[n:]
    shard = cache.with_name(f"{cache.stem}.from{n}.rank{rank}of{world}.jsonl")
    _answer(todo[rank::world], model, tokenizer, cfg, shard, progress and rank == 0, known=known)
    parts = gather(_read_rows(shard))
    merged = [parts[i % world][i // world] for i in range(len(todo))]
    if any(r["prompt"] != p for r, p in zip(merged, todo)):
        raise TaskDataError(f"the ranks' self-distillation shards of {cache} do not line up with the prompts (a "
                            f"rank ran another configuration?). Fix: run every rank with the same data settings.")
    tmp = cache.with_name(f"{cache.name}.tmp{rank}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in done[:n] + merged))
    tmp.replace(cache)
    shard.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ prompts in the tasks' formats
# A user turn of the corpus "instruction\n\npassage" carries a passage (dolly's closed QA, summarization and
# information extraction rows); an answer's first paragraph is plain English prose.
PASSAGE_MIN_CHARS = 300
INSTRUCTION_MAX_CHARS = 400
SOURCE_WORDS = (8, 60)
FIELD_KINDS = {"context": "passage", "article": "passage", "question": "question", "source": "english"}


def _derived_fields(conv: list[dict]) -> dict[str, str]:
    """What one conversation can fill a task template with: a passage and the question about it, and English prose
    (the first paragraph of the answer, for translation)."""
    out = {}
    instruction, sep, passage = conv[0]["content"].partition("\n\n")
    instruction, passage = instruction.strip(), passage.strip()
    if sep and len(passage) >= PASSAGE_MIN_CHARS and len(instruction) <= INSTRUCTION_MAX_CHARS:
        out["passage"] = passage
        if instruction.endswith("?"):
            out["question"] = instruction
    para = conv[-1]["content"].strip().split("\n")[0].strip() if conv[-1]["role"] == "assistant" else ""
    words = len(para.split())
    if SOURCE_WORDS[0] <= words <= SOURCE_WORDS[1] and not any(c in para for c in "{}<>#=|") and "http" not in para:
        out["english"] = para
    return out


def task_format_prompts(convs: list[list[dict]], counts: dict[str, int], tokenizer, seed: int) -> list[str]:
    """Up to ``counts[task]`` prompts in each evaluation task's format (its ``configs/task`` instruction template),
    filled with the training corpus's own text: its passages and questions (reading comprehension, summaries) and
    its English prose (translation). The heads then train on the model's answers to prompts shaped like the ones
    they are measured on, never on the evaluation sets themselves. Prompts over the task's token budget are left out.
    The tasks' prompts are interleaved, so any prefix of the list holds each task in proportion; the list depends
    only on the conversations, the counts and the seed."""
    from ppd_decode.data.prompts import render as render_prompt

    fields = [_derived_fields(c) for c in convs]
    per_task = []
    for name, n in sorted(counts.items()):
        task = TaskConfig.named(name)
        kinds = {f: FIELD_KINDS.get(f) for f in task.fields}
        unknown = [f for f, k in kinds.items() if k is None]
        if unknown:
            raise TaskDataError(f"task {name}'s template reads {unknown}, which the training corpus cannot fill "
                                f"(known fields: {sorted(FIELD_KINDS)}). Fix: drop {name} from "
                                f"data.self_distill.task_prompts.")
        order = list(range(len(convs)))
        random.Random(f"{seed}:{name}").shuffle(order)  # each task draws its own sample of the corpus
        prompts = []
        for i in order:
            if len(prompts) == n:
                break
            if all(k in fields[i] for k in kinds.values()):
                text = task.instruction.format(**{f: fields[i][k] for f, k in kinds.items()})
                if len(render_prompt(tokenizer, text)[1]) <= task.max_prompt_tokens:
                    prompts.append(text)
        per_task.append(prompts)
    width = max(map(len, per_task), default=0)
    return [ps[j] for j in range(width) for ps in per_task if j < len(ps)]


def task_prompts_cache(cache: Path, counts: dict[str, int], val: bool = False) -> Path:
    """The cache of the task-format prompts' answers, beside the corpus prompts' (its name holds the counts; with
    ``val``, those of the held-out conversations)."""
    key = json.dumps(sorted(counts.items()))
    return cache.with_name(f"{cache.stem}-tasks-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
                           f"{'-val' if val else ''}.jsonl")


def _task_format_answers(convs, counts: dict[str, int], cfg: DataConfig, cache: Path, model, tokenizer,
                         model_spec: str, rank: int, world: int, gather, val: bool = False) -> list[list[dict]]:
    """The model's answers to ``task_format_prompts(convs, counts)``, generated into a cache of their own with their
    own prompt budget (a task's, up to 768 tokens for news articles); answers with the same generation settings are
    reused across counts through the declared key, as for the corpus prompts."""
    prompts = task_format_prompts(convs, counts, tokenizer, cfg.seed)
    if not prompts:
        return []  # (no cache declared for nothing)
    budget = max(TaskConfig.named(t).max_prompt_tokens for t in counts)
    tcfg = replace(cfg, sd_max_prompt_tokens=budget, sd_num_prompts=None)
    tcache = task_prompts_cache(cache, counts, val)
    tkey = generation_key(tcfg, model_spec)
    known = known_answers(tcache, tkey)
    declare(tcache, tkey)
    self_distill([[{"role": "user", "content": p}] for p in prompts], model, tokenizer, tcfg, tcache,
                 rank=rank, world=world, gather=gather, known=known)
    return read_self_distilled(tcache)


def read_self_distilled(cache: Path, limit: int | None = None) -> list[list[dict]]:
    """The first ``limit`` (all, if None) cached conversations."""
    rows = cache.read_text().splitlines()[:limit]
    return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
            for r in map(json.loads, rows)]


@dataclass
class TrainingData:
    train: torch.Tensor  # [N, seq_len]
    val: torch.Tensor
    source: str
    conversations: int
    val_scored: torch.Tensor | None = None  # bool, val's shape: the answer positions validation scores


def build_training_data(cfg: DataConfig, tokenizer, seq_len: int, model=None, model_spec: str = "",
                        cache_root: Path | None = None, rank: int = 0, world: int = 1,
                        gather=None) -> TrainingData:
    convs = load_conversations(cfg)
    train_c, val_c = split_train_val(convs, cfg.val_examples, cfg.seed)
    source = cfg.hub or ",".join(cfg.files)
    if cfg.self_distill:
        from ppd_decode.models.loading import cache_dir

        cache = self_distill_cache_path(cfg, model_spec, Path(cache_root or cache_dir()))
        key = generation_key(cfg, model_spec)
        known = known_answers(cache, key)  # (read before this configuration's own files are declared)
        declare(cache, key)
        self_distill(train_c, model, tokenizer, cfg, cache, rank=rank, world=world, gather=gather, known=known)
        train_c_all, train_c = train_c, read_self_distilled(cache, cfg.sd_num_prompts)
        source += " (self-distilled)"
        if cfg.sd_task_prompts:
            tasks = _task_format_answers(train_c_all, cfg.sd_task_prompts, cfg, cache, model, tokenizer, model_spec,
                                         rank, world, gather)
            if not tasks:
                raise TaskDataError(f"{source}: no prompt in the formats of {sorted(cfg.sd_task_prompts)} could be "
                                    f"made from it (they need a passage after the instruction, or a prose answer). "
                                    f"Fix: drop data.self_distill.task_prompts, or add such conversations.")
            train_c = train_c + tasks
            source += f" + task-format prompts {dict(sorted(cfg.sd_task_prompts.items()))} (self-distilled)"
        if cfg.sd_val_prompts != 0:  # the held-out prompts' own answers (a file of their own: other prompts)
            val_cache = cache.with_name(f"{cache.stem}-val.jsonl")
            declare(val_cache, key)
            self_distill(val_c, model, tokenizer, replace(cfg, sd_num_prompts=cfg.sd_val_prompts), val_cache,
                         rank=rank, world=world, gather=gather, known=known)
            val_held, val_c = val_c, read_self_distilled(val_cache, cfg.sd_val_prompts)
            if cfg.sd_task_prompts:
                # validation in the same mix: the held-out conversations' task-format prompts too, alternating with
                # the plain ones so that the first validation blocks (trainer.eval_blocks) hold both
                each = -(-len(val_c) // len(cfg.sd_task_prompts))  # as many as the plain ones, split over the tasks
                tasks = _task_format_answers(val_held, {t: each for t in cfg.sd_task_prompts}, cfg, cache, model,
                                             tokenizer, model_spec, rank, world, gather, val=True)
                val_c = [c for pair in zip(val_c, tasks) for c in pair] + val_c[len(tasks):] + tasks[len(val_c):]
    train = pack([render(tokenizer, c) for c in train_c], seq_len)
    val_ids = [render(tokenizer, c) for c in val_c]
    val = pack(val_ids, seq_len)
    val_scored = pack([answer_positions(tokenizer, c, ids) for c, ids in zip(val_c, val_ids)], seq_len).bool()
    if cfg.max_train_tokens is not None:
        train = train[: max(1, cfg.max_train_tokens // seq_len)]
    if len(train) == 0:
        raise TaskDataError(f"{source} yields no full block of {seq_len} tokens. Fix: add data or lower "
                            f"trainer.seq_len.")
    if len(val) == 0:
        raise TaskDataError(f"the validation slice of {source} yields no full block of {seq_len} tokens. "
                            f"Fix: raise data.val_examples.")
    return TrainingData(train, val, source, len(convs), val_scored)
