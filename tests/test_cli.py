"""ppd-generate: any config field can be set from the command line, and a wrong one is refused by name."""

import pytest

from ppd_decode.apps.cli import main


def test_set_fields_of_the_methods_config(capsys):
    main(["--model", "tiny-random", "--method", "self_speculative", "--layer", "2", "decode.self_speculative.lookup=true",
          "decode.self_speculative.min_confidence=0.01", "--max-new-tokens", "8", "--check"])
    out = capsys.readouterr().out
    assert "[self_speculative] 8 tokens" in out and "identical to greedy: yes" in out


def test_the_reported_speed_is_of_a_warmed_up_call(capsys, monkeypatch):
    """The tok/s line times a call after a short untimed one: a first call pays one-off setup (weights packed,
    kernels built for each block shape), which is not decoding speed."""
    from ppd_decode.strategies import get_strategy

    cls = get_strategy("self_speculative")
    calls, generate = [], cls.generate

    def spy(self, ids, max_new_tokens, *args, **kwargs):
        calls.append(max_new_tokens)
        return generate(self, ids, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(cls, "generate", spy)
    main(["--model", "tiny-random", "--method", "self_speculative", "--layer", "2", "--max-new-tokens", "8"])
    assert calls == [4, 8] and "[self_speculative] 8 tokens" in capsys.readouterr().out


def test_an_unknown_field_is_refused_with_the_fields_there_are(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "tiny-random", "--method", "self_speculative", "--layer", "2",
              "decode.self_speculative.lookup2=1"])
    assert "has no field 'lookup2' (it has: layer, draft_tokens" in capsys.readouterr().err


@pytest.mark.parametrize("args, fix", [
    (["--heads", "/nonexistent/heads"], "/nonexistent/heads"),
    (["--method", "self_speculative", "--layer", "2", "decode.self_speculative.draft_tokens=0"], "draft_tokens"),
    (["--method", "ppd", "--layer", "2", "decode.ppd.k=0"], "k must be >= 1"),
    (["--method", "ppd", "--layer", "2", "decode.ppd.layer=3"], "no head for layer 3; heads given: [2]. Fix:"),
    (["--method", "greedy", "--max-new-tokens", "100000"], "Fix: shorten the prompt or lower max_new_tokens"),
    (["--method", "nope"], "no decoding row 'nope'"),
    (["decode.ppd"], "is not a decoding override"),
])
def test_a_users_mistake_is_one_line_naming_the_fix(capsys, args, fix):
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny-random", "--max-new-tokens", "4", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and fix in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_ppd_load_reports_a_bad_spec_in_one_line(capsys):
    from ppd_decode.apps.load import main as load_main

    with pytest.raises(SystemExit) as e:
        load_main(["--model", "/nonexistent/model-dir"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("ppd-load: error: ") and len(err.strip().splitlines()) == 1
