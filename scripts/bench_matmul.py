"""Time a model's decoder matmuls with its own weights and with ppd's packed copies (ppd_decode/models/packed_linear.py).

Every nn.Linear of every decoder layer, called in layer order as one forward calls them, over 1..16 rows, one thread
by default: the plain module (MKL on the row-major weight) against the same module inside ``packed_linears`` (oneDNN
on a copy packed once). The two take turns repeat by repeat; medians are reported, with the packed results'
largest relative difference from the plain ones. Writes a markdown table and JSON under
outputs/bench/<name>/; ``--publish`` copies them to docs/benchmarks/.

    python scripts/bench_matmul.py [--model smollm2-135m] [--rows 1,2,3,4,8,16] [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ppd_decode.evaluation.artifacts import add_output_args, finish, output_dir

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default="1,2,3,4,8,16")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    add_output_args(p, "matmul_packing")
    a = p.parse_args()

    from ppd_decode.models.loading import load_model
    from ppd_decode.models.packed_linear import available, packed_linears

    torch.set_num_threads(a.threads)
    model, _ = load_model(a.model)
    if not available(model):
        raise SystemExit("packed matmuls are not used for this model here (not fp32 on a CPU with oneDNN, or "
                         "PPD_PACKED_LINEAR=0): nothing to compare")
    mods = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    mb = sum(m.weight.numel() * m.weight.element_size() for m in mods) / 1e6

    def run(xs):
        return [m(x) for m, x in zip(mods, xs)]

    rows = []
    with torch.no_grad():
        for r in (int(x) for x in a.rows.split(",")):
            xs = [torch.randn(1, r, m.in_features) for m in mods]
            with packed_linears(model):
                packed_out = run(xs)  # (also packs every weight, outside the timing)
            plain_out = run(xs)
            rel = max(float((q - p_).abs().max() / p_.abs().max()) for q, p_ in zip(packed_out, plain_out))
            times = {"plain": [], "packed": []}
            for i in range(a.repeats):
                for kind in (("plain", "packed") if i % 2 == 0 else ("packed", "plain")):
                    t0 = time.perf_counter()
                    if kind == "packed":
                        with packed_linears(model):
                            run(xs)
                    else:
                        run(xs)
                    times[kind].append(time.perf_counter() - t0)
            plain, packed = (1e3 * statistics.median(times[k]) for k in ("plain", "packed"))
            rows.append({"rows": r, "plain_ms": plain, "packed_ms": packed, "speedup": plain / packed,
                         "max_rel_diff": rel})
            print(f"{r:3d} rows: plain {plain:6.2f} ms, packed {packed:6.2f} ms ({plain / packed:.2f}x), "
                  f"largest relative difference {rel:.1e}", flush=True)
    one = rows[0]["plain_ms"] if rows[0]["rows"] == 1 else None
    lines = [f"# Decoder matmuls, plain and packed ({a.model}, {len(mods)} matmuls, {mb:.0f} MB of fp32 weights, "
             f"{a.threads} thread(s), median of {a.repeats})", "",
             "| rows | plain ms | packed ms | packed speed-up | plain vs plain 1 row | packed vs plain 1 row | "
             "largest relative difference |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        rel1 = f"{x['plain_ms'] / one:.2f}x | {x['packed_ms'] / one:.2f}x" if one else "- | -"
        lines.append(f"| {x['rows']} | {x['plain_ms']:.2f} | {x['packed_ms']:.2f} | {x['speedup']:.2f}x | {rel1} | "
                     f"{x['max_rel_diff']:.1e} |")
    out = output_dir(a)
    (out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{a.name}.json").write_text(json.dumps({"model": a.model, "threads": a.threads, "repeats": a.repeats,
                                                    "matmuls": len(mods), "weights_mb": mb, "rows": rows}, indent=1))
    print("\n".join(lines))
    finish(a, out)


if __name__ == "__main__":
    from ppd_decode.errors import run_cli

    run_cli(main, "bench_matmul")
