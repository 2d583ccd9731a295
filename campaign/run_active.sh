#!/usr/bin/env bash
# The second campaign, "JEPA in the regime where it acts" (campaign/README.md): every command that
# produced the committed logs of campaign/active/, in order. The first campaign (run_campaign.sh)
# measured JEPA where its term was ~1% of the backbone's gradient; here its strength is set by that
# share (JEPA_GRAD_SHARE), which every train line and summary reports (jepa_grad_share).
#
#   bash campaign/run_active.sh dose            # or pull, compute, datacurve, tune, limited, long, all
#   bash campaign/run_active.sh dose --no-run   # the tables again from the committed summaries
#   CAMPAIGN_OUT=/tmp/check bash campaign/run_active.sh dose --no-run
#
# Machine of the published run: a shared 2-core CPU, torch 2.13.0+cpu. Runs go one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."

stage="${1:-all}"
shift || true
extra=("$@")
# With --no-run nothing trains (the tables come from the summaries).
building=1
for argument in "${extra[@]}"; do [[ "$argument" == "--no-run" ]] && building=0; done
out="${CAMPAIGN_OUT:-campaign}/active"
# A stage that picks its arms from an earlier stage reads that stage's committed results, also
# when --no-run writes the tables elsewhere.
committed=campaign/active

# The first campaign's protocol (tiny preset, 4096 tokens per step, 100 steps, validation only at
# the end, the int6 roundtrip val_bpb as the score) with SWA off (the tiny preset's default now;
# pinned) and a train line every 5 steps, where the pull is measured and JEPA_GRAD_SHARE steers.
common="PRESET=tiny TRAIN_BATCH_TOKENS=4096 VAL_LOSS_EVERY=0 EVAL_STRIDE=0 SWA_ENABLED=0 TRAIN_LOG_EVERY=5"
# The JEPA base: next mode with a stop-gradient target (no second forward), the weight starting
# at 0.1 and steered to the share; the ramp (JEPA_WARMUP_STEPS=20) and the anneal stay on unless
# an arm says otherwise, so a run's mean share is below its nominal one (the tables show both).
base="JEPA_WEIGHT=0.1 TARGET_EMA_DECAY=0"

# Stage a: dose-response per step (--budget steps, stated as such): the nominal share from 0.03 to
# 3, constant strength (no ramp, no anneal), and VICReg on the predictor side (a path to the backbone).
dose_arms=(
  --arm vanilla:"JEPA_WEIGHT=0"
  --arm share0.03:"$base JEPA_GRAD_SHARE=0.03"
  --arm share0.1:"$base JEPA_GRAD_SHARE=0.1"
  --arm share0.3:"$base JEPA_GRAD_SHARE=0.3"
  --arm share1:"$base JEPA_GRAD_SHARE=1"
  --arm share3:"$base JEPA_GRAD_SHARE=3"
  --arm const0.3:"$base JEPA_GRAD_SHARE=0.3 JEPA_ANNEAL=0 JEPA_WARMUP_STEPS=0"
  --arm const1:"$base JEPA_GRAD_SHARE=1 JEPA_ANNEAL=0 JEPA_WARMUP_STEPS=0"
  --arm path1:"$base JEPA_GRAD_SHARE=1 VICREG_ON=pred"
)

run_dose() {
  python3 scripts/ab.py "${dose_arms[@]}" --seeds 1,2,3,4 --budget steps \
    --env "$common ITERATIONS=100 LOG_DIR=campaign/active/dose/logs" \
    --out "$out"/dose --keep-going "${extra[@]}"
}

# The pull of the first campaign's modes at their default weight, per step: next, span and chunk
# as the tiny preset sets them (JEPA_WEIGHT=0.1, EMA target 0.99). A measurement of the share
# they exert, so next is the baseline (stage b measures nextlat and stp against vanilla).
pull_arms=(
  --arm next:"JEPA_MODE=next"
  --arm span:"JEPA_MODE=span"
  --arm chunk:"JEPA_MODE=chunk"
)

