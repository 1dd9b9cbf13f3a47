#!/usr/bin/env bash
# The specialisation study (issue 10), in steps that each fit one GPU command:
#   bash scripts/study.sh parent                 # pretrain runs/study-parent (dense, local corpus)
#   bash scripts/study.sh runs SEED [CONFIG...]  # fine-tune the study configs from the parent with a seed
#   bash scripts/study.sh analyze REPORT RUN...  # analyze.py over runs on the same eval blocks (more flags after)
#   bash scripts/study.sh name SEED CONFIG       # print the run name `runs SEED CONFIG` uses
# Configs live in configs/study/; every run differs from moe-top1.yaml only in the keys its file names.
# Extra key=value overrides for every run can be given in STUDY_OVERRIDES (e.g. a CPU smoke test),
# accelerate launch options in STUDY_LAUNCH.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=(moe-top1 dense no-balance moe-top2 drop-init micro)
read -r -a EXTRA <<< "${STUDY_OVERRIDES:-}"
read -r -a LAUNCH <<< "${STUDY_LAUNCH:-}"     # accelerate launch options (e.g. --config_file ...)
read -r -a RUN_EXTRA <<< "${STUDY_EXTRA_RUN:-}"  # overrides applied after the run's own (e.g. its name)
train() { accelerate launch "${LAUNCH[@]}" scripts/train.py "$@" "${EXTRA[@]}"; }
run_name() {  # run_name SEED CONFIG: the config's log.run_name with the seed
  echo "$(python -c "import yaml; print(yaml.safe_load(open('configs/study/$2.yaml'))['log']['run_name'])")-s$1"
}
case "${1:?usage: study.sh parent | runs SEED [CONFIG...] | analyze REPORT RUN... | name SEED CONFIG}" in
  parent)
    train --config configs/study/parent.yaml ;;
  runs)
    seed=${2:?seed}; shift 2
    configs=("$@"); [ ${#configs[@]} -gt 0 ] || configs=("${ALL[@]}")
    for c in "${configs[@]}"; do
      file="configs/study/$c.yaml"
      seeds=("train.seed=$seed")
      grep -q "^  moe: null" "$file" || seeds+=("model.moe.seed=$seed")  # expert init and router seed
      train --config "$file" "${seeds[@]}" "log.run_name=$(run_name "$seed" "$c")" "${RUN_EXTRA[@]}"
    done ;;
  analyze)
    report=${2:?report folder}; shift 2
    python scripts/analyze.py --out "$report" --max-blocks 0 --bootstrap 1000 "$@" ;;
  name)
    run_name "${2:?seed}" "${3:?config}" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
