#!/usr/bin/env bash
# The GPU check for training and evaluation: for each head kind, a bf16 ZeRO-2 training run under torchrun that is
# SIGKILLed mid-run and relaunched (it must resume from its checkpoint and finish), then a short match-rate
# evaluation of the trained heads on the device, each with its peak device memory. The model has random weights of
# a real width and the corpus and task rows are synthetic, written here: no download and no data set needed (this
# checks the machinery, not head quality). Everything goes to OUT: env.json, corpus.jsonl, data/, one train_<kind>/
# per head kind (log.txt, metrics.json, heads/), eval/ (the report) and report.md.
#
#   scripts/gpu_check_train.sh OUT                          # a CUDA machine: a few minutes on one H100/H200-class GPU
#   DEVICE=cpu scripts/gpu_check_train.sh OUT               # toy sizes on a CPU (CI runs it so it keeps working)
#   WHEELS=/path/to/wheels scripts/gpu_check_train.sh OUT   # a bare machine: first install what it lacks, offline
#
# Needs what training needs (torch, transformers, deepspeed, hydra-core, datasets, evaluate, wandb) beside the
# repository, which runs from its checkout (PYTHONPATH), not installed.
set -euo pipefail
# shellcheck source=gpu_check_env.sh
source "$(dirname "$0")/gpu_check_env.sh" "$@"

if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" transformers safetensors tokenizers gguf deepspeed \
    hydra-core omegaconf datasets evaluate wandb sacrebleu rouge-score tqdm platformdirs matplotlib
fi

if [ "$DEVICE" = cpu ]; then
  SPEC="tiny-random:layers=4,hidden=64,vocab=300,seed=0"; DTYPE=float32; LAYER=2
  STEPS=6; KILL=3; SEQ=32; MICRO=2; RANK=8; N=4; NEW=8
else  # a 1B-class width (Llama-3.2-1B's) with 8 layers: real kernel shapes, minutes not hours
  SPEC="tiny-random:layers=8,hidden=2048,intermediate=8192,heads=32,kv_heads=8,vocab=32000,max_positions=4096,seed=0"
  DTYPE=bfloat16; LAYER=4; STEPS=30; KILL=14; SEQ=1024; MICRO=4; RANK=256; N=32; NEW=64
fi

"$PY" - "$DEVICE" "$OUT" <<'EOF'
import json, os, platform, sys
from pathlib import Path
import torch
dev, out = sys.argv[1], Path(sys.argv[2])
cuda = torch.cuda.is_available()
env = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "cores": os.cpu_count(), "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
       if cuda else []}
for pkg in ("transformers", "deepspeed", "hydra", "datasets"):
    try:
        env[pkg] = __import__(pkg).__version__
    except ImportError as e:
        sys.exit(f"{pkg} is missing ({e}): training needs it. Fix: WHEELS=<a folder of wheels> {sys.argv[0]} ...")
(out / "env.json").write_text(json.dumps(env, indent=1))
if dev.startswith("cuda") and not cuda:
    sys.exit("DEVICE=%s but this torch sees no GPU (a CPU build, or no driver): run DEVICE=cpu, or install a CUDA "
             "build of torch" % dev)
# A synthetic chat corpus (varied enough that the heads have something to learn) and SQuAD-shaped task rows.
rows = [{"id": str(i), "messages": [
    {"role": "user", "content": f"Question {i}: what is {i} plus {i * 7 % 13}, and why?"},
    {"role": "assistant", "content": f"{i} plus {i * 7 % 13} is {i + i * 7 % 13}. " * 4 + "Adding counts on."}]}
    for i in range(400)]
