#!/usr/bin/env bash
# Runs an ibot benchmark and its PyTorch reference in the same session and prints both with
# the ratio. Usage (from the repo root):
#   bash bench/compare.sh data    # data pipeline, 1 and 2 workers, on ../shared/bench/photos
#   bash bench/compare.sh step    # one full ViT-S/16 training step on random tensors
#   bash bench/compare.sh step-bf16  # the same step under bfloat16 autocast (both sides)
#   bash bench/compare.sh allreduce  # c10d Gloo all-reduce of a ViT-S-sized gradient, 2 ranks:
#                                    # ibot launch vs torchrun + torch.distributed
#   bash bench/compare.sh dp-step    # ViT-S/16 step: 2 ranks x 1 thread vs 1 process x 2 threads
#   bash bench/compare.sh finetune-step  # one fine-tuning step (ViT-S/16, batch 32, Mixup/CutMix,
#                                    # layer decay; imagenet_layer_decay recipe), img/s
#   bash bench/compare.sh finetune-swin-step  # one fine-tuning step of Swin-T/7 (WINDOW=7 or 14,
#                                    # BATCH default 32, layer decay, Mixup/CutMix), img/s; one
#                                    # thread each (THREADS), wall and CPU time, alternating rounds
#   bash bench/compare.sh swin-step  # one Swin-T training step (WINDOW=7 or 14, default 7), batch 4,
#                                    # 2x224 + 2x96 crops, out_dim 8192, float32
#   bash bench/compare.sh recipe-step  # the official ViT-S/16 recipe's step: batch 4, 2x224 + 10x96,
#                                      # out_dim 8192, float32; wall and CPU time, peak RSS
#   bash bench/compare.sh gemm-account  # recipe-step's shapes with MKL's and oneDNN's call logs:
#                                    # what the matrix products cost per step on each side, at what
#                                    # GFLOPS, and the time left outside them (bench/mkl_account.py)
#   bash bench/compare.sh scaling    # ms/iter of both vs batch (1 4 16 64) and local crops (0 2 6 10)
#                                    # on the Fashion-MNIST recipe (ViT patch 4, width 192, depth 6,
#                                    # 2x32 + Nx16 crops, out_dim 8192)
#   bash bench/compare.sh fmnist-epochs  # whole epochs of that recipe with data loading: `ibot
#                                    # train` vs the official training loop (bench/torch_train_fmnist.py)
#                                    # on the first SUBSET (default 1280) Fashion-MNIST images,
#                                    # EPOCHS (default 2), batch 64, 6 local crops, WORKERS (default 2)
#                                    # loader workers; wall and CPU time (user + sys of the process
#                                    # and its workers) of the whole run, ROUNDS (default 1) alternating
# REF_MKL=features (every step comparison) lets the reference's MKL choose its kernels by the
# CPU's features (AVX-512 on AMD Zen 4/5 too) instead of by vendor, as ibot's MKL does: both sides
# then run the same MKL kernels, which is the comparison to expect on an Intel CPU. Without it
# the reference runs as the unchanged official code does on this CPU.
# REF_GEMM=onednn (recipe-step, scaling, fmnist-epochs, finetune-swin-step) routes the reference's
# nn.Linear through oneDNN inside libtorch instead of MKL's sgemm (the earlier way to take MKL's
# AVX2-only path on AMD out of the comparison; REF_MKL=features is the closer one, since it also
# covers the reference's batched products). OURS_GEMM=onednn runs ibot with IBOT_CPU_GEMM=onednn
# (its float32 Linear on oneDNN) instead of MKL's F.linear, the default.
# OURS_PRECISION (recipe-step, scaling) sets ibot's arithmetic: float32 (the default here: `ibot
# bench train` runs with --use_fp16 false), default (--use_fp16 true --precision auto: what
# `ibot train` does by default, i.e. bfloat16 autocast where the CPU has AMX or the cached
# start-up probe measured it to pay, else float32; the chosen precision is printed) or bfloat16
# (forced). The reference always runs the official float32 step.
# ROUNDS=n sets how many alternating runs of each side the step comparisons take the median of.
# THREADS=n runs both sides with n libtorch threads (default: all cores). On a machine shared with
# other jobs, THREADS=1 and the CPU times ("CPU ... ms/iter") are the steadier comparison: the
# wall time then counts the waits for a core, and with 2 threads OpenMP spins while its partner
# thread waits.
# The data comparison needs torchvision + Pillow in the venv; scripts/bootstrap.sh installs them
# (as test oracles), and this script installs them itself if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
cargo build --release --quiet
py=.venv/bin/python
rate() { grep -oE '[0-9.]+ (img/s|ms/iter)' | head -1 | cut -d' ' -f1; }
cpu_rate() { grep -oE 'CPU [0-9.]+ ms/iter' | head -1 | cut -d' ' -f2; }
threads=${THREADS:-0}
ours_threads=(); ref_threads=()
if [ "$threads" != 0 ]; then ours_threads=(--threads "$threads"); ref_threads=(--threads "$threads"); fi
ref_threads+=(--gemm "${REF_GEMM:-default}")
if [ -n "${OURS_GEMM:-}" ]; then export IBOT_CPU_GEMM="$OURS_GEMM"; fi
# REF_MKL=features: the reference's MKL picks its kernels by CPU features, as ibot's does
# (bench/mkl_cpu_features.c, LD_PRELOADed); default: the official code as it runs unchanged.
ref_py=$py
case "${REF_MKL:-vendor}" in
features)
    mkdir -p target/bench
    gcc -shared -fPIC -O2 -o target/bench/libmkl_cpu_features.so bench/mkl_cpu_features.c
    ref_py="env LD_PRELOAD=$PWD/target/bench/libmkl_cpu_features.so $py" ;;
