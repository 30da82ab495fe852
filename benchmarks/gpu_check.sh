#!/usr/bin/env bash
# One short GPU check, run on a CUDA machine from the repo root:
#   the GPU-marked tests, the whole pipeline on CUDA (bf16 + channels_last), and training img/s
#   with and without AMP/channels_last. Results land in $OUT (default /tmp/gpu-check).
# Optional: .gpu/whl/*.whl (missing Python packages) and .gpu/fmnist (Fashion-MNIST IDX files).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
DATA=${FMNIST:-$( [ -d .gpu/fmnist ] && echo "$PWD/.gpu/fmnist" || echo /usr/share/datasets/fashion-mnist )}
{ nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/gpu.txt"

echo "== 1. GPU-marked tests"
timeout 150 python3 -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests 2>&1 | tail -12 | tee "$OUT/gpu_tests.txt"

echo "== 2. the pipeline on CUDA (bf16 autocast + channels_last for all training stages)"
sets=(--set "data.root=$DATA" --set run.device=cuda)
for s in teacher baseline distill; do sets+=(--set "$s.amp=bf16" --set "$s.channels_last=true"); done
start=$(date +%s)
timeout 240 python3 -m pipeline.cli run --run-dir /tmp/gpu-run "${sets[@]}" 2>&1 | tail -45 | tee "$OUT/gpu_run.txt"
echo "pipeline wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_run.txt"
cp /tmp/gpu-run/summary.json "$OUT/gpu_summary.json" 2>/dev/null

echo "== 3. NORM training step img/s on CUDA: fp32 eager vs channels_last vs bf16 vs both"
timeout 150 python3 benchmarks/train_speed.py --device cuda --pairs resnet32x4:resnet8x4 wrn_40_2:wrn_16_2 \
  --variants fp32 cl bf16 opt --batch 64 --json "$OUT/train_speed_cuda.json" 2>&1 | tail -20 | tee "$OUT/train_speed.txt"
