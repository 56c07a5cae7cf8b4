#!/usr/bin/env bash
# The converged CIFAR-10 comparison (issue 13): BP, FR, DDG at K = 2 and 4, seeds 0 and 1,
# at lr 0.1 and at the paper's 0.01, with configs/resnet20_cifar10_10k.yaml (ResNet-20,
# a fixed 10,000-image subset, 30 epochs). About 24 runs x ~30 min on 2 cores: run it in
# the background (nice keeps it out of the way); rerunning the same command resumes
# interrupted runs from their last epoch and reuses finished ones.
#   nohup nice -n 19 bash benchmarks/cifar_converged.sh > benchmarks/runs/converged.log 2>&1 &
# Reports: benchmarks/runs/converged-lr0.1/report.md, benchmarks/runs/converged-lr0.01/report.md
set -euo pipefail
cd "$(dirname "$0")/.."
test -d data/cifar10/cifar-10-batches-py || python ../shared/data/cifar10/build.py data/cifar10
for lr in 0.1 0.01; do
  fxreplay compare --config configs/resnet20_cifar10_10k.yaml --methods bp,fr,ddg --K 2,4 --seeds 0,1 --lr "$lr" \
    --boundaries 2=layer2.1 --boundaries 4=layer1.2,layer2.1,layer3 --out "benchmarks/runs/converged-lr$lr"
done
