#!/usr/bin/env bash
# experiments/dose/protocol.md: every continuation, through compare.py (2 runs at a time). Usage: run.sh N
set -euo pipefail
N=${1:?usage: run.sh N  (N*, fixed by experiments/t_pilaf_n)}
cd "$(dirname "$0")/../.."
PATH_RUN=out/experiments/path/vanilla-beta0.025-64k
OUT=out/experiments/dose
COMMON="--beta 0.025 --labels 512 --eval_every 512 --n $N"
for L in 0000000 0004096 0006144 0020480 0026624; do
    START="--init_from $PATH_RUN/checkpoints/labels-$L/policy"
    set -x
    python compare.py --mode online --samplers vanilla pilaf t_pilaf best_of_n --seeds 0-19 --jobs ${JOBS:-2} \
        --out $OUT/start-$L -- $START $COMMON
    python compare.py --mode online --samplers t_pilaf --seeds 0-19 --jobs ${JOBS:-2} \
        --out $OUT/start-$L-weighted -- $START $COMMON --prompt_weight
    set +x
done