vendor) ;;
*) echo "REF_MKL must be vendor or features" >&2; exit 2 ;;
esac
case "${OURS_PRECISION:-float32}" in
float32) ours_prec=(--use_fp16 false) ;;
default) ours_prec=(--use_fp16 true --precision auto) ;;
bfloat16) ours_prec=(--precision bfloat16) ;;
*) echo "OURS_PRECISION must be float32, default or bfloat16" >&2; exit 2 ;;
esac
echo "reference gemm: ${REF_GEMM:-default}, MKL kernels: ${REF_MKL:-vendor}; ibot IBOT_CPU_GEMM=${IBOT_CPU_GEMM:-(default: blas, i.e. MKL)}, ibot precision: ${OURS_PRECISION:-float32} (${ours_prec[*]})"
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
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
        r+=("$($ref_py bench/torch_step.py --iters 8 --warmup 2 "${ref_flags[@]}" 2>/dev/null | rate)")
        echo "round $i: ibot ${o[-1]} ms/iter, PyTorch ${r[-1]} ms/iter"
    done
    median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
    mo=$(median "${o[@]}"); mr=$(median "${r[@]}")
    printf 'ms/iter (%s, median of %s): ibot %s, PyTorch eager %s, time ratio ibot/PyTorch %.2f\n' "$what" "$rounds" "$mo" "$mr" "$(awk -v a="$mo" -v b="$mr" 'BEGIN { print a / b }')"
    ;;
finetune-step)
    rounds=${ROUNDS:-3}; iters=${ITERS:-3}
    ips() { grep -oE '[0-9.]+ img/s' | head -1 | cut -d' ' -f1; }
    o=(); r=()
    for i in $(seq "$rounds"); do
        o+=("$(target/release/ibot finetune --arch vit_small --batch_size 32 --bench_steps "$iters" --device cpu | ips)")
        r+=("$($ref_py bench/torch_finetune_step.py --arch vit_small --batch 32 --iters "$iters" 2>/dev/null | ips)")
        echo "round $i: ibot ${o[-1]} img/s, PyTorch ${r[-1]} img/s"
    done
    median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
    mo=$(median "${o[@]}"); mr=$(median "${r[@]}")
    printf 'img/s (ViT-S/16 fine-tuning step, batch 32, median of %s): ibot %s, PyTorch eager %s, throughput ratio ibot/PyTorch %.2f\n' "$rounds" "$mo" "$mr" "$(awk -v a="$mo" -v b="$mr" 'BEGIN { print a / b }')"
    ;;
