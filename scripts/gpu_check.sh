#!/usr/bin/env bash
# GPU readiness (issue #17): one script, under 8 minutes on one GPU. Writes results/bench/*-cuda.*:
#   backward-fp32-cuda.{json,md}, backward-bf16-cuda.{json,md}  the bench's new cases on the GPU
#   syncs-cuda.{json,md}      host syncs per step vs depth, with torch.cuda.set_sync_debug_mode("warn")
#   proxy-cuda/ and proxy-cuda.md  a 300-step vcas-plus vs exact comparison with trainer.device=cuda
# Usage: scripts/gpu_check.sh [device]   (device defaults to cuda; `cpu` runs the same paths, slowly)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-results/bench}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
CASES="bert-base-width-128-nodropout,minilm-text-128"

echo "== bench, fp32 and bf16 ($DEVICE)"
for DTYPE in fp32 bf16; do
  timeout 150 "$PY" scripts/bench_backward.py --device "$DEVICE" --dtype "$DTYPE" --cases "$CASES" \
    --repeats 10 --warmup 3 --no-phases --no-profile --runs "" --out "$OUT" --tag "backward-$DTYPE-$DEVICE"
done

echo "== host syncs per step ($DEVICE, sync debug mode on GPU)"
timeout 60 "$PY" scripts/sync_check.py --device "$DEVICE" --out "$OUT"

echo "== 300-step vcas-plus vs exact ($DEVICE)"
timeout 150 "$PY" -m vcas_bench experiment=vcas-plus-400 sampler=vcas-plus "baselines=[exact]" \
  trainer.max_steps=300 trainer.device="$DEVICE" trainer.progress=false \
  output_dir="$OUT/proxy-$DEVICE" hydra.run.dir="$OUT/proxy-$DEVICE"
cp "$OUT/proxy-$DEVICE/comparison.md" "$OUT/proxy-$DEVICE.md"
echo "== done: $OUT/*-$DEVICE.*"
