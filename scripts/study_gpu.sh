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
# ANALYZE_DEVICE: where analyze.py runs (default cuda); ANALYZE_EXTRA: more analyze.py flags (CPU smoke test).
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: study_gpu.sh parent OUT | runs OUT SEED:CONFIG ...}
out=${2:?output folder}
shift 2
logs=runs/study-logs reports=runs/study-reports  # inside runs/ (git-ignored)
mkdir -p "$out" "$logs" "$reports"
export STUDY_OVERRIDES="${STUDY_OVERRIDES:-log.wandb=disabled log.progress=false}"
deadline=${DEADLINE:-560}

case "$step" in
  parent)
    start=$(date +%s)
    bash scripts/study.sh parent > "$logs/study-parent.log" 2>&1
    rc=$?
    echo "parent: rc $rc, $(( $(date +%s) - start )) s"
    tar cf - -C runs/study-parent final | split -b 15M - "$out/parent.tar."
    tar czf "$out/parent-logs.tgz" -C runs study-logs/study-parent.log study-parent/config.yaml study-parent/metrics.jsonl ;;
  runs|ddp)
    set -m  # each run in its own process group, so the deadline can stop all of it
    names=()
    for spec in "$@"; do
      seed=${spec%%:*} config=${spec#*:}
      name=$(bash scripts/study.sh name "$seed" "$config")
      if [ "$step" = ddp ]; then
        name="$name-ddp"
        launch="--config_file configs/accelerate/ddp.yaml --main_process_port $((29500 + ${#names[@]}))"
        batch=$("${PYTHON:-python3}" -c "import yaml; print(yaml.safe_load(open('configs/study/moe-top1.yaml'))['train']['batch_size'] // 2)")
        export STUDY_LAUNCH="$launch" STUDY_EXTRA_RUN="train.batch_size=$batch log.run_name=$name"
      fi
      (start=$(date +%s); bash scripts/study.sh runs "$seed" "$config" > "$logs/$name.log" 2>&1
       echo "$name: rc $?, $(( $(date +%s) - start )) s wall") &
      names+=("$name")
    done
    # stop what outlives the deadline (SIGTERM: the trainer saves a checkpoint and exits 143)
    while [ "$(jobs -rp | wc -l)" -gt 0 ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 5; done
    for p in $(jobs -rp); do kill -TERM -- "-$p"; done
    wait
    set +m
    done_runs=()
    for n in "${names[@]}"; do [ -d "runs/$n/final" ] && done_runs+=("runs/$n"); done
    echo "finished: ${done_runs[*]:-none}"
    apids=()
    for r in "${done_runs[@]}"; do  # one analysis per run, concurrently (same eval blocks in each)
      n=$(basename "$r")
      bash scripts/study.sh analyze "$reports/$n" "$r" --device "${ANALYZE_DEVICE:-cuda}" ${ANALYZE_EXTRA:-} \
        > "$logs/analyze-$n.log" 2>&1 &
      apids+=($!)
    done
    wait "${apids[@]}" 2>/dev/null
    tar czf "$out/runs.tgz" -C runs $(for n in "${names[@]}"; do
      (cd runs && ls -d "study-logs/$n.log" "study-logs/analyze-$n.log" "study-reports/$n" \
        "$n/config.yaml" "$n/metrics.jsonl" 2>/dev/null); done) ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
