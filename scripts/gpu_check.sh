#!/usr/bin/env bash
# GPU readiness (issue #17): one script, under 8 minutes on one GPU. Writes results/bench/*-cuda.*:
#   backward-fp32-cuda.{json,md}, backward-bf16-cuda.{json,md}  the bench's cases on the GPU (every arm:
#                             reference, sampled, static, exact-ckpt, checkpointed)
#   draws-cuda.txt            SampleA/SampleW draw on the GPU's own generator: no pinned host copies
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
CASES="bert-base-width-128-nodropout,minilm-text-128,tiny-width-128,llama-128"

echo "== bench, fp32 and bf16 ($DEVICE)"
for DTYPE in fp32 bf16; do
  timeout 150 "$PY" scripts/bench_backward.py --device "$DEVICE" --dtype "$DTYPE" --cases "$CASES" \
    --repeats 10 --warmup 3 --no-phases --no-profile --runs "" --out "$OUT" --tag "backward-$DTYPE-$DEVICE"
done

echo "== draws on the device ($DEVICE)"
timeout 60 "$PY" - "$DEVICE" > "$OUT/draws-$DEVICE.txt" <<'PYEOF'
import sys, torch
from torch.profiler import profile, ProfilerActivity
from vcas_bench.measure.bench import Pair
from vcas_bench.measure.bench_cases import build_case
device = torch.device(sys.argv[1])
pair = Pair(build_case("tiny-bert-16", torch.Generator().manual_seed(0)), device, 0)
pair.set_ratios(0.5, 0.5)
step = pair.step("sampled")[1]
step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
pins = sum(e.count for e in prof.key_averages() if "pin_memory" in e.key)
gens = {str(g.device) for g in pair.wrapped.engine.device_generators.values()}
print(f"pinned copies per sampled step: {pins}; device generators: {sorted(gens) or 'none (CPU)'}")
assert device.type == "cpu" or (pins == 0 and gens), "draws still go through pinned host memory"
PYEOF
cat "$OUT/draws-$DEVICE.txt"

echo "== host syncs per step ($DEVICE, sync debug mode on GPU)"
timeout 60 "$PY" scripts/sync_check.py --device "$DEVICE" --out "$OUT"

echo "== 300-step vcas-plus vs exact ($DEVICE)"
timeout 150 "$PY" -m vcas_bench experiment=vcas-plus-400 sampler=vcas-plus "baselines=[exact]" \
  trainer.max_steps=300 trainer.device="$DEVICE" trainer.progress=false \
  output_dir="$OUT/proxy-$DEVICE" hydra.run.dir="$OUT/proxy-$DEVICE"
cp "$OUT/proxy-$DEVICE/comparison.md" "$OUT/proxy-$DEVICE.md"
echo "== done: $OUT/*-$DEVICE.*"
