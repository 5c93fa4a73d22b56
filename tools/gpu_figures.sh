#!/usr/bin/env bash
# The GPU figures docs/performance.md asks for, in about 10 minutes on one GPU (the tests never need one):
# bench.py at GPT-2 small's shapes, the default run in float32 and in bfloat16, and the --fsdp path on one
# GPU (a process group of one). Run from the repository's root; everything lands in $OUT (default gpu-figures/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-figures}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python -c "import world; world.ensure()"                                # the embedded world, once (a few minutes)
python bench.py --device cuda --size gpt2 --reps 3 | tee "$OUT/bench.txt"
for dtype in float32 bfloat16; do
    /usr/bin/time -f "%e s wall" python train.py --sampler pilaf --device cuda --dtype $dtype --out "$OUT/pilaf-$dtype" \
        2>&1 | grep -E "^step|s wall|run is" | tee "$OUT/run-$dtype.txt"
done
/usr/bin/time -f "%e s wall" python train.py --sampler pilaf --device cuda --fsdp --out "$OUT/pilaf-fsdp" \
    2>&1 | grep -E "^policy|^step|s wall|run is" | tee "$OUT/run-fsdp.txt"
