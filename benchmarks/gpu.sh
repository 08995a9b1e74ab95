#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one go, on one H100 / H200 (about 6 minutes, most of it compiling):
#   1. the distillation step at the paper's largest size (ViT-B from ViT-L, 224 px, batch 128) against the
#      PyTorch reference under fp16 autocast, with matmul peaks and a kernel profile of each variant;
#   2. low-precision parity of the loss and gradient (ViT-S from ViT-B);
#   3. the distillation step of ViT-S from ViT-B (batch 256) against the reference.
# Each appends its section to BENCHMARKS.md; the console output is also written to LOG_DIR/log.txt.
#
#   bash benchmarks/gpu.sh [LOG_DIR]          # PYTHON=... to pick the interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-/tmp/tinymim_gpu_benchmarks}
PY=${PYTHON:-python3}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
status=0
run() {
  echo "+ $PY $*" | tee -a "$LOG_DIR/log.txt"
  "$PY" "$@" 2>&1 | tee -a "$LOG_DIR/log.txt" || status=1
  cp BENCHMARKS.md "$LOG_DIR/"
}
run benchmarks/distill_step.py --device gpu --size b_from_l --batch 128 \
    --variants bfloat16,bfloat16/bfloat16,bfloat16/bfloat16+cudnn --rounds 4 --steps 10 --trace --torch-profile
run benchmarks/bf16_parity.py --device gpu --size s_from_b --batch 32 \
    --variants float32,bfloat16,bfloat16/bfloat16,bfloat16/bfloat16+cudnn
run benchmarks/distill_step.py --device gpu --size s_from_b --batch 256 \
    --variants bfloat16/bfloat16,bfloat16/bfloat16+cudnn --rounds 3 --steps 10
exit $status
