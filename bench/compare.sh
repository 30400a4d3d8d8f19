#!/usr/bin/env bash
# Runs an ibot benchmark and its PyTorch reference in the same session and prints both with
# the ratio. Usage (from the repo root):
#   bash bench/compare.sh data    # data pipeline, 1 and 2 workers, on ../shared/bench/photos
#   bash bench/compare.sh step    # one full ViT-S/16 training step on random tensors
#   bash bench/compare.sh step-bf16  # the same step under bfloat16 autocast (both sides)
# ROUNDS=n sets how many alternating runs of each side the step comparisons take the median of.
# The data comparison needs torchvision + Pillow in the venv; they are installed here (not by
# scripts/bootstrap.sh: only this benchmark uses them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
cargo build --release --quiet
py=.venv/bin/python
rate() { grep -oE '[0-9.]+ (img/s|ms/iter)' | head -1 | cut -d' ' -f1; }
case "${1:-data}" in
data)
    if ! $py -c 'import torchvision, PIL' 2>/dev/null; then
        echo "installing torchvision 0.28.0 and Pillow into .venv for the reference pipeline"
        .venv/bin/pip install --quiet --no-deps torchvision==0.28.0 pillow
    fi
    epochs=${EPOCHS:-4}
    printf '%-8s %14s %20s %8s\n' workers "ibot img/s" "torchvision img/s" ratio
    for w in 1 2; do
        ours=$(target/release/ibot bench data --num_workers "$w" --epochs "$epochs" | rate)
        ref=$($py bench/torchvision_pipeline.py --num_workers "$w" --epochs "$epochs" | rate)
        printf '%-8s %14s %20s %7.2fx\n' "$w" "$ours" "$ref" "$(awk -v a="$ours" -v b="$ref" 'BEGIN { print a / b }')"
    done
    ;;
step | step-bf16)
    # Alternates ROUNDS (default 3) runs of each side and compares the medians: on a shared
    # 2-core VM single runs of either side vary by up to 1.5x from minute to minute.
    rounds=${ROUNDS:-3}
    if [ "$1" = step-bf16 ]; then
        ours_flags=(--precision bfloat16); ref_flags=(--autocast bf16); what="bf16 autocast"
    else
        ours_flags=(); ref_flags=(); what="float32"
    fi
    o=(); r=()
    for i in $(seq "$rounds"); do
        o+=("$(target/release/ibot bench train --iters 8 --warmup 2 "${ours_flags[@]}" | rate)")
        r+=("$($py bench/torch_step.py --iters 8 --warmup 2 "${ref_flags[@]}" 2>/dev/null | rate)")
        echo "round $i: ibot ${o[-1]} ms/iter, PyTorch ${r[-1]} ms/iter"
    done
    median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
    mo=$(median "${o[@]}"); mr=$(median "${r[@]}")
    printf 'ms/iter (%s, median of %s): ibot %s, PyTorch eager %s, time ratio ibot/PyTorch %.2f\n' "$what" "$rounds" "$mo" "$mr" "$(awk -v a="$mo" -v b="$mr" 'BEGIN { print a / b }')"
    ;;
*)
    echo "usage: bash bench/compare.sh data|step|step-bf16" >&2
    exit 2
    ;;
esac
