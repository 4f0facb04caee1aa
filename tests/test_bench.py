"""The decode benchmark end to end on a tiny model: rows from the registry, the oracle curve, the artifacts."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_decode_benchmark_with_oracle_rows(tmp_path, shared_data):
    cmd = [sys.executable, "scripts/bench_decode.py", "--model", "tiny-random", "--heads", "lens", "--layers", "2",
           "--rows", "", "--oracle", "0,1", "--sets", "squad", "--per-set", "1",
           "--max-new-tokens", "10", "--max-prompt-tokens", "200", "--runs", "1", "--warmup", "0",
           "--name", "oracle_test", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "oracle_test.json").read_text())
    rows = {m["row"]: m for m in out["methods"]}
    assert set(rows) == {"greedy", "greedy_2t", "stack_greedy", "greedy_packed", "ppd_oracle_0", "ppd_oracle_100"}
    assert all(m["mismatches"] == 0 for m in rows.values())
    assert rows["ppd_oracle_100"]["match_rate"] == 1.0 and rows["ppd_oracle_0"]["match_rate"] == 0.0
    assert all(rows[r]["predicted_speedup"] > 0 for r in ("ppd_oracle_0", "ppd_oracle_100"))  # the model's account
    md = (tmp_path / "oracle_test.md").read_text()
    assert "measured against the latency model, over p" in md
    assert (tmp_path / "oracle_test_oracle.png").is_file()
