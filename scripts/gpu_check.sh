#!/usr/bin/env bash
# The GPU check: the device tests, PPD in every placement the machine fits, and the oracle benchmark (PPD's measured
# speed-up against the latency model's prediction over the match rate p, with greedy, self-speculation and
# lookahead beside it) for SmolLM2-135M's shape and for a 7B-width Llama with few layers (random weights: no
# download, no data needed). Everything it writes goes to OUT: env.json, tests.txt, one bench_* folder per model
# (JSON, markdown, plots) and report.md.
#
#   scripts/gpu_check.sh OUT                          # a CUDA machine: about 8 minutes on one H100/H200-class GPU
#   DEVICE=cpu scripts/gpu_check.sh OUT               # the same on a CPU at toy sizes (CI runs it so it keeps working)
#   WHEELS=/path/to/wheels scripts/gpu_check.sh OUT   # a bare machine: first install what it lacks, offline
#
# Decoding needs torch, transformers, safetensors, tokenizers and gguf; the tests pytest and hypothesis; Hydra,
# datasets, DeepSpeed and W&B are not needed. The repository runs from its checkout (PYTHONPATH), not installed.
set -euo pipefail
# shellcheck source=gpu_check_env.sh
source "$(dirname "$0")/gpu_check_env.sh" "$@"

if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" transformers safetensors tokenizers gguf pytest \
    hypothesis tqdm platformdirs matplotlib
fi

"$PY" - "$DEVICE" > "$OUT/env.json" <<'EOF'
import json, os, platform, sys
import torch, transformers
dev = sys.argv[1]
cuda = torch.cuda.is_available()
print(json.dumps({"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda, "transformers":
                  transformers.__version__, "python": platform.python_version(), "cpu": platform.processor(),
                  "cores": os.cpu_count(), "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                  if cuda else []}, indent=1))
if dev.startswith("cuda") and not cuda:
    sys.exit("DEVICE=%s but this torch sees no GPU (a CPU build, or no driver): run DEVICE=cpu, or install a CUDA "
             "build of torch" % dev)
EOF

# 1. The device tests: every decoding method and the PPD engine on DEVICE, token for token against generate.
status=0
PPD_DEVICE=$DEVICE "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_timing.py \
  2>&1 | tee "$OUT/tests.txt" || status=$?

# 2. The oracle benchmark on random-weight models of real shapes (toy sizes on a CPU).
if [ "$DEVICE" = cpu ]; then
  MODELS=("toy tiny-random:layers=4,seed=1 2")
  PER_SET=2; NEW=16; PROMPT=32
else
  MODELS=("smollm2-135m-shape tiny-random:layers=30,hidden=576,intermediate=1536,heads=9,kv_heads=3,vocab=49152,max_positions=2048 13"
          "llama-7b-width tiny-random:layers=4,hidden=4096,intermediate=11008,heads=32,kv_heads=32,vocab=32000,max_positions=2048 2")
  PER_SET=8; NEW=64; PROMPT=128
fi
for entry in "${MODELS[@]}"; do
  read -r name spec layer <<< "$entry"
  "$PY" scripts/bench_decode.py --model "$spec" --device "$DEVICE" --dtype float32 --heads lens --layers "$layer" \
    --rows self_speculative,lookahead,ppd_split,ppd --oracle 0,0.25,0.5,0.75,1 --sets random --per-set "$PER_SET" \
    --max-new-tokens "$NEW" --max-prompt-tokens "$PROMPT" --runs 1 --warmup 1 --name "bench_$name" \
    --out "$OUT/bench_$name" 2>&1 | tee "$OUT/bench_$name.log" || status=$?
done

{
  echo "# GPU check ($DEVICE)"
  echo
  echo '```'
  cat "$OUT/env.json"
  echo '```'
  echo
  echo "## Device tests"
  echo
  tail -n 3 "$OUT/tests.txt"
  for entry in "${MODELS[@]}"; do
    read -r name _ _ <<< "$entry"
    echo
    echo "## $name"
    echo
    cat "$OUT/bench_$name/bench_$name.md" 2>/dev/null || echo "(no report: see bench_$name.log)"
  done
} > "$OUT/report.md"
echo "report: $OUT/report.md (exit status $status)"
exit "$status"
