#!/usr/bin/env bash
# The converged CIFAR-10 comparison (issue 13): BP, FR, DDG at K = 2 and 4, seeds 0 and 1,
# at lr 0.1 and at the paper's 0.01, with configs/resnet20_cifar10_5k.yaml (ResNet-20, a
# fixed 5,000-image subset, 30 epochs): 20 runs of ~20 min on 2 cores. Run it in the
# background (nice keeps it out of the way):
#   nohup nice -n 19 bash benchmarks/cifar_converged.sh > benchmarks/runs/converged.log 2>&1 &
# Rerunning resumes interrupted runs from their last epoch and reuses finished ones.
# BP runs once per seed and rate, at K=2: it is one algorithm whatever K (the stages'
# BP equals the model's to 1e-12 in float64, tests/test_methods.py), so K=4 would only
# repeat it. Seed 0 of both rates comes first (a complete one-seed table early), then
# seed 1, then each rate's report over both seeds in benchmarks/results/converged-lr{0.1,0.01}/
# (report.md and its figures) and the table over both rates, benchmarks/results/converged-summary.md
# (benchmarks/converged_summary.py). The run directories are git-ignored (checkpoints); the summary keeps each
# finished run's config.yaml and metrics.jsonl in benchmarks/results/converged-runs/: commit those, and a
# comparison spread over several sessions or machines adds up (run the summary any time to keep what finished).
# One rate only: `bash benchmarks/cifar_converged.sh 0.01`; one seed only: `SEEDS=1 bash ...`. On 2 cores, two one-thread
# processes (one per rate) train more images per second than one two-thread process:
#   OMP_NUM_THREADS=1 nohup bash benchmarks/cifar_converged.sh 0.1  > benchmarks/runs/converged-0.1.log 2>&1 &
#   OMP_NUM_THREADS=1 nohup bash benchmarks/cifar_converged.sh 0.01 > benchmarks/runs/converged-0.01.log 2>&1 &
# Stop them with `pkill -f cifar_converged.sh; pkill -f "fxreplay compare"` (SIGTERM: a job started with `&` in
# a script ignores Ctrl-C's SIGINT); each run resumes from its last finished epoch. Runs of one rate may be
# split over several processes (one `fxreplay compare` per run directory; a directory in use is refused).
set -euo pipefail
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(0.1 0.01)
cd "$(dirname "$0")/.."
test -d data/cifar10/cifar-10-batches-py || python ../shared/data/cifar10/build.py data/cifar10
python benchmarks/converged_summary.py --restore  # a fresh checkout reuses the kept finished runs
CONFIG=configs/resnet20_cifar10_5k.yaml
SPLIT2=2=layer2.1
SPLIT4=4=layer1.2,layer2.1,layer3
out() { echo "benchmarks/runs/converged-lr$1"; }
compare() {  # compare LR SEEDS
  fxreplay compare --config "$CONFIG" --methods bp --K 2 --seeds "$2" --lr "$1" --boundaries "$SPLIT2" --out "$(out "$1")"
  fxreplay compare --config "$CONFIG" --methods fr,ddg --K 2,4 --seeds "$2" --lr "$1" \
    --boundaries "$SPLIT2" --boundaries "$SPLIT4" --out "$(out "$1")"
}
for seed in ${SEEDS:-0 1}; do
  for lr in "${RATES[@]}"; do compare "$lr" "$seed"; done
done
# Each rate's report over both seeds (BP at K=2) once all its runs are done, and the table over both rates.
python benchmarks/converged_summary.py
