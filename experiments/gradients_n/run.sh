#!/usr/bin/env bash
# experiments/gradients_n/protocol.md: T-PILAF at N = 64 at gradients/'s far policy; two processes of 10 batches.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=out/experiments/gradients_n
FAR=out/experiments/gradients/overfit/policy
[ -d $FAR ] || { echo "run experiments/gradients/run.sh first: it makes $FAR" >&2; exit 2; }
mkdir -p $OUT
[ -f $OUT/tilt.json ] || python experiments/t_pilaf_n/measure.py --policy $FAR --beta 0.1 --n 8 64 --out $OUT/tilt.json
for seed in 0 10000; do
    [ -f $OUT/far-$seed.json ] || python gradients.py --policy $FAR --beta 0.1 --batches 10 --samples 16 --pairs 8 \
        --n 64 --prompts 60 --seed $seed --samplers vanilla t_pilaf --json $OUT/far-$seed.json > $OUT/far-$seed.md &
done
wait
python experiments/gradients_n/analyse.py $OUT/far-0.json $OUT/far-10000.json | tee $OUT/analysis.md