run_pull() {
  python3 scripts/ab.py "${pull_arms[@]}" --baseline next --seeds 1,2,3 --budget steps \
    --env "$common ITERATIONS=100 LOG_DIR=campaign/active/pull/logs" \
    --out "$out"/pull --keep-going "${extra[@]}"
}

# Stage b: equal compute (--budget compute), 8 new seeds. The rule, fixed before stage a ran: the
# two JEPA arms of stage a with the lowest mean paired difference against vanilla (read from its
# effects.json, whatever they are), nextlat at the paper's weight 1 and stp at 0.02 (inside the
# paper's 0.005-0.04), against vanilla. Step times measured in one process, 3 steps x 20 rounds.
# best_arms EFFECTS_JSON COUNT: the COUNT candidate arms with the lowest mean paired difference.
best_arms() {
  python3 - "$1" "$2" <<'PYEOF'
import json, sys
effects = json.load(open(sys.argv[1]))
for arm in sorted(effects["arms"], key=lambda arm: arm["difference"])[:int(sys.argv[2])]:
    print(f"{arm['arm']}:{arm['settings']}")
PYEOF
}

run_compute() {
  local dose_choice arms
  mapfile -t dose_choice < <(best_arms "$committed/dose/effects.json" 2)
  (( ${#dose_choice[@]} == 2 )) || { echo "stage b needs stage a's effects.json (run: $0 dose)" >&2; exit 1; }
  arms=(--arm vanilla:"JEPA_WEIGHT=0")
  for arm in "${dose_choice[@]}"; do arms+=(--arm "$arm"); done
  arms+=(--arm nextlat:"JEPA_MODE=nextlat JEPA_WEIGHT=1" --arm stp:"JEPA_MODE=stp JEPA_WEIGHT=0.02")
  python3 scripts/ab.py "${arms[@]}" --seeds 11,12,13,14,15,16,17,18 --budget compute \
    --calibration-steps 3 --calibration-rounds 20 \
    --env "$common ITERATIONS=100 LOG_DIR=campaign/active/compute/logs" \
    --out "$out"/compute --keep-going "${extra[@]}"
}

# Stage c: the data-limited regime (--budget steps, stated as such). The first 32,768 training
# tokens, read over and over: 100 steps of 4,096 tokens = 12.5 epochs, the same 100 steps as
# stage a, so a run costs what a stage-a run costs.
limited="TRAIN_MAX_TOKENS=32768 ITERATIONS=100"

# c0: vanilla's validation curve in that regime (one run, validated every 10 steps), to see it
# bend up, and the same run on all the data beside it.
run_datacurve() {
  local name settings
  for name in limited full; do
    settings="$limited"
    [[ "$name" == full ]] && settings="ITERATIONS=100"
    if (( building )) && [[ ! -f campaign/active/data_curve/logs/curve_vanilla_$name.json ]]; then
      env $common $settings JEPA_WEIGHT=0 VAL_LOSS_EVERY=10 MAX_WALLCLOCK_SECONDS=0 SEED=1 \
        LOG_DIR=campaign/active/data_curve/logs RUN_ID=curve_vanilla_$name python3 train_gpt_jepa.py
    fi
  done
}

# c1: the schedule tuned for vanilla first, so JEPA is not credited for fixing a bad one: vanilla
# at its default (MATRIX_LR=0.04, warmdown over the last 60 steps), half and double the Muon LR,
# and the warmdown over all 100 steps, on seeds of its own (101, 102) that stage c never reuses.
tune_arms=(
  --arm default:"JEPA_WEIGHT=0"
  --arm lr0.02:"JEPA_WEIGHT=0 MATRIX_LR=0.02"
  --arm lr0.08:"JEPA_WEIGHT=0 MATRIX_LR=0.08"
  --arm warmdown100:"JEPA_WEIGHT=0 WARMDOWN_ITERS=100"
)

run_tune() {
  python3 scripts/ab.py "${tune_arms[@]}" --baseline default --seeds 101,102 --budget steps \
    --env "$common $limited LOG_DIR=campaign/active/limited_tune/logs" \
    --out "$out"/limited_tune --keep-going "${extra[@]}"
}

# The rule, fixed before stage b ran: the JEPA arms of stage b with the lowest mean paired
# difference against vanilla (best_arms on its effects.json).
# The tuned schedule: the arm of c1 with the lowest mean roundtrip val_bpb (default included).
tuned_schedule() {
  python3 - "$committed/limited_tune/plan.json" "$committed/limited_tune/logs" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
plan = json.load(open(sys.argv[1]))
scores = {}
for run in plan["runs"]:
    summary = json.loads((Path(sys.argv[2]) / f"{run['run_id']}.json").read_text())
    scores.setdefault(run["arm"], []).append(summary["roundtrip_val_bpb"])
best = min(scores, key=lambda arm: statistics.mean(scores[arm]))
settings = next(arm["settings"] for arm in plan["arms"] if arm["name"] == best)
print(" ".join(f"{key}={value}" for key, value in settings.items() if key != "JEPA_WEIGHT"))
PYEOF
}

# c2: vanilla and the two best arms of stage b, 8 paired seeds, at the default schedule;
# c3: vanilla and the best of them at the tuned schedule, the same 8 seeds.
run_limited() {
  local choice arms schedule
  mapfile -t choice < <(best_arms "$committed/compute/effects.json" 2)
  (( ${#choice[@]} == 2 )) || { echo "stage c needs stage b's effects.json (run: $0 compute)" >&2; exit 1; }
  [[ -f "$committed/limited_tune/plan.json" ]] || { echo "stage c needs the tuning (run: $0 tune)" >&2; exit 1; }
  arms=(--arm vanilla:"JEPA_WEIGHT=0")
  for arm in "${choice[@]}"; do arms+=(--arm "$arm"); done
  python3 scripts/ab.py "${arms[@]}" --seeds 21,22,23,24,25,26,27,28 --budget steps \
    --env "$common $limited LOG_DIR=campaign/active/limited/logs" \
    --out "$out"/limited --keep-going "${extra[@]}"
  schedule="$(tuned_schedule)"
  python3 scripts/ab.py --arm vanilla:"JEPA_WEIGHT=0" --arm "${choice[0]}" --seeds 21,22,23,24,25,26,27,28 \
    --budget steps --env "$common $limited $schedule LOG_DIR=campaign/active/limited_tuned/logs" \
    --out "$out"/limited_tuned --keep-going "${extra[@]}"
}

# Stage d: the best arm of stage b at 5x the first campaign's stage-1 budget (500 steps for
# vanilla), equal compute, seeds 31-33: does its gap shrink or flip with a longer run?
run_long() {
  local choice
  mapfile -t choice < <(best_arms "$committed/compute/effects.json" 1)
  (( ${#choice[@]} == 1 )) || { echo "stage d needs stage b's effects.json (run: $0 compute)" >&2; exit 1; }
  python3 scripts/ab.py --arm vanilla:"JEPA_WEIGHT=0" --arm "${choice[0]}" --seeds 31,32,33 --budget compute \
    --calibration-steps 3 --calibration-rounds 20 \
    --env "$common ITERATIONS=500 LOG_DIR=campaign/active/long/logs" \
    --out "$out"/long --keep-going "${extra[@]}"
}

main() {
  case "$stage" in
    dose) run_dose ;;
    pull) run_pull ;;
    compute) run_compute ;;
    datacurve) run_datacurve ;;
    tune) run_tune ;;
    limited) run_limited ;;
    long) run_long ;;
    all) run_dose; run_pull; run_compute; run_datacurve; run_tune; run_limited; run_long ;;
    *) echo "usage: $0 dose|pull|compute|datacurve|tune|limited|long|all [ab.py options]" >&2; exit 2 ;;
  esac
}

# One line, read whole before it runs: editing this file during a campaign cannot change what runs.
main; exit
