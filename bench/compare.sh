#!/usr/bin/env bash
# Runs an ibot benchmark and its PyTorch reference in the same session and prints both with
# the ratio. Usage (from the repo root):
#   bash bench/compare.sh data    # data pipeline, 1 and 2 workers, on ../shared/bench/photos
#   bash bench/compare.sh step    # one full ViT-S/16 training step on random tensors
#   bash bench/compare.sh step-bf16  # the same step under bfloat16 autocast (both sides)
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
step)
    ours=$(target/release/ibot bench train --iters 8 --warmup 2 | rate)
    ref=$($py bench/torch_step.py --iters 8 --warmup 2 | rate)
    printf 'ms/iter: ibot %s, PyTorch eager %s, time ratio ibot/PyTorch %.2f\n' "$ours" "$ref" "$(awk -v a="$ours" -v b="$ref" 'BEGIN { print a / b }')"
    ;;
step-bf16)
    ours=$(target/release/ibot bench train --iters 8 --warmup 2 --precision bfloat16 | rate)
    ref=$($py bench/torch_step.py --iters 8 --warmup 2 --autocast bf16 | rate)
    printf 'ms/iter (bf16 autocast): ibot %s, PyTorch eager %s, time ratio ibot/PyTorch %.2f\n' "$ours" "$ref" "$(awk -v a="$ours" -v b="$ref" 'BEGIN { print a / b }')"
    ;;
*)
    echo "usage: bash bench/compare.sh data|step|step-bf16" >&2
    exit 2
    ;;
esac
