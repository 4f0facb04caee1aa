import dataclasses

import pytest

from ppd_decode import PromptTooLongError, TaskDataError
from ppd_decode.data.prompts import build_prompt, build_prompts, check_fits_context, render
from ppd_decode.data.tasks import TaskConfig, TaskRows
from ppd_decode.models.loading import byte_tokenizer

TASK = TaskConfig.from_dict({
    "name": "toy", "hub": "none/none", "split": "test", "fields": {"doc": "doc", "q": "q"}, "reference": "ref",
    "instruction": "Read: {doc}\nQ: {q}", "answer_prefix": "\nA:", "truncate": "doc", "max_prompt_tokens": 80})


def _row(doc, q="why?"):
    return {"id": "r", "inputs": {"doc": doc, "q": q}, "reference": "because"}


def test_chat_template_when_the_tokenizer_has_one():
    tok = byte_tokenizer(chat_template=True)
    text, ids = render(tok, "hi", "\nA:")
    assert text == "<s>user: hi\n<s>assistant: " and "\nA:" not in text
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 2  # no extra BOS from tokenization


def test_plain_template_otherwise():
    tok = byte_tokenizer(chat_template=False)
    text, ids = render(tok, "hi", "\nA:")
    assert text == "hi\nA:"
    assert tok.decode(ids, skip_special_tokens=True) == "hi\nA:"


def test_short_prompt_is_not_cut():
    p = build_prompt(TASK, _row("short"), byte_tokenizer(), 80)
    assert p.truncated_tokens == 0 and "Read: short\nQ: why?" in p.text


def test_long_field_is_cut_to_the_budget_and_counted():
    tok = byte_tokenizer()
    doc = "lorem ipsum " * 40
    p = build_prompt(TASK, _row(doc), tok, 80)
    full = build_prompt(TASK, _row(doc), tok, 10_000)
    assert len(p.input_ids) <= 80 < len(full.input_ids)
    assert p.truncated_tokens == len(full.input_ids) - len(p.input_ids)  # byte tokens: exact accounting
    assert "Q: why?" in p.text  # the question survives; only the document is cut


def test_report_sums_truncation():
    tok = byte_tokenizer()
    rows = TaskRows(TASK, [_row("x" * 200), _row("short"), _row("y" * 300)], "mem")
    prompts, report = build_prompts(rows, tok)
    assert (report.prompts, report.truncated) == (3, 2)
    assert report.tokens_cut == prompts[0].truncated_tokens + prompts[2].truncated_tokens > 0
    assert report.max_cut == prompts[2].truncated_tokens
    assert "2 truncated" in str(report)


def test_too_long_without_truncatable_field():
    task = dataclasses.replace(TASK, truncate=None)
    with pytest.raises(PromptTooLongError, match="names no field to truncate"):
        build_prompt(task, _row("z" * 200), byte_tokenizer(), 80)


def test_budget_smaller_than_the_template():
    with pytest.raises(PromptTooLongError, match="template alone"):
        build_prompt(TASK, _row("doc", q="q" * 100), byte_tokenizer(), 80)


def test_budget_plus_generation_must_fit_the_context():
    rows = TaskRows(TASK, [_row("a")], "mem")
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 100"):
        build_prompts(rows, byte_tokenizer(), max_new_tokens=64, context_length=100)
    check_fits_context(36, 64, 100)
    with pytest.raises(TaskDataError):
        check_fits_context(1, -1, 100)


def test_config_errors():
    base = dict(name="t", hub="h", split="s", fields={"a": "a"}, reference="r", instruction="{a}")
    with pytest.raises(TaskDataError, match="truncate"):
        TaskConfig.from_dict({**base, "truncate": "b"})
    with pytest.raises(TaskDataError, match="never used"):
        TaskConfig.from_dict({**base, "fields": {"a": "a", "b": "b"}})
