import json

import pytest

from ppd_decode import TaskDataError
from ppd_decode.data.prompts import build_prompts, load_prompts
from ppd_decode.data.tasks import TASKS, TaskConfig, load_task


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SQUAD_ROWS = [{"id": f"q{i}", "title": "T", "context": f"Paris is the capital of France. Row {i}.",
               "question": "What is the capital of France?", "answers": {"text": ["Paris"], "answer_start": [0]}}
              for i in range(5)]


@pytest.mark.parametrize("name", TASKS)
def test_task_configs_load(name):
    cfg = TaskConfig.named(name)
    assert cfg.name == name and cfg.truncate in cfg.fields and cfg.max_prompt_tokens > 0


def test_unknown_task_lists_known_ones():
    with pytest.raises(TaskDataError, match="known tasks"):
        TaskConfig.named("glue")


def test_local_file(tmp_path):
    f = _write_jsonl(tmp_path / "squad.jsonl", SQUAD_ROWS)
    rows = load_task("squad", source=str(f))
    assert [r["id"] for r in rows.rows] == [f"q{i}" for i in range(5)]
    assert rows.rows[0]["reference"] == ["Paris"]
    assert rows.rows[0]["inputs"]["question"] == "What is the capital of France?"
    assert len(load_task("squad", n=2, source=str(f)).rows) == 2


def test_hub_layout_directory(tmp_path):
    """A directory laid out like a hub dataset repo goes through the same load_dataset(name, config, split) call."""
    _write_jsonl(tmp_path / "validation.jsonl", SQUAD_ROWS)
    rows = load_task("squad", n=3, source=str(tmp_path))
    assert len(rows.rows) == 3 and rows.rows[2]["id"] == "q2"


def test_hub_source_calls_load_dataset_with_the_hub_name(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(path, name=None, split=None, **kw):
        seen.update(path=path, name=name, split=split)
        return [{"translation": {"en": "Hello", "fr": "Bonjour"}}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_task("wmt15", n=7, source="hub")
    assert seen == {"path": "wmt/wmt15", "name": "fr-en", "split": "test[:7]"}  # the paper's split
    assert rows.rows == [{"id": "0", "inputs": {"source": "Hello"}, "reference": "Bonjour"}]


def test_auto_falls_back_to_hub_when_local_file_is_absent(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv("PPD_DATA", str(tmp_path))
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None, **kw: [
        {"id": "x", "article": "A.", "highlights": "B."}])
    assert load_task("cnn_dailymail").source.startswith("abisee/cnn_dailymail")


def test_missing_local_file_names_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PPD_DATA", str(tmp_path))
    with pytest.raises(TaskDataError, match="PPD_DATA"):
        load_task("squad", source="local")


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = [dict(r) for r in SQUAD_ROWS]
    del rows[2]["question"]
    f = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskDataError, match=r"bad\.jsonl: row 2 \(line 3\) has no field 'question'"):
        load_task("squad", source=str(f))


def test_missing_nested_field(tmp_path):
    f = _write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"en": "a", "fr": "b"}}, {"translation": {"fr": "c"}}])
    with pytest.raises(TaskDataError, match=r"row 1 .*'translation\.en'"):
        load_task("wmt15", source=str(f))


def test_wrong_field_type(tmp_path):
    f = _write_jsonl(tmp_path / "cnn.jsonl", [{"id": "1", "article": 5, "highlights": "h"}])
    with pytest.raises(TaskDataError, match="of type str"):
        load_task("cnn_dailymail", source=str(f))


def test_malformed_json(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"id": "1", "article": "a", "highlights": "h"}\n{"id": "2", "article": \n')
    with pytest.raises(TaskDataError, match="could not load"):
        load_task("cnn_dailymail", source=str(f))


@pytest.mark.parametrize("name", TASKS)
def test_shared_data_50_rows_fit_the_budget(name, shared_data, tiny):
    """Byte-level tokens make every prompt long, so truncation is exercised on real rows."""
    _, tok = tiny
    prompts, report = load_prompts(name, tok, n=50, source="local")
    assert len(prompts) == 50 == report.prompts
    budget = TaskConfig.named(name).max_prompt_tokens
    assert all(len(p.input_ids) <= budget for p in prompts)
    assert report.tokens_cut == sum(p.truncated_tokens for p in prompts)
    assert len({p.id for p in prompts}) == 50


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_shared_data_fits_with_smollm2_tokenizer(name, shared_data, smollm2):
    model, tok = smollm2
    prompts, report = load_prompts(name, tok, n=50, source="local", max_new_tokens=128,
                                   context_length=model.config.max_position_embeddings)
    assert all(len(p.input_ids) <= report.budget for p in prompts)
    assert all(p.text.startswith("<|im_start|>") for p in prompts)  # SmolLM2's chat template


def test_build_prompts_from_rows_needs_no_files(tiny):
    _, tok = tiny
    from ppd_decode.data.tasks import TaskRows, validate_rows

    task = TaskConfig.named("squad")
    rows = TaskRows(task, validate_rows(task, SQUAD_ROWS, "mem"), "mem")
    prompts, report = build_prompts(rows, tok)
    assert report.truncated == 0 and "Paris is the capital" in prompts[0].text
