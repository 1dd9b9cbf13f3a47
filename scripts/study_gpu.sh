#!/usr/bin/env bash
# How docs/results.md was produced: the study (scripts/study.sh) in slices that each fit one GPU command of
# <= 10 minutes, on a machine that starts bare every time. Several fine-tuning runs share one GPU at once:
# this model (6 blocks, d=384) leaves a GPU mostly idle, each process being bound by its own kernel launches.
#   bash scripts/study_gpu.sh parent OUT               # train runs/study-parent, pack final/ into OUT/parent.tar.*
#   bash scripts/study_gpu.sh runs OUT SEED:CONFIG ...   # fine-tune concurrently, analyze, pack small files into OUT
#   bash scripts/study_gpu.sh ddp OUT SEED:CONFIG ...    # the same with 2 processes (DDP, 2 GPUs) per run, each with
#                                                      # half the per-process batch (same global batch): micro vs
#                                                      # global balance scope only differ with several processes
# Needs runs/study-parent/final for `runs` (unpack: cat parent.tar.* | tar xf - -C runs/study-parent).
# DEADLINE (seconds since the start of this script, default 560): runs still going then are stopped.
# ANALYZE_DEVICE: where analyze.py runs (default cuda); ANALYZE_EXTRA: more analyze.py flags (CPU smoke test);
# ANALYZE_JOBS: analyses at a time (default 8; each holds a few GB of GPU memory and one or two CPU cores).
# STUDY_GPUS: how many GPUs the single-process runs and analyses of `runs` are spread over, round robin through
# CUDA_VISIBLE_DEVICES (default: every GPU nvidia-smi lists, else 1); `ddp` runs use the first two.
# STUDY_MPS=1: run NVIDIA's MPS daemon for this call (started first, stopped at the end), so the kernels of the
# concurrent runs share the GPU instead of taking turns (2026-12-01, one H200: 14 runs at once, 116-177 s each).
# OUT gets parent.tar.* and runs.tgz.* (pieces of 15 MB: unpack with cat runs.tgz.* | tar xzf - -C runs); runs.tgz
# holds this call's logs, the run records written in this call and a report only for a run trained to the end and
# analysed in this call (OUT must not hold pieces of an earlier call; a relative OUT is taken from the repository
# root, where the script runs), and the exit status is 1 when any
# run was not. Bad input (step, OUT, SEED:CONFIG, the variables above) is one error line, exit 2, before anything.
set -uo pipefail
cd "$(dirname "$0")/.."
error() { echo "study_gpu.sh: error: $*" >&2; exit 2; }
step=${1:-}
case "$step" in parent|runs|ddp) ;; *) error "step '$step': one of parent, runs, ddp (then OUT, then SEED:CONFIG ... for runs and ddp)" ;; esac
out=${2:-}
[ -n "$out" ] || error "$step needs an output folder OUT"
[ ! -e "$out" ] || [ -d "$out" ] || error "OUT '$out' is not a folder"
! compgen -G "$out/runs.tgz.*" > /dev/null && ! compgen -G "$out/parent.tar.*" > /dev/null \
  || error "OUT '$out' already holds runs.tgz.* or parent.tar.* pieces of an earlier call; give a new folder"
shift 2
logs=runs/study-logs reports=runs/study-reports  # inside runs/ (git-ignored)
export STUDY_OVERRIDES="${STUDY_OVERRIDES:-log.wandb=disabled log.progress=false}"
deadline=${DEADLINE:-560}
[[ "$deadline" =~ ^[1-9][0-9]{0,5}$ ]] || error "DEADLINE '$deadline': seconds, a whole number from 1 to 999999"
if [ -n "${STUDY_GPUS:-}" ]; then
  [[ "$STUDY_GPUS" =~ ^[1-9][0-9]?$ ]] || error "STUDY_GPUS '$STUDY_GPUS': the number of GPUs, 1 to 99"
  ngpu=$STUDY_GPUS
else
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$ngpu" =~ ^[1-9][0-9]*$ ]] || ngpu=1
fi
jobs=${ANALYZE_JOBS:-8}
[[ "$jobs" =~ ^[1-9][0-9]?$ ]] || error "ANALYZE_JOBS '$jobs': analyses at a time, 1 to 99"
case "${STUDY_MPS:-0}" in 0|1) ;; *) error "STUDY_MPS '${STUDY_MPS}': 1 (run the MPS daemon) or 0" ;; esac
names=() seeds=() configs=()
if [ "$step" != parent ]; then  # every SEED:CONFIG checked (and named) before anything starts
  [ $# -gt 0 ] || error "$step needs at least one SEED:CONFIG (e.g. 0:moe-top1)"
  for spec in "$@"; do
    [[ "$spec" == *:* ]] || error "'$spec' is not SEED:CONFIG (e.g. 0:moe-top1)"
    name=$(bash scripts/study.sh name "${spec%%:*}" "${spec#*:}") || exit 2
    [ "$step" = ddp ] && name="$name-ddp"
    [ "$step" = ddp ] || [ "${spec#*:}" != micro ] || error "'$spec': micro differs only with several processes; run it with the ddp step"
    [[ " ${names[*]} " != *" $name "* ]] || error "'$spec' is given twice"
    names+=("$name") seeds+=("${spec%%:*}") configs+=("${spec#*:}")
  done
fi
if [ "${STUDY_MPS:-0}" = 1 ]; then
  command -v nvidia-cuda-mps-control > /dev/null || error "STUDY_MPS=1 but nvidia-cuda-mps-control is not on PATH"
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps-pipe} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps-log}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d || { echo "study_gpu.sh: the MPS daemon did not start" >&2; exit 1; }
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
mkdir -p "$out" "$logs" "$reports"

