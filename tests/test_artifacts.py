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


def test_the_commit_says_when_tracked_files_differ_from_it(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    monkeypatch.setattr(artifacts, "REPO", tmp_path)
    clean = artifacts.git_commit()
    assert clean and "+" not in clean and clean != "unknown"
    (tmp_path / "new.txt").write_text("untracked files are not the run's code\n")
    assert artifacts.git_commit() == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    assert artifacts.git_commit() == clean + "+changes"
