#!/usr/bin/env bash
# Multi-GPU checks and weak scaling on one host with 2 GPUs; results in docs/benchmarks/h200x2.json and
# docs/scaling.md.
#   bash scripts/gpu_scaling.sh REPORT_DIR [SUMMARY_JSON]      (default SUMMARY_JSON: docs/benchmarks/h200x2.json)
# 1. bf16 equivalence: 1 GPU x batch 16 vs DDP 2 GPUs x batch 8, 10 steps (no router noise, global balance).
# 2. weak scaling, batch 8 per GPU (GPT-2-small shape, MoE in blocks 8-11, triton backend): 1 GPU, DDP and FSDP2
#    on 2 GPUs, RUNS runs each (default 3) of 40 steps: tokens/s over steps 11-40 (the first 10 are warm-up).
# 3. FSDP2: dense steps 0-2, upcycle (the MoE model wrapped again), stop at step 5 with a sharded checkpoint,
#    resume to 10, gather final/ (loaded and checked).
# Every run's whole log stays in REPORT_DIR/<name>.log; a run that fails prints the end of its log and stops the
# script with exit status 1 (nothing is filtered or hidden).
# Launchers can be replaced for a dry run elsewhere (ONE, DDP, FSDP: command prefixes; EXTRA_ALL: overrides).
# A sitting split in two: RUN_FROM=K starts the repetitions at K and SKIP_EQ=1 skips step 1, with the earlier
# sitting's eq*.jsonl and *_1..K-1.jsonl copied into REPORT_DIR first; RUNS_ONLY=1 ends a sitting after its
# repetitions (no checkpoint checks, no summary).
set -euo pipefail
REPORT=${1:?usage: gpu_scaling.sh REPORT_DIR [SUMMARY_JSON]}
SUMMARY=${2:-docs/benchmarks/h200x2.json}
RUNS=${RUNS:-3}
mkdir -p "$REPORT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
ROOT=runs/scaling
read -r -a one <<<"${ONE:-accelerate launch --config_file configs/accelerate/single_gpu.yaml}"
read -r -a ddp <<<"${DDP:-accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2}"
read -r -a fsdp <<<"${FSDP:-accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2}"
read -r -a extra_all <<<"${EXTRA_ALL:-}"
# train.cuda_graphs=none: the same experts path on 1 and 2 GPUs (auto graphs them on one process only)
COMMON=(--config configs/scaling.yaml "output_dir=$ROOT" data.cache_dir=runs/data_cache model.moe.backend=triton
  train.cuda_graphs=none)
EQ=(train.steps=10 log.every=1 log.router_every=5 model.moe.noise_std=0 train.balance_scope=global)
TP=(train.steps=40 train.batch_size=8 log.every=10 log.router_every=10)

# run LOG RUN_NAME LAUNCHER... -- OVERRIDES...
run() {
  local log=$1 name=$2; shift 2
  local launcher=() overrides=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  overrides=("$@")
  echo "== $log: ${launcher[*]} ... ${overrides[*]} (whole log: $REPORT/$log.log)"
  if ! "${launcher[@]}" scripts/train.py "${COMMON[@]}" "log.run_name=$name" "${overrides[@]}" \
    ${extra_all[@]+"${extra_all[@]}"} >"$REPORT/$log.log" 2>&1; then
    echo "FAILED: $log; the end of $REPORT/$log.log:"
    tail -n 60 "$REPORT/$log.log"
    exit 1
  fi
  cp "$ROOT/$name/metrics.jsonl" "$REPORT/$log.jsonl"
}

if [ "${SKIP_EQ:-0}" != 1 ]; then
  run eq1 eq1 "${one[@]}" -- "${EQ[@]}" train.batch_size=16 --overwrite
  run eq2 eq2 "${ddp[@]}" -- "${EQ[@]}" train.batch_size=8 --overwrite
fi
for i in $(seq "${RUN_FROM:-1}" "$RUNS"); do
  run "tp1_$i" "tp1_$i" "${one[@]}" -- "${TP[@]}" --overwrite
  run "ddp_$i" "ddp_$i" "${ddp[@]}" -- "${TP[@]}" --overwrite
  run "fsdp_$i" "fsdp_$i" "${fsdp[@]}" -- "${TP[@]}" --overwrite
done
if [ "${RUNS_ONLY:-0}" = 1 ]; then exit 0; fi
run fsdp_stop fsdp_ckpt "${fsdp[@]}" -- train.steps=10 log.every=1 train.batch_size=8 train.stop_after=5 checkpoint.every=5 model.upcycle_at_step=3 --overwrite
run fsdp_resume fsdp_ckpt "${fsdp[@]}" -- train.steps=10 log.every=1 train.batch_size=8 checkpoint.every=5 model.upcycle_at_step=3 --resume auto
"${PYTHON:-python3}" scripts/scaling_report.py "$REPORT" --runs "$RUNS" --fsdp-final "$ROOT/fsdp_ckpt/final" --out "$SUMMARY"
