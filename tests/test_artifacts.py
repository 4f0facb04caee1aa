"""Benchmark files go to outputs/bench/<name>/ and reach docs/benchmarks/ only through --publish."""

import argparse

from ppd_decode.evaluation import artifacts


def _args(argv):
    p = argparse.ArgumentParser()
    artifacts.add_output_args(p, "decode")
    return p.parse_args(argv)


def test_runs_write_under_outputs_bench_by_default():
    a = _args([])
    assert a.name == "decode" and not a.publish
    out = artifacts.output_dir(a)
    assert out == artifacts.REPO / "outputs" / "bench" / "decode"


def test_publish_copies_the_run_only_when_asked(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs"
    monkeypatch.setattr(artifacts, "DOCS", docs)
    run = artifacts.output_dir(_args(["--out", str(tmp_path / "run"), "--name", "x"]))
    (run / "x.json").write_text("{}")
    (run / "x.md").write_text("| a |")
    artifacts.finish(_args(["--out", str(run)]), run)
    assert not docs.exists()
    artifacts.finish(_args(["--out", str(run), "--publish"]), run)
    assert sorted(p.name for p in docs.iterdir()) == ["x.json", "x.md"]
    assert (docs / "x.md").read_text() == "| a |"