finetune-swin-step)
    # The imagenet_layer_decay step on the official Swin-T classifier, random 224-px images.
    # One libtorch thread per side by default: on a shared machine the CPU times are the steadier
    # comparison (wall time counts the waits for a core).
    # REF_GEMM=onednn runs the reference's nn.Linear on oneDNN too (bench/torch_step.py --gemm).
    rounds=${ROUNDS:-3}; iters=${ITERS:-2}; window=${WINDOW:-7}; batch=${BATCH:-32}; th=${THREADS:-1}; gemm=${REF_GEMM:-default}
    ips() { grep -oE '[0-9.]+ img/s' | head -1 | cut -d' ' -f1; }
    o=(); r=(); oc=(); rc=()
    for i in $(seq "$rounds"); do
        out=$(target/release/ibot --threads "$th" finetune --arch swin_tiny --window_size "$window" --batch_size "$batch" --bench_steps "$iters" --device cpu 2>/dev/null)
        o+=("$(echo "$out" | ips)"); oc+=("$(echo "$out" | cpu_rate)")
        out=$($ref_py bench/torch_finetune_step.py --arch swin_tiny --window_size "$window" --batch "$batch" --iters "$iters" --threads "$th" --gemm "$gemm" 2>/dev/null)
        r+=("$(echo "$out" | ips)"); rc+=("$(echo "$out" | cpu_rate)")
        echo "round $i (load $(cut -d' ' -f1-3 /proc/loadavg)): ibot ${o[-1]} img/s (CPU ${oc[-1]} ms/iter), PyTorch ${r[-1]} img/s (CPU ${rc[-1]} ms/iter)"
    done
    mo=$(median "${o[@]}"); mr=$(median "${r[@]}"); co=$(median "${oc[@]}"); cr=$(median "${rc[@]}")
    echo "Swin-T/$window fine-tuning step, batch $batch, $th thread(s), reference gemm $gemm, medians of $rounds: wall ibot $mo vs PyTorch $mr img/s (throughput ratio $(ratio "$mo" "$mr")); CPU ibot $co vs PyTorch $cr ms/iter (time ratio ibot/PyTorch $(ratio "$co" "$cr"))"
    ;;
swin-step)
    # Same step as `step`, on the official Swin-T (4-px patches, masks on the 32-px grid) at a
    # batch small enough for a shared 2-core VM. ITERS/WARMUP set the timed/warm-up steps.
    rounds=${ROUNDS:-3}; window=${WINDOW:-7}; iters=${ITERS:-4}; warmup=${WARMUP:-1}
    flags=(--arch swin_tiny --window_size "$window" --batch 4 --local_crops_number 2 --out_dim 8192 --iters "$iters" --warmup "$warmup")
    o=(); r=()
    for i in $(seq "$rounds"); do
        o+=("$(target/release/ibot bench train "${flags[@]}" | rate)")
        r+=("$($ref_py bench/torch_step.py "${flags[@]}" 2>/dev/null | rate)")
        echo "round $i: ibot ${o[-1]} ms/iter, PyTorch ${r[-1]} ms/iter"
    done
    median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
    mo=$(median "${o[@]}"); mr=$(median "${r[@]}")
    printf 'ms/iter (Swin-T/%s, batch 4, 2x224 + 2x96, float32, median of %s): ibot %s, PyTorch eager %s, time ratio ibot/PyTorch %.2f\n' "$window" "$rounds" "$mo" "$mr" "$(awk -v a="$mo" -v b="$mr" 'BEGIN { print a / b }')"
    ;;
allreduce)
    rounds=${ROUNDS:-3}
    median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
    ms() { grep -oE '[0-9.]+ ms' | head -1 | cut -d' ' -f1; }
    o=(); r=()
    for i in $(seq "$rounds"); do
        o+=("$(target/release/ibot launch --nproc_per_node 2 --master_port 29731 bench allreduce --iters 20 2>/dev/null | ms)")
        r+=("$(.venv/bin/torchrun --nproc_per_node 2 --master_port 29732 bench/torch_allreduce.py --iters 20 2>/dev/null | ms)")
        echo "round $i: ibot ${o[-1]} ms, torch.distributed ${r[-1]} ms"
    done
    mo=$(median "${o[@]}"); mr=$(median "${r[@]}")
    printf 'all_reduce of 22M float32 over 2 ranks (Gloo, median of %s): ibot %s ms, torch.distributed %s ms, bandwidth ratio ibot/torch %.2f\n' "$rounds" "$mo" "$mr" "$(awk -v a="$mo" -v b="$mr" 'BEGIN { print b / a }')"
    ;;
dp-step)
    # The same total batch (16 images) as 1 process x 2 threads and as 2 ranks x 1 thread x 8.
    rounds=${ROUNDS:-3}
    for i in $(seq "$rounds"); do
        one=$(target/release/ibot --threads 2 bench train --batch 16 --iters 5 --warmup 1 | rate)
        two=$(target/release/ibot launch --nproc_per_node 2 --master_port 29733 bench train --batch 8 --iters 5 --warmup 1 2>/dev/null | grep -v '^\[' | rate)
        echo "round $i: 1 process x 2 threads ${one} ms/iter, 2 ranks x 1 thread ${two} ms/iter (16 images per step either way)"
    done
    ;;
