"""Where benchmark and report files go: a run writes under ``outputs/bench/<name>/`` (never a tracked file);
``--publish`` then copies that run's files into ``docs/benchmarks/``, the folder the README cites."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "benchmarks"


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--name", default=name, help="the run's name: its folder and its files' stem")
    parser.add_argument("--out", default=None, help="where the run's files go (default: outputs/bench/<name>/)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the run's files to docs/benchmarks/ (what the README cites)")


def output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else REPO / "outputs" / "bench" / args.name
    out.mkdir(parents=True, exist_ok=True)
    return out


def publish(out_dir: Path, docs: Path | None = None) -> list[Path]:
    """Copy every file of a finished run into ``docs`` (default docs/benchmarks/; flat, same names)."""
    docs = docs or DOCS
    docs.mkdir(parents=True, exist_ok=True)
    copies = []
    for f in sorted(p for p in Path(out_dir).iterdir() if p.is_file()):
        copies.append(Path(shutil.copy2(f, docs / f.name)))
    return copies


def finish(args: argparse.Namespace, out_dir: Path) -> None:
    """Say where the run went, and publish it when asked."""
    print(f"[bench] wrote {out_dir}")
    if args.publish:
        for c in publish(out_dir):
            print(f"[bench] published {c.relative_to(REPO) if c.is_relative_to(REPO) else c}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The checked-out commit, with "+changes" when tracked files differ from it (the run's code is then not that
    commit's alone)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(command: str, device=None) -> dict:
    """What a published table must say: the command, the date, the machine (``device``: where the measured model
    ran) and the commit that produced it."""
    import torch

    device = torch.device(device or "cpu")
    return {"command": command, "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "device": str(device),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
