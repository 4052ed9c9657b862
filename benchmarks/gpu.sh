#!/usr/bin/env bash
# benchmarks/gpu.sh — every check that needs a GPU, in one run (a lent GPU's time is short).
#
#   bash benchmarks/gpu.sh [OUT_DIR]      (on a machine with one CUDA GPU, torch, triton, pytest, hypothesis)
#
# 1. tests/test_kernels.py's Triton-against-reference comparisons, compiled for real (no interpreter),
#    hypothesis profile "dev" (50 draws per property instead of CI's 10);
# 2. benchmarks/kernels.py: each kernel's GB/s beside a device copy, torch eager and torch.compile;
# 3. train.py on the GPU in bf16 at GPT-2 small's shape (12 layers, hidden 768, 12 heads, seq 1024): tokens/s
#    and MFU against the chip's dense bf16 peak, with the Triton kernels (core attention: the fused softmax),
#    with the plain-PyTorch references (NANOMEG_TRITON=0), and with SDPA (flash) attention;
# 4. benchmarks/moe.py on the GPU: dense against MoE at equal active parameters; and train.py's MoE GPT
#    (8 experts, top-2) at the shape of 3., its tokens/s and MFU (active FLOPs);
# 5. GPT-2 small (12 layers, hidden 768, vocab 50257, seq 1024, batch 16) in bf16, SDPA attention:
#    benchmarks/step_cpu.py --device cuda: nanomeg eager and compiled beside a nanoGPT-layout nn.Module and
#    transformers' GPT2LMHeadModel (sdpa), both compiled, alternating steps in one process, with MFU; then
#    train.py at GPT-2 small's shape (bytes) with and without --compile, its tokens/s and MFU.
# Each part has its own time limit, so one slow part cannot eat the others; logs go to OUT_DIR.
# PARTS="1 4" runs only those parts (default: all).
set -u
OUT_DIR=${1:-gpu-logs}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PARTS=${PARTS:-1 2 3 4 5}
want() { [[ " $PARTS " == *" $1 "* ]]; }

nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
PEAK=${PEAK_FLOPS:-989e12}  # H100 / H200 SXM dense bf16 (the spec sheet's 1979 is with 2:4 sparsity)

want 1 && echo "== 1. kernel tests on the GPU (compiled, no interpreter)" && \
NANOMEG_TEST_DEVICE=cuda NANOMEG_PROFILE=dev timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "triton_matches or every_variant or real_block or fully_masked or inf_and_nan or poisoned or row_groups" 2>&1 \
    | tee "$OUT_DIR/kernel_tests.log" | tail -15

want 2 && echo "== 2. kernel benchmark" && \
timeout 120 python3 benchmarks/kernels.py 2>&1 | tee "$OUT_DIR/kernels.log"

common="--bf16 --layers 12 --hidden 768 --heads 12 --seq 1024 --max-seq 1024 --batch 16 --steps 30 --log-every 10
        --eval-every 1000 --eval-batches 2 --sample-tokens 0 --peak-flops $PEAK"
want 3 && echo "== 3. train.py, GPT-2 small shape, bf16, batch 16 x 1024 tokens"
want 3 && for run in "core triton:1:core" "core reference:0:core" "sdpa:0:sdpa"; do
    IFS=: read -r name triton attention <<<"$run"
    echo "-- $name"
    NANOMEG_TRITON=$triton timeout 60 python3 train.py $common --attention "$attention" 2>&1 \
        | tee "$OUT_DIR/train_${attention}_${triton}.log" | grep -E "^(model|MFU|step|eval)"
done

if want 4; then
    echo "== 4. MoE benchmark, and train.py with 8 experts top-2 (core attention, Triton kernels)"
    timeout 150 python3 benchmarks/moe.py --device cuda 2>&1 | tee "$OUT_DIR/moe.log"
    timeout 90 python3 train.py $common --attention core --experts 8 --topk 2 2>&1 | tee "$OUT_DIR/train_moe.log" \
        | grep -E "^(model|experts|MFU|step|eval)"
fi

if want 5; then
    echo "== 5. GPT-2 small, bf16, seq 1024, SDPA: nanomeg eager / compiled beside nanoGPT and GPT2LMHeadModel compiled"
    timeout 300 python3 benchmarks/step_cpu.py --device cuda --bf16 --compile --shapes 12x768x1024x16x50257 \
        --steps 10 --peak-flops "$PEAK" 2>&1 | tee "$OUT_DIR/step_gpt2_small.log"
    for flag in "" "--compile"; do
        echo "-- train.py --attention sdpa $flag"
        timeout 150 python3 train.py $common --attention sdpa $flag 2>&1 \
            | tee "$OUT_DIR/train_sdpa${flag:+_compile}.log" | grep -E "^(model|MFU|step|eval|error)"
    done
fi