recipe-step)
    # The official ViT-S/16 recipe's shapes: 2x224 + 10x96 crops, out_dim 8192, batch 4, float32.
    rounds=${ROUNDS:-3}; iters=${ITERS:-3}; warmup=${WARMUP:-1}
    flags=(--arch vit_small --batch 4 --local_crops_number 10 --out_dim 8192 --iters "$iters" --warmup "$warmup")
    o=(); r=(); oc=(); rc=(); om=(); rm=()
    for i in $(seq "$rounds"); do
        out=$( { /usr/bin/time -f 'peak RSS %M KB' target/release/ibot "${ours_threads[@]}" bench train "${flags[@]}" --patch_out_dim 8192 "${ours_prec[@]}"; } 2>&1 )
        if [ "$i" = 1 ]; then echo "$out" | grep -m1 '^precision:' || true; fi
        o+=("$(echo "$out" | rate)"); oc+=("$(echo "$out" | cpu_rate)"); om+=("$(echo "$out" | grep -oE 'peak RSS [0-9]+' | cut -d' ' -f3)")
        out=$( { /usr/bin/time -f 'peak RSS %M KB' $ref_py bench/torch_step.py "${ref_threads[@]}" "${flags[@]}"; } 2>&1 )
        r+=("$(echo "$out" | rate)"); rc+=("$(echo "$out" | cpu_rate)"); rm+=("$(echo "$out" | grep -oE 'peak RSS [0-9]+' | cut -d' ' -f3)")
        echo "round $i (load $(cut -d' ' -f1-3 /proc/loadavg)): ibot ${o[-1]} ms/iter (CPU ${oc[-1]}, RSS ${om[-1]} KB), PyTorch ${r[-1]} ms/iter (CPU ${rc[-1]}, RSS ${rm[-1]} KB)"
    done
    mo=$(median "${o[@]}"); mr=$(median "${r[@]}"); co=$(median "${oc[@]}"); cr=$(median "${rc[@]}"); so=$(median "${om[@]}"); sr=$(median "${rm[@]}")
    echo "ViT-S/16 recipe step, medians of $rounds: wall ibot $mo vs PyTorch $mr ms/iter (ratio $(ratio "$mo" "$mr")); CPU ibot $co vs $cr ms/iter (ratio $(ratio "$co" "$cr")); peak RSS ibot $so vs $sr KB (ratio $(ratio "$so" "$sr"))"
    ;;
gemm-account)
    # recipe-step's shapes, one run of each side with MKL_VERBOSE=1 ONEDNN_VERBOSE=1 (every
    # matrix product logged with its shape and duration) and one without (the step's CPU time),
    # then bench/mkl_account.py: what the products cost per step on each side, at what speed, and
    # what is left outside them. Run it with THREADS=1 (per-call times are one core's).
    iters=${ITERS:-2}; warmup=${WARMUP:-1}; steps=$((iters + warmup))
    flags=(--arch vit_small --batch 4 --local_crops_number 10 --out_dim 8192 --iters "$iters" --warmup "$warmup")
    mkdir -p target/bench
    co=$(target/release/ibot "${ours_threads[@]}" bench train "${flags[@]}" --patch_out_dim 8192 "${ours_prec[@]}" 2>&1 | cpu_rate)
    MKL_VERBOSE=1 ONEDNN_VERBOSE=1 target/release/ibot "${ours_threads[@]}" bench train "${flags[@]}" --patch_out_dim 8192 "${ours_prec[@]}" > target/bench/gemm-ibot.log 2>&1
    cr=$($ref_py bench/torch_step.py "${ref_threads[@]}" "${flags[@]}" 2>/dev/null | cpu_rate)
    MKL_VERBOSE=1 ONEDNN_VERBOSE=1 $ref_py bench/torch_step.py "${ref_threads[@]}" "${flags[@]}" > target/bench/gemm-ref.log 2>&1
    $py bench/mkl_account.py target/bench/gemm-ibot.log "$steps" --step_ms "$co" --label ibot
    $py bench/mkl_account.py target/bench/gemm-ref.log "$steps" --step_ms "$cr" --label PyTorch
    echo "CPU ms per step without logs: ibot $co, PyTorch $cr (ratio $(ratio "$co" "$cr")); logs in target/bench/gemm-{ibot,ref}.log"
    ;;
