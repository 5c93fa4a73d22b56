#!/usr/bin/env bash
# experiments/iterative_path/protocol.md: one compare.py sweep (2 runs at a time).
set -euo pipefail
cd "$(dirname "$0")/../.."
START=out/experiments/path/vanilla-beta0.025-64k/checkpoints/labels-0026624/policy
set -x
python compare.py --mode iterative --samplers vanilla best_of_n hybrid pilaf t_pilaf --seeds 0-9 --jobs ${JOBS:-2} \
    --out out/experiments/iterative_path -- --beta 0.025 --init_from $START --n 8
