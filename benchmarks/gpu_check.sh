#!/usr/bin/env bash
# The GPU check of the data path (one script, under 8 minutes on one GPU; installs what it needs):
#   1. DINO ViT-S/16 bf16 training images/s, ours and the lightly baseline side by side;
#   2. loader images/s with data.augment_on=workers and =device, all CPU cores as loader workers;
#   3. the device half of augment_on=device (flip, jitter, grayscale, blur, solarize, normalise) per
#      batch on the GPU; peak GPU memory is in the training report.
#
#   benchmarks/gpu_check.sh          # on the GPU machine: results in benchmarks/results/gpu_check_*.json
#   benchmarks/gpu_check.sh --dry    # CPU, tiny shapes, no install (the test suite runs this); OUT=DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

if [[ "${1:-}" == "--dry" ]]; then
    PY=${PYTHON:-python}
    TAG=dry
    TRAIN=(--config configs/demo.yaml --name "DINO ViT-Tiny 32 px (dry)" --batch 2 --precision fp32 --steps 1
           --warmup 0 --repeats 1 --threads 1 --baseline)
    DATA=(--images 8 --batch 2 --batches 1 --repeats 1 --workers 1 --formats folder --train-batch 1
          --train-steps 1 --device cpu)
else
    make install bench-env >/dev/null
    PY=.venv/bin/python
    TAG=gpu
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_check_machine.txt"
    TRAIN=(--suite --only "DINO ViT-S/16" --precision bf16 --set train.batch_size_per_device=64
           --steps 10 --warmup 3 --repeats 2 --threads 0)
    DATA=(--images 1024 --batch 64 --batches 8 --repeats 2 --workers "$(nproc)" --formats folder
          --train-batch 8 --train-steps 2 --device cuda)
fi

echo "== training throughput ($TAG)"
"$PY" benchmarks/train_throughput.py "${TRAIN[@]}" --out "$OUT/gpu_check_train_$TAG.json"
echo "== loader throughput and the device-side augmentation ($TAG)"
"$PY" benchmarks/data_throughput.py "${DATA[@]}" --workdir "$WORK/data" --out "$OUT/gpu_check_data_$TAG.json"
echo "== done: $OUT/gpu_check_train_$TAG.json $OUT/gpu_check_data_$TAG.json"