case "$step" in
  parent)
    start=$(date +%s)
    bash scripts/study.sh parent > "$logs/study-parent.log" 2>&1
    rc=$?
    echo "parent: rc $rc, $(( $(date +%s) - start )) s"
    if [ "$rc" != 0 ]; then tail -n 40 "$logs/study-parent.log"; exit 1; fi
    tar cf - -C runs/study-parent final | split -b 15M - "$out/parent.tar."
    tar czf "$out/parent-logs.tgz" -C runs study-logs/study-parent.log study-parent/config.yaml study-parent/metrics.jsonl ;;
  runs|ddp)
    stamp=$(mktemp "$logs/.call.XXXXXX")  # a final/ older than this was not written by this call
    [ "$step" = ddp ] && batch=$("${PYTHON:-python3}" -c "import yaml; print(yaml.safe_load(open('configs/study/moe-top1.yaml'))['train']['batch_size'] // 2)")
    set -m  # each run in its own process group, so the deadline can stop all of it
    for i in "${!names[@]}"; do
      name=${names[$i]}
      if [ "$step" = ddp ]; then
        launch="--config_file configs/accelerate/ddp.yaml --main_process_port $((29500 + i))"
        export STUDY_LAUNCH="$launch" STUDY_EXTRA_RUN="train.batch_size=$batch log.run_name=$name"
        gpu=${CUDA_VISIBLE_DEVICES:-0,1}
      else
        gpu=$(( i % ngpu ))
      fi
      rm -f "$logs/$name.rc" "$logs/analyze-$name.rc"  # this call's markers: what is packed below
      (start=$(date +%s)
       CUDA_VISIBLE_DEVICES=$gpu bash scripts/study.sh runs "${seeds[$i]}" "${configs[$i]}" > "$logs/$name.log" 2>&1
       rc=$?; echo "$rc" > "$logs/$name.rc"; echo "$name: rc $rc, $(( $(date +%s) - start )) s wall") &
    done
    # stop what outlives the deadline (SIGTERM: the trainer saves a checkpoint and exits 143)
    while [ "$(jobs -rp | wc -l)" -gt 0 ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 5; done
    for p in $(jobs -rp); do kill -TERM -- "-$p"; done
    wait
    set +m
    done_runs=()
    for n in "${names[@]}"; do  # trained to the end in this call: rc 0 and a final/ newer than the call's start
      if [ "$(cat "$logs/$n.rc" 2>/dev/null)" = 0 ] && [ -d "runs/$n/final" ] && [ "runs/$n/final" -nt "$stamp" ]; then
        done_runs+=("runs/$n")
      else echo "$n: not trained to the end in this call, not analysed (its log: $logs/$n.log)"; fi
    done
    echo "finished: ${done_runs[*]:-none}"
    apids=() analysed=()
    for r in "${done_runs[@]}"; do  # one analysis per run, ANALYZE_JOBS at a time (same eval blocks in each)
      while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
      n=$(basename "$r")
      (start=$(date +%s)
       CUDA_VISIBLE_DEVICES=$(( ${#apids[@]} % ngpu )) OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
         bash scripts/study.sh analyze "$reports/$n" "$r" --device "${ANALYZE_DEVICE:-cuda}" --no-progress \
         ${ANALYZE_EXTRA:-} > "$logs/analyze-$n.log" 2>&1
       rc=$?; echo "$rc" > "$logs/analyze-$n.rc"; echo "analyze $n: rc $rc, $(( $(date +%s) - start )) s wall") &
      apids+=($!)
    done
    [ ${#apids[@]} -eq 0 ] || wait "${apids[@]}"
    pack=()  # this call's logs and run records; a report (and its log) only from an analysis made in this call
    for n in "${names[@]}"; do
      pack+=("study-logs/$n.log")
      for f in "$n/config.yaml" "$n/metrics.jsonl"; do [ "runs/$f" -nt "$stamp" ] && pack+=("$f"); done
      [ -f "$logs/analyze-$n.rc" ] && pack+=("study-logs/analyze-$n.log")
      if [ "$(cat "$logs/analyze-$n.rc" 2>/dev/null)" = 0 ]; then analysed+=("$n"); pack+=("study-reports/$n"); fi
    done
    tar czf - -C runs "${pack[@]}" | split -b 15M - "$out/runs.tgz."
    rm -f "$stamp"
    echo "analysed: ${analysed[*]:-none} (${#analysed[@]} of ${#names[@]} runs)"
    [ ${#analysed[@]} -eq ${#names[@]} ] || exit 1 ;;
esac
