#!/usr/bin/env bash
# Data-parallel checks and throughput on one host with 2 GPUs (results: docs/benchmarks.md).
#   bash scripts/gpu_scaling.sh REPORT_DIR
# 1. bf16 equivalence: 1 GPU x batch 16 vs DDP 2 GPUs x batch 8, 10 steps (no router noise, global balance).
# 2. throughput: batch 8 per GPU, 1 GPU vs DDP on 2 GPUs (weak scaling), GPT-2-small shape, MoE 8-11.
# 3. FSDP on 2 GPUs: stop at step 5 with a sharded checkpoint, resume to 10, gather final/.
set -euo pipefail
REPORT=${1:?usage: gpu_scaling.sh REPORT_DIR}
mkdir -p "$REPORT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
ROOT=runs/scaling
COMMON=(--config configs/scaling.yaml "output_dir=$ROOT" data.cache_dir=runs/data_cache)
EQ=(train.steps=10 log.every=1 log.router_every=5 model.moe.noise_std=0 train.balance_scope=global)
one=(accelerate launch --config_file configs/accelerate/single_gpu.yaml)
ddp=(accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2)
fsdp=(accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2)
run() { local name=$1; shift; echo "== $name"; "$@" scripts/train.py "${COMMON[@]}" "log.run_name=$name" \
  "${EXTRA[@]}" 2>&1 | grep -v "it/s]" | tail -n 5; cp "$ROOT/$name/metrics.jsonl" "$REPORT/$name.jsonl"; }

EXTRA=("${EQ[@]}" train.batch_size=16); run eq1 "${one[@]}"
EXTRA=("${EQ[@]}" train.batch_size=8); run eq2 "${ddp[@]}"
EXTRA=(train.batch_size=8); run tp1 "${one[@]}"
EXTRA=(train.batch_size=8); run tp2 "${ddp[@]}"
EXTRA=(train.steps=10 train.batch_size=8 train.stop_after=5 checkpoint.every=5); run fsdp "${fsdp[@]}"
EXTRA=(train.steps=10 train.batch_size=8 checkpoint.every=5 --resume auto); run fsdp "${fsdp[@]}"
python - "$ROOT/fsdp/final" <<'PY'
import sys, torch, moe_emergence  # noqa: F401  (registers gpt2_moe)
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
n = sum(p.numel() for p in m.parameters())
print(f"fsdp final/: {type(m).__name__}, {n / 1e6:.1f}M parameters, finite: "
      f"{all(torch.isfinite(p).all() for p in m.parameters())}")
PY
