#!/usr/bin/env bash
# The converged CIFAR-10 comparison (issue 13): BP, FR, DDG at K = 2 and 4, seeds 0 and 1,
# at lr 0.1 and at the paper's 0.01, with configs/resnet20_cifar10_5k.yaml (ResNet-20, a
# fixed 5,000-image subset, 30 epochs): 24 runs of ~15-20 min on 2 cores. Run it in the
# background (nice keeps it out of the way):
#   nohup nice -n 19 bash benchmarks/cifar_converged.sh > benchmarks/runs/converged.log 2>&1 &
# Rerunning resumes interrupted runs from their last epoch and reuses finished ones. Seed 0
# of both rates comes first (a complete one-seed table early), then seed 1, then each rate's
# report over both seeds: benchmarks/runs/converged-lr{0.1,0.01}/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
test -d data/cifar10/cifar-10-batches-py || python ../shared/data/cifar10/build.py data/cifar10
compare() {  # compare LR SEEDS
  fxreplay compare --config configs/resnet20_cifar10_5k.yaml --methods bp,fr,ddg --K 2,4 --seeds "$2" --lr "$1" \
    --boundaries 2=layer2.1 --boundaries 4=layer1.2,layer2.1,layer3 --out "benchmarks/runs/converged-lr$1"
}
for seed in 0 1; do
  for lr in 0.1 0.01; do compare "$lr" "$seed"; done
done
for lr in 0.1 0.01; do compare "$lr" 0,1; done
