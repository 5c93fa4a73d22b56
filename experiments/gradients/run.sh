#!/usr/bin/env bash
# experiments/gradients/protocol.md: the far policy (if not made yet), its dose, and gradients.py at every policy.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=out/experiments/gradients
PATH_RUN=out/experiments/path/vanilla-beta0.025-64k
FAR=$OUT/overfit
mkdir -p $OUT
[ -f $FAR/summary.json ] || python train.py --sampler vanilla --mode iterative --iterations 1 --labels 64 --batch_size 32 \
    --epochs 30 --lr 1e-2 --label argmax --eval_every 64 --out $FAR
[ -f $OUT/overfit-dose.json ] || python experiments/t_pilaf_n/measure.py --policy $FAR/policy --beta 0.1 --n 256 \
    --out $OUT/overfit-dose.json
python gradients.py --policy $PATH_RUN/checkpoints/labels-0000000/policy $PATH_RUN/checkpoints/labels-0006144/policy \
    $PATH_RUN/checkpoints/labels-0026624/policy --beta 0.025 --batches 20 --samples 16 --pairs 8 --n 8 \
    --prompts 60 --samplers vanilla pilaf t_pilaf t_pilaf_weighted best_of_n --json $OUT/path.json | tee $OUT/path.md
python gradients.py --policy $FAR/policy --beta 0.1 --batches 20 --samples 16 --pairs 8 --n 8 --prompts 60 \
    --samplers vanilla pilaf t_pilaf t_pilaf_weighted best_of_n --json $OUT/far.json | tee $OUT/far.md