(out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
squad = out / "data" / "squad"
squad.mkdir(parents=True, exist_ok=True)
ctx = "The river rises in the north hills and reaches the sea after {} miles, passing {} towns on its way."
squad.joinpath("validation_part_a.jsonl").write_text("".join(json.dumps(
    {"id": f"q{i}", "title": "river", "context": ctx.format(100 + i, i % 9 + 2),
     "question": f"How many towns does the river pass, case {i}?",
     "answers": {"text": [str(i % 9 + 2)], "answer_start": [0]}}) + "\n" for i in range(64)))
EOF

COMMON=(model=tiny-random "model.spec='$SPEC'" model.name=check "model.dtype=$DTYPE" "data.files=[$OUT/corpus.jsonl]"
        data.val_examples=8 "head.layers=[$LAYER]" trainer.deepspeed=zero2_bf16 "trainer.max_steps=$STEPS"
        trainer.save_every=2 "trainer.eval_every=$STEPS" trainer.eval_blocks=4 "trainer.seq_len=$SEQ"
        "trainer.micro_batch=$MICRO" trainer.log_every=1 wandb.mode=disabled)
KINDS=("frequent"
       "frequent_fprev_mlp head.reads_prev=true head.adapter_rank=$RANK"
       "shared_adapter head.projection=shared head.adapter_rank=$RANK"
       "own head.projection=own head.train_vocab=0"
       "block head.block=true")
status=0
for entry in "${KINDS[@]}"; do
  read -r -a parts <<< "$entry"
  kind=${parts[0]}; extra=("${parts[@]:1}")
  dir="$OUT/train_$kind"
  rm -rf "$dir"; mkdir -p "$dir"
  run=(-m torch.distributed.run --standalone --nproc_per_node=1 -m ppd_train "${COMMON[@]}" "${extra[@]}"
       "output_dir=$dir" "run_name=check-$kind")
  # 1. killed by SIGKILL after step KILL (a crash, as far as the run can tell) ...
  if "$PY" "${run[@]}" "trainer.debug_kill_at_step=$KILL" > "$dir/log.txt" 2>&1; then
    echo "[check] $kind: the run meant to be killed at step $KILL finished instead" | tee -a "$dir/log.txt"; status=1
  fi
  # 2. ... then the same command again: it must resume from the last checkpoint and finish.
  if "$PY" "${run[@]}" >> "$dir/log.txt" 2>&1 && [ -f "$dir/metrics.json" ]; then
    echo "[check] $kind: resumed and finished"
  else
    echo "[check] $kind: FAILED (see $dir/log.txt)"; tail -20 "$dir/log.txt"; status=1
  fi
done

# 3. A short evaluation of the default kind's heads on the device, beside the logit lens.
if [ -d "$OUT/train_frequent/heads" ]; then
  PPD_DATA="$OUT/data" "$PY" -m ppd_decode.evaluation model=tiny-random "model.spec='$SPEC'" model.name=check \
    "model.dtype=$DTYPE" "model.device=$DEVICE" "heads=[$OUT/train_frequent/heads]" "lens_layers=[$LAYER]" "n=$N" \
    "max_new_tokens=$NEW" "~tasks.wmt15" "~tasks.cnn_dailymail" source=local tasks.squad.max_prompt_tokens=256 \
    timing.repeats=3 timing.context=64 wandb.mode=disabled "hydra.run.dir=$OUT/eval" > "$OUT/eval.log" 2>&1 \
    || { echo "[check] evaluation FAILED (see $OUT/eval.log)"; tail -20 "$OUT/eval.log"; status=1; }
fi

"$PY" - "$OUT" "$KILL" "$STEPS" <<'EOF'
import json, sys
from pathlib import Path
out, kill, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
env = json.loads((out / "env.json").read_text())
mib = lambda v: "-" if v is None else f"{v:.0f}"
lines = [f"# Training and evaluation check ({env['device']}; {', '.join(env['gpus']) or 'no GPU'}; torch {env['torch']}, "
         f"DeepSpeed {env['deepspeed']})", "",
         f"Each head kind: bf16 ZeRO-2 under torchrun, SIGKILLed after step {kill} of {steps}, relaunched with the same "
         "command; it must resume and finish. Peak memory: the resumed process's.", "",
         "| head kind | resumed at step | finished | val top-1 | peak device memory (MiB) |", "|---|---|---|---|---|"]
for d in sorted(out.glob("train_*")):
    m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else None
    if m is None:
        lines.append(f"| {d.name[6:]} | - | **no** | - | - |")
        continue
    top1 = next((v for k, v in m["final"].items() if k.startswith("val/top1_agree/")), None)
    lines.append(f"| {d.name[6:]} | {m.get('resumed_at_step')} | {m['steps']} steps | {top1:.3f} | "
                 f"{mib(m.get('peak_device_memory_mib'))} |")
rep = out / "eval" / "match_rate.json"
if rep.is_file():
    r = json.loads(rep.read_text())
    sq = r["tasks"]["squad"]
    rates = ", ".join(f"{x['head']}@{x['layer']} p@1 {x['p@1']:.3f}" for x in sq["rates"])
    lines += ["", f"Evaluation: {sq['prompts']} prompts, {sq['positions']} positions, {rates}; "
                  f"{r['time']['wall_seconds']:.0f} s wall, peak device memory "
                  f"{mib(r['time'].get('peak_device_memory_mib'))} MiB."]
else:
    lines += ["", "Evaluation: **failed** (eval.log)."]
(out / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $status