scaling)
    # The Fashion-MNIST recipe of issue 14 (ViT patch 4, width 192, depth 6, 3 heads, 32-px table,
    # 2x32 + Nx16 crops, out_dim 8192); one run of each side per point, alternating.
    iters=${ITERS:-3}; warmup=${WARMUP:-1}
    model=(--arch vit_tiny --patch_size 4 --embed_dim 192 --depth 6 --num_heads 3 --img_size 32 --global_crops_size 32 --local_crops_size 16 --out_dim 8192 --iters "$iters" --warmup "$warmup")
    point() {
        local o r
        o=$(target/release/ibot "${ours_threads[@]}" bench train "${model[@]}" --patch_out_dim 8192 "${ours_prec[@]}" "$@" 2>&1)
        r=$($ref_py bench/torch_step.py "${ref_threads[@]}" "${model[@]}" "$@" 2>/dev/null)
        printf '%-34s ibot %9s ms (CPU %9s)   PyTorch %9s ms (CPU %9s)   CPU ratio %s\n' "$*" "$(echo "$o" | rate)" "$(echo "$o" | cpu_rate)" "$(echo "$r" | rate)" "$(echo "$r" | cpu_rate)" "$(ratio "$(echo "$o" | cpu_rate)" "$(echo "$r" | cpu_rate)")"
    }
    echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
    for b in 1 4 16 64; do point --batch "$b" --local_crops_number 6; done
    for l in 0 2 6 10; do point --batch 64 --local_crops_number "$l"; done
    echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
    ;;
fmnist-epochs)
    # Whole epochs of the Fashion-MNIST recipe of issue 14 with data loading, the same options
    # on both sides (float32, the student head shared as the reference's, norm_last_layer).
    rounds=${ROUNDS:-1}; subset=${SUBSET:-1280}; epochs=${EPOCHS:-2}; workers=${WORKERS:-2}
    data=${DATA:-/usr/share/datasets/fashion-mnist}
    common=(--arch vit_tiny --patch_size 4 --embed_dim 192 --depth 6 --num_heads 3 --img_size 32
        --global_crops_size 32 --local_crops_size 16 --local_crops_number 6 --out_dim 8192
        --batch_size_per_gpu 64 --epochs "$epochs" --subset "$subset" --num_workers "$workers"
        --warmup_epochs 1 --warmup_teacher_temp_epochs 1 --data_path "$data")
    out_dir=$(mktemp -d); trap 'rm -rf "$out_dir"' EXIT
    tfmt='TIME wall %e user %U sys %S rss %M'
    field() { grep -oE "TIME .*" | grep -oE "$1 [0-9.]+" | cut -d' ' -f2; }
    ow=(); rw=(); oc=(); rc=()
    for i in $(seq "$rounds"); do
        rm -rf "$out_dir"/*
        out=$( { /usr/bin/time -f "$tfmt" target/release/ibot "${ours_threads[@]}" train "${common[@]}" --patch_out_dim 8192 \
            --shared_head true --precision float32 --output_dir "$out_dir/ibot" --saveckp_freq 0; } 2>&1 )
        ow+=("$(echo "$out" | field wall)"); oc+=("$(awk -v u="$(echo "$out" | field user)" -v s="$(echo "$out" | field sys)" 'BEGIN { print u + s }')")
        echo "$out" | grep -E '^epoch [0-9]+:' | sed 's/^/  ibot: /' || true
        out=$( { /usr/bin/time -f "$tfmt" $ref_py bench/torch_train_fmnist.py "${ref_threads[@]}" "${common[@]}" --output_dir "$out_dir/ref"; } 2>&1 )
        rw+=("$(echo "$out" | field wall)"); rc+=("$(awk -v u="$(echo "$out" | field user)" -v s="$(echo "$out" | field sys)" 'BEGIN { print u + s }')")
        echo "$out" | grep -E '^(epoch [0-9]+:|onednn)' | sed 's/^/  official loop: /' || true
        echo "round $i (load $(cut -d' ' -f1-3 /proc/loadavg)): ibot ${ow[-1]} s wall, ${oc[-1]} s CPU; official loop ${rw[-1]} s wall, ${rc[-1]} s CPU"
    done
    mow=$(median "${ow[@]}"); mrw=$(median "${rw[@]}"); moc=$(median "${oc[@]}"); mrc=$(median "${rc[@]}")
    echo "Fashion-MNIST recipe, $epochs epochs of $subset images (batch 64, 2x32 + 6x16, $workers workers, threads ${THREADS:-default}), whole process, medians of $rounds: CPU ibot $moc s vs official loop $mrc s (ratio $(ratio "$moc" "$mrc")); wall $mow s vs $mrw s (ratio $(ratio "$mow" "$mrw"))"
    ;;
*)
    echo "usage: bash bench/compare.sh data|step|step-bf16|finetune-step|finetune-swin-step|swin-step|recipe-step|gemm-account|scaling|fmnist-epochs|allreduce|dp-step" >&2
    exit 2
    ;;
esac
