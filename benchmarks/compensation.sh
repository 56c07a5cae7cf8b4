#!/usr/bin/env bash
# Staleness compensation on the converged CIFAR-10 benchmark (issue 25): features replay with
# each compensation rule, on the same runs as benchmarks/cifar_converged.sh (ResNet-20, a fixed
# 5,000-image subset, 30 epochs, configs/resnet20_cifar10_5k.yaml, the same pinned block splits).
#
#   Screening (its worst point: lr 0.1, K = 4, seed 0), every rule, one run each:
#     OMP_NUM_THREADS=1 nohup bash benchmarks/compensation.sh screen > benchmarks/runs/compensation-screen.log 2>&1 &
#   A quick proxy first (Fashion-MNIST, a small BN CNN, K = 4, lr 0.1, 2 epochs; ~10 min a run):
#     OMP_NUM_THREADS=1 bash benchmarks/compensation.sh proxy          # LR=0.3 for the higher rate
#     OMP_NUM_THREADS=1 OPTIM=adam bash benchmarks/compensation.sh proxy   # or OPTIM=nesterov: auto's other optimizers
#   The same at K = 8 on a 9-conv BN CNN (examples/deep_cnn.py; ~15 min a run):
#     OMP_NUM_THREADS=1 bash benchmarks/compensation.sh proxy8
#   And on an unnormalised model, K = 4 (examples/tanh_mlp.py, four tanh layers; ~5 min a run):
#     OMP_NUM_THREADS=1 bash benchmarks/compensation.sh proxy-mlp     # SPLIT=auto: the automatic split
#   The trend with depth: K = 8 on ResNet-56 (configs/resnet56_cifar10_5k.yaml), seed 0, ~1.5-2 h a run on one core:
#     OMP_NUM_THREADS=1 nohup bash benchmarks/compensation.sh deep > benchmarks/runs/compensation-deep.log 2>&1 &
#   Its diagnostics on a shorter schedule (EPOCHS=10: the same lr drops at 50 % and 75 %, ~15-25 min a run; into
#   benchmarks/runs/deep10-lr0.1/): EPOCHS=10 RULES="bp fr fr+lookahead+lr+predict+stretch" bash benchmarks/compensation.sh deep
#   WARMUP=1: every method, BP included, after a linear lr warm-up over the first 100 iterations (--warmup-steps 100;
#   into deepwarm[10]-lr0.1/). Without one BP's first iterations at lr 0.1 are unstable on ResNet-56 (He et al. warmed
#   ResNet-110 up at lr 0.01 for this), and compensation's delayed stages more so (docs/compensation.md, "K = 8").
#   The table that decides (BP, FR none, FR and DDG with auto's rules, FR with the previous auto, K = 2, 4, seeds 0-2):
#     OMP_NUM_THREADS=1 nohup bash benchmarks/compensation.sh table 0.1 > benchmarks/runs/compensation-0.1.log 2>&1 &
#   Only K = 4, the listed rules alone (no BP, FR or DDG rows; the kept ones stand for them), e.g. the synchronous start:
#     OMP_NUM_THREADS=1 RULES=fr+lookahead+predict+stretch+sync nohup bash benchmarks/compensation.sh k4 0.01 > ... 2>&1 &
#   The same at K = 2 and 4 (KS="2 4", the default; KS=2 for K = 2 alone): bash benchmarks/compensation.sh rules 0.1
#   Where the lr 0.01, K = 4 gap opens: the runs to the first lr drop, swapped (BP's weights under auto's rules and
#   the reverse) and trained on (benchmarks/handoff.py; seeds 0-2, nine half-runs of ~10 min a seed, six with HALVES=0):
#     OMP_NUM_THREADS=1 nohup bash benchmarks/compensation.sh handoff > benchmarks/runs/compensation-handoff.log 2>&1 &
#
# RULES="fr+predict+spike+stretch fr+predict" overrides the list; SEEDS="0 1 2" the seeds of `table`. Rerunning resumes each
# interrupted run from its last epoch and reuses finished ones (one `fxreplay compare` per list, a run
# directory in use is refused), so a session can restart it first thing. Each run takes ~20-40 min on one
# core. The run directories are git-ignored; benchmarks/converged_summary.py keeps every finished run's
# config.yaml and metrics.jsonl in benchmarks/results/converged-runs/ (commit those).
set -euo pipefail
cd "$(dirname "$0")/.."
test -d data/cifar10/cifar-10-batches-py || python ../shared/data/cifar10/build.py data/cifar10
python benchmarks/converged_summary.py --restore  # a fresh checkout reuses the kept finished runs
CONFIG=configs/resnet20_cifar10_5k.yaml
SPLIT2=2=layer2.1
SPLIT4=4=layer1.2,layer2.1,layer3
SPLIT8=8=layer1.3,layer1.7,layer2.2,layer2.5,layer2.8,layer3.2,layer3.5  # ResNet-56: 3-4 blocks a stage
mode=${1:-screen}
case "$mode" in
  screen)
    rules=${RULES:-"fr+lookahead+lr+predict+stretch fr+lookahead+lr+predict+spike+stretch fr+lr+predict+spike+stretch fr+predict+spike+stretch fr+predict+spike fr+lr+predict+spike fr+predict fr+spike fr+stretch fr+lr fr+shrink fr+official"}
    for r in $rules; do
      fxreplay compare --config "$CONFIG" --methods "$r" --K 4 --seeds 0 --lr 0.1 --boundaries "$SPLIT4" \
        --out benchmarks/runs/converged-lr0.1
    done ;;
  table)
    lr=${2:-0.1}
    rules=${RULES:-"fr+lookahead+predict+stretch+sync ddg+lr+predict+stretch fr+lookahead+lr+predict+stretch"}  # auto's rules by name (a later auto is another row; DDG's auto is lr+predict+stretch), and the previous auto
    for seed in ${SEEDS:-0 1 2}; do
      fxreplay compare --config "$CONFIG" --methods bp --K 2 --seeds "$seed" --lr "$lr" --boundaries "$SPLIT2" \
        --out "benchmarks/runs/converged-lr$lr"
      fxreplay compare --config "$CONFIG" --methods "fr,ddg,${rules// /,}" --K 2,4 --seeds "$seed" --lr "$lr" \
        --boundaries "$SPLIT2" --boundaries "$SPLIT4" --out "benchmarks/runs/converged-lr$lr"
    done ;;
  k4|rules)
    lr=${2:-0.1}
    rules=${RULES:?$mode runs the rules given: RULES=\"fr+RULES ...\"}
    ks=$([ "$mode" = k4 ] && echo 4 || echo "${KS:-2 4}")
    for seed in ${SEEDS:-0 1 2}; do
      for k in $ks; do
        case "$k" in 2) split=$SPLIT2;; 4) split=$SPLIT4;; *) echo "KS lists 2 and/or 4 (the pinned splits), got $k" >&2; exit 2;; esac
        fxreplay compare --config "$CONFIG" --methods "${rules// /,}" --K "$k" --seeds "$seed" --lr "$lr" \
          --boundaries "$split" --out "benchmarks/runs/converged-lr$lr"
      done
    done ;;
  deep)
    # BP runs at K = 8 too (the same algorithm at any K): one pinned split and one report for the four.
    case "${WARMUP:-0}" in 0) warm="";; 1) warm=warm;; *) echo "WARMUP must be 0 or 1, got $WARMUP" >&2; exit 2;; esac
    for r in ${RULES:-bp fr fr+lookahead+lr+predict+stretch fr+lookahead+lr+predict+spike+stretch fr+lr+predict+spike+stretch fr+predict+spike+stretch fr+lr+predict+spike+stretch=2}; do
      fxreplay compare --config configs/resnet56_cifar10_5k.yaml --methods "$r" --K 8 --seeds "${SEEDS:-0}" --lr "${LR:-0.1}" \
        --boundaries "$SPLIT8" ${EPOCHS:+--epochs "$EPOCHS"} ${warm:+--warmup-steps 100} --out "benchmarks/runs/deep${warm}${EPOCHS:-}-lr${LR:-0.1}"
    done
    exit 0 ;;
  handoff)
    # Where the weights are, or how they are trained after the first lr drop? (benchmarks/handoff.py) The converged
    # benchmark's BP, FR and FR+auto's rules at lr ${LR:-0.01}, K = 4, stopped at the drop (iteration 600 of 1200),
    # then trained on from each other's weights: auto's rules from BP's, BP from auto's, plain FR from auto's; then
    # the first halves themselves trained on (the unswapped runs). With HALVES=0 the kept runs of `table` stand for
    # them instead, where the table finds a swapped run's first half the same computation (else it says which first
    # half to train on). ~10 min a half-run on one core; the finished runs are kept in
    # benchmarks/results/compensation/handoff-lr<rate>/.
    # SWAP=N swaps at iteration N instead (after every stage's lr warm-up: N > 400; into handoff-lr<rate>-at<N>/).
    # VELOCITY=displacement converts the momentum to keep what it still moves the weights, not its next step (into
    # handoff-lr<rate>[-at<N>]-displacement/; benchmarks/handoff.py --velocity).
    lr=${LR:-0.01}
    swap=${SWAP:-600}
    velocity=${VELOCITY:-step}
    out=benchmarks/runs/handoff-lr$lr$([ "$swap" = 600 ] || echo "-at$swap")$([ "$velocity" = step ] || echo "-$velocity")
    mkdir -p "$out"
    # the converged benchmark's setup with its pinned K = 4 split (compare --boundaries "$SPLIT4")
    sed -e "s/^  lr: .*/  lr: $lr/" -e "s/^  K: .*/  K: 4/" -e "s/^  boundaries: .*/  boundaries: [${SPLIT4#4=}]/" \
      "$CONFIG" > "$out/config.yaml"
    auto=fr+lookahead+lr+predict+stretch
    half() {  # half METHOD SEED: the run to the drop
      local run="$out/$1-s$2" method=${1%%+*} rules=()
      [ "$1" = "$method" ] || rules=(--compensation "${1#*+}")
      if [ -f "$run/checkpoint.pt" ]; then fxreplay train --resume "$run" --max-steps "$swap"; return; fi
      fxreplay train --config "$out/config.yaml" --method "$method" "${rules[@]}" --seed "$2" --max-steps "$swap" --out "$run"
    }
    for seed in ${SEEDS:-0 1 2}; do
      for m in bp fr "$auto"; do half "$m" "$seed"; done
      for pair in "bp $auto" "$auto bp" "$auto fr"; do
        set -- $pair
        run="$out/$1@$2-s$seed"
        [ -d "$run" ] || python benchmarks/handoff.py --weights "$out/$1-s$seed" --dynamics "$out/$2-s$seed" --out "$run" \
          --velocity "$velocity"
        fxreplay train --resume "$run" --max-steps 1200
      done
      if [ "${HALVES:-1}" = 1 ]; then
        for m in bp fr "$auto"; do fxreplay train --resume "$out/$m-s$seed" --max-steps 1200; done
      fi
    done
    python benchmarks/handoff.py --table "$out" --kept "benchmarks/results/converged-runs/lr$lr" --keep "benchmarks/results/compensation/${out#benchmarks/runs/}"
    exit 0 ;;
  proxy|proxy8|proxy-mlp)
    # The quick screens (~10-15 min a run on one core): Fashion-MNIST (Debian: apt-get install
    # dataset-fashion-mnist), 2 epochs, batch 128, seed 0. proxy: examples/mnist_cnn.py, K = 4, lr $LR
    # (0.1); proxy8: examples/deep_cnn.py (9 convolutions), K = 8, lr 0.1.
    raw=data/FashionMNIST/raw
    mkdir -p "$raw"
    for f in /usr/share/datasets/fashion-mnist/*.gz; do
      test -f "$raw/$(basename "$f" .gz)" || gunzip -c "$f" > "$raw/$(basename "$f" .gz)"
    done
    if [ "$mode" = proxy ] && [ "${OPTIM:-sgd}" != sgd ]; then
      # OPTIM=adam (lr 0.003, no weight decay) or nesterov (SGD, Nesterov momentum 0.9, lr 0.1): auto's other
      # optimizers, the same proxy and schedule otherwise.
      mkdir -p benchmarks/runs
      config=benchmarks/runs/proxy-$OPTIM.yaml
      case "$OPTIM" in
        adam) lr=${LR:-0.003}; printf 'optim:\n  name: adam\n  lr: %s\n  weight_decay: 0.0\n' "$lr" > "$config" ;;
        nesterov) lr=${LR:-0.1}; printf 'optim:\n  name: sgd\n  lr: %s\n  momentum: 0.9\n  weight_decay: 0.0005\n  args: {nesterov: true}\n' "$lr" > "$config" ;;
        *) echo "OPTIM must be sgd, adam or nesterov, got $OPTIM" >&2; exit 2 ;;
      esac
      rules=${RULES:-"bp fr fr+lr+predict fr+predict+stretch fr+lr+predict+stretch fr+lookahead+lr+predict+stretch fr+predict+stretch=2"}
      fxreplay compare --config "$config" --model examples/mnist_cnn.py --data torchvision:FashionMNIST --data-root data --K 4 \
        --epochs 2 --batch-size 128 --methods "${rules// /,}" --out "benchmarks/runs/compensation-proxy-$OPTIM"
    elif [ "$mode" = proxy ]; then
      lr=${LR:-0.1}
      rules=${RULES:-"bp fr fr+lookahead+lr+predict+stretch fr+lookahead+lr+predict+spike+stretch fr+lr+predict+spike+stretch fr+predict+spike+stretch fr+predict+spike+stretch=1 fr+predict+spike+stretch=2 fr+lr+predict+spike+stretch=1 fr+stretch=1 fr+predict+spike fr+lr+predict+spike fr+predict fr+spike fr+lr fr+shrink ddg ddg+predict+spike+stretch ddg+predict+spike+stretch=1 ddg+predict+spike+stretch=2"}
      suffix=$([ "$lr" = 0.1 ] || echo "-lr$lr")
      fxreplay compare --model examples/mnist_cnn.py --data torchvision:FashionMNIST --data-root data --K 4 --lr "$lr" \
        --epochs 2 --batch-size 128 --methods "${rules// /,}" --out "benchmarks/runs/compensation-proxy$suffix"
    elif [ "$mode" = proxy-mlp ]; then
      rules=${RULES:-"bp fr fr+lookahead+lr+predict+stretch fr+predict+spike+stretch fr+lr+predict+spike+stretch fr+lookahead+lr+predict+spike+stretch fr+predict+spike+stretch=2"}
      # Pinned: every stage holds a linear layer. SPLIT=auto: the automatic FLOPs split instead, where
      # stage 2 is a lone tanh (the weighted stages' delays are 3, 2 and 0).
      if [ "${SPLIT:-pinned}" = auto ]; then pin=(); out=benchmarks/runs/compensation-proxy-mlp-unpinned
      else pin=(--boundaries 4=3,5,7); out=benchmarks/runs/compensation-proxy-mlp; fi
      fxreplay compare --model examples/tanh_mlp.py --data torchvision:FashionMNIST --data-root data --K 4 --lr 0.1 \
        --epochs 2 --batch-size 128 --methods "${rules// /,}" "${pin[@]}" --out "$out"
    else
      rules=${RULES:-"bp fr fr+lookahead+lr+predict+stretch fr+lookahead+lr+predict+spike+stretch fr+lr+predict+spike+stretch fr+predict+spike+stretch fr+predict+spike+stretch=1 fr+predict+spike+stretch=2"}
      fxreplay compare --model examples/deep_cnn.py --data torchvision:FashionMNIST --data-root data --K 8 --lr 0.1 \
        --epochs 2 --batch-size 128 --methods "${rules// /,}" --out benchmarks/runs/compensation-proxy8
    fi
    exit 0 ;;
  *) echo "usage: bash benchmarks/compensation.sh screen | table [LR] | k4 [LR] | rules [LR] | deep | handoff | proxy | proxy8 | proxy-mlp" >&2; exit 2 ;;
esac
python benchmarks/converged_summary.py
