# Sourced by the GPU checks (gpu_check.sh, gpu_check_train.sh) with OUT as $1: the settings both share. Sets OUT
# (absolute), DEVICE (cuda unless given), PY and REPO, moves to the repository and keeps every library offline.
OUT=${1:?usage: $0 OUT_DIR   (DEVICE=cpu for a CPU)}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
