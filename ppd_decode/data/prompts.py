"""Prompt building: one template per task, the tokenizer's chat template where it has one, and a token budget.

A prompt over budget has its task's ``truncate`` field cut (from the end) until it fits; how many tokens were cut
is recorded on the prompt and summed in a report, so nothing overflows silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ppd_decode.data.tasks import TaskConfig, TaskRows
from ppd_decode.errors import PromptTooLongError, TaskDataError


@dataclass
class Prompt:
    task: str
    id: str
    text: str  # exactly what was tokenized (chat markup included)
    input_ids: list[int]
    reference: Any
    truncated_tokens: int = 0


@dataclass
class TruncationReport:
    task: str
    prompts: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    max_cut: int = 0
    budget: int = 0
    longest: int = 0

    def add(self, p: Prompt) -> None:
        self.prompts += 1
        self.longest = max(self.longest, len(p.input_ids))
        if p.truncated_tokens:
            self.truncated += 1
            self.tokens_cut += p.truncated_tokens
            self.max_cut = max(self.max_cut, p.truncated_tokens)

    def __str__(self) -> str:
        return (f"{self.task}: {self.prompts} prompts, longest {self.longest}/{self.budget} tokens; "
                f"{self.truncated} truncated ({self.tokens_cut} tokens cut, at most {self.max_cut} from one)")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, user_text: str, answer_prefix: str = "", use_chat_template: bool | None = None) -> tuple[str, list[int]]:
    """The text a model sees for one user turn, and its token ids."""
    chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        # The chat template already writes the special tokens (BOS and turn markers).
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    text = user_text + answer_prefix
    return text, tokenizer(text)["input_ids"]


def encode_chat(tokenizer, user_text: str) -> list[int]:
    return render(tokenizer, user_text)[1]


def build_prompts(task_rows: TaskRows, tokenizer, *, max_prompt_tokens: int | None = None,
                  use_chat_template: bool | None = None, max_new_tokens: int = 0,
                  context_length: int | None = None) -> tuple[list[Prompt], TruncationReport]:
    """Prompts for every row, each within ``max_prompt_tokens`` (default: the task's budget).

    With ``context_length`` (the model's max positions), the budget plus ``max_new_tokens`` must fit in it.
    """
    task = task_rows.task
    budget = max_prompt_tokens or task.max_prompt_tokens
    check_fits_context(budget, max_new_tokens, context_length, what=f"task {task.name}'s max_prompt_tokens")
    report = TruncationReport(task.name, budget=budget)
    prompts = []
    for row in task_rows.rows:
        p = build_prompt(task, row, tokenizer, budget, use_chat_template, where=task_rows.source)
        report.add(p)
        prompts.append(p)
    return prompts, report


def build_prompt(task: TaskConfig, row: dict, tokenizer, budget: int, use_chat_template: bool | None = None,
                 where: str = "") -> Prompt:
    values = dict(row["inputs"])

    def make() -> tuple[str, list[int]]:
        return render(tokenizer, task.instruction.format(**values), task.answer_prefix, use_chat_template)

    text, ids = make()
    cut = 0
    if len(ids) > budget:
        if task.truncate is None:
            raise PromptTooLongError(
                f"{where} row {row['id']}: the {task.name} prompt has {len(ids)} tokens, over the budget of "
                f"{budget}, and the task names no field to truncate. Fix: raise max_prompt_tokens or set `truncate`.")
        field_ids = tokenizer(values[task.truncate], add_special_tokens=False)["input_ids"]
        keep = len(field_ids)
        # Decoding a cut token list and re-tokenizing can merge differently, so shrink until it really fits.
        while len(ids) > budget:
            keep -= len(ids) - budget
            if keep < 0:
                raise PromptTooLongError(
                    f"task {task.name}: even with {task.truncate!r} empty the prompt exceeds {budget} tokens. "
                    f"Fix: raise max_prompt_tokens (the template alone needs more).")
            values[task.truncate] = tokenizer.decode(field_ids[:keep])
            text, ids = make()
        cut = len(field_ids) - keep
    return Prompt(task.name, row["id"], text, ids, row["reference"], cut)


def check_fits_context(prompt_tokens: int, max_new_tokens: int, context_length: int | None, what: str = "prompt") -> None:
    if max_new_tokens < 0:
        raise TaskDataError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_length is not None and prompt_tokens + max_new_tokens > context_length:
        raise PromptTooLongError(
            f"{what} ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {context_length} positions. Fix: lower max_prompt_tokens or max_new_tokens.")


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def load_prompts(task: TaskConfig | str, tokenizer, n: int | None = None, source: str = "auto", **kw):
    """``load_task`` then ``build_prompts``: the usual path from a task name to token ids."""
    from ppd_decode.data.tasks import load_task

    return build_prompts(load_task(task, n=n, source=source), tokenizer, **kw)


__all__ = ["Prompt", "TruncationReport", "build_prompts", "build_prompt", "render", "encode_chat",
           "check_fits_context", "context_length", "load_prompts"]
