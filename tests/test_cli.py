"""ppd-generate: any config field can be set from the command line, and a wrong one is refused by name."""

import pytest

from ppd_decode.apps.cli import main


def test_set_fields_of_the_methods_config(capsys):
    main(["--model", "tiny-random", "--method", "self_speculative", "--layer", "2", "--set", "lookup=true",
          "--set", "min_confidence=0.01", "--max-new-tokens", "8", "--check"])
    out = capsys.readouterr().out
    assert "[self_speculative] 8 tokens" in out and "identical to greedy: yes" in out


def test_an_unknown_field_is_refused_with_the_fields_there_are(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "tiny-random", "--method", "self_speculative", "--layer", "2", "--set", "lookup2=1"])
    assert "has no field 'lookup2' (it has: layer, draft_tokens" in capsys.readouterr().err
