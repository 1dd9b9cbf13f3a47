#!/usr/bin/env bash
# The specialisation study (issues 10, 21), in steps that each fit one GPU command:
#   bash scripts/study.sh parent                  # pretrain runs/study-parent (dense, local corpus)
#   bash scripts/study.sh runs SEEDS [CONFIG...]  # fine-tune the study configs from the parent, once per seed
#   bash scripts/study.sh analyze REPORT RUN...   # analyze.py over runs on the same eval blocks (more flags after)
#   bash scripts/study.sh name SEED CONFIG        # print the run name `runs SEED CONFIG` uses
#   bash scripts/study.sh plan                    # print the planned SEED:CONFIG runs (for study_gpu.sh runs)
# SEEDS: one seed (3), a range (0-5) or a comma list (0,2,7). Configs live in configs/study/; every run
# differs from moe-top1.yaml only in the keys its file names. The plan (docs/analysis.md, "The study's
# design"): STUDY_SEEDS_MAIN seeds (default 6) of moe-top1 and dense, STUDY_SEEDS_OTHER (default 3) of every
# other single-process config; micro needs several processes (study_gpu.sh ddp).
# Extra key=value overrides for every run can be given in STUDY_OVERRIDES (e.g. a CPU smoke test),
# accelerate launch options in STUDY_LAUNCH; STUDY_DRY_RUN=1 prints each training command instead.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=(moe-top1 dense no-balance no-lb no-noise moe-top2 drop-init micro)
read -r -a EXTRA <<< "${STUDY_OVERRIDES:-}"
read -r -a LAUNCH <<< "${STUDY_LAUNCH:-}"     # accelerate launch options (e.g. --config_file ...)
read -r -a RUN_EXTRA <<< "${STUDY_EXTRA_RUN:-}"  # overrides applied after the run's own (e.g. its name)
error() { echo "study.sh: error: $*" >&2; exit 2; }
SEED_RE='(0|[1-9][0-9]{0,8})'  # a seed: 0 to 999999999, no leading zeros
# the project's Python: PYTHON, else the checkout's .venv (made by scripts/setup.sh), else python3 (the GPU
# machine's image has no venv); accelerate is launched through it, so no PATH setup is needed
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
command -v "$PY" > /dev/null || error "no Python at '$PY' (set PYTHON, or run scripts/setup.sh)"
train() {
  if [ "${STUDY_DRY_RUN:-0}" = 1 ]; then echo "$PY -m accelerate.commands.launch ${LAUNCH[*]} scripts/train.py $* ${EXTRA[*]}"
  else "$PY" -m accelerate.commands.launch "${LAUNCH[@]}" scripts/train.py "$@" "${EXTRA[@]}"; fi
}
check_config() {  # an arm of the study: one of ALL, with its file
  [[ " ${ALL[*]} " == *" $1 "* && -f "configs/study/$1.yaml" ]] \
    || error "no study arm '$1' (configs/study/$1.yaml); choose from ${ALL[*]}"
}
run_name() {  # run_name SEED CONFIG: the config's log.run_name with the seed
  [[ "$1" =~ ^$SEED_RE$ ]] || error "seed '$1' is not a whole number from 0 to 999999999 (no leading zeros)"
  check_config "$2"
  local name
  name=$("$PY" -c "import yaml; print(yaml.safe_load(open('configs/study/$2.yaml'))['log']['run_name'])") \
    || error "could not read log.run_name from configs/study/$2.yaml"
  [ -n "$name" ] || error "configs/study/$2.yaml has no log.run_name"
  echo "$name-s$1"
}
seed_list() {  # seed_list SEEDS: "3" -> 3, "0-5" -> 0 1 2 3 4 5, "0,2,7" -> 0 2 7
  local part parts out=()
  IFS=, read -r -a parts <<< "$1"
  [ ${#parts[@]} -gt 0 ] || error "no seeds given: SEEDS is one seed (3), a range (0-5) or a comma list (0,2,7)"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^$SEED_RE-$SEED_RE$ ]]; then
      [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ] || error "seed range '$part' is empty (write A-B with A <= B)"
      [ $(( BASH_REMATCH[2] - BASH_REMATCH[1] )) -lt 1000 ] || error "seed range '$part' has more than 1000 seeds"
      out+=($(seq "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"))
    elif [[ $part =~ ^$SEED_RE$ ]]; then
      out+=("$part")
    else
      error "seeds '$1': SEEDS is one seed (3), a range (0-5) or a comma list (0,2,7) of seeds 0 to 999999999 (no leading zeros)"
    fi
  done
  echo "${out[@]}"
}
case "${1:?usage: study.sh parent | runs SEEDS [CONFIG...] | analyze REPORT RUN... | name SEED CONFIG | plan}" in
  parent)
    train --config configs/study/parent.yaml ;;
  runs)
    [ $# -ge 2 ] || error "runs needs SEEDS (one seed, a range A-B or a list A,B,C), then optional arms"
    seed_str=$(seed_list "$2"); shift 2
    read -r -a seeds <<< "$seed_str"
    configs=("$@"); [ ${#configs[@]} -gt 0 ] || configs=("${ALL[@]}")
    for c in "${configs[@]}"; do check_config "$c"; done  # every name checked before any run starts
    for seed in "${seeds[@]}"; do
      for c in "${configs[@]}"; do
        file="configs/study/$c.yaml"
        set_seeds=("train.seed=$seed")
        grep -q "^  moe: null" "$file" || set_seeds+=("model.moe.seed=$seed")  # expert init and router seed
        train --config "$file" "${set_seeds[@]}" "log.run_name=$(run_name "$seed" "$c")" "${RUN_EXTRA[@]}"
      done
    done ;;
  analyze)
    report=${2:?report folder}; shift 2
    "$PY" scripts/analyze.py --out "$report" --max-blocks 0 --bootstrap 1000 --permutations 1000 --batch-size 32 "$@" ;;
  name)
    [ -n "${2:-}" ] && [ -n "${3:-}" ] || error "name needs SEED and CONFIG (e.g. name 0 moe-top1)"
    run_name "$2" "$3" ;;
  plan)
    for v in STUDY_SEEDS_MAIN STUDY_SEEDS_OTHER; do
      [ -z "${!v:-}" ] || [[ "${!v}" =~ ^[1-9][0-9]{0,2}$ ]] || error "$v '${!v}' is not a whole number from 1 to 999 (seeds per arm)"
    done
    for c in "${ALL[@]}"; do
      [ "$c" = micro ] && continue
      case "$c" in moe-top1|dense) n=${STUDY_SEEDS_MAIN:-6} ;; *) n=${STUDY_SEEDS_OTHER:-3} ;; esac
      for ((s = 0; s < n; s++)); do echo "$s:$c"; done
    done ;;
  *) error "unknown step '$1' (parent, runs, analyze, name or plan)" ;;
esac
