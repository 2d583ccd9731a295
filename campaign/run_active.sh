#!/usr/bin/env bash
# The second campaign, "JEPA in the regime where it acts" (campaign/README.md): every command that
# produced the committed logs of campaign/active/, in order. The first campaign (run_campaign.sh)
# measured JEPA where its term was ~1% of the backbone's gradient; here its strength is set by that
# share (JEPA_GRAD_SHARE), which every train line and summary reports (jepa_grad_share).
#
#   bash campaign/run_active.sh dose            # or pull, compute, datacurve, all
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
best_dose_arms() {
  python3 - "$out/dose/effects.json" <<'PYEOF'
import json, sys
effects = json.load(open(sys.argv[1]))
for arm in sorted(effects["arms"], key=lambda arm: arm["difference"])[:2]:
    print(f"{arm['arm']}:{arm['settings']}")
PYEOF
}

run_compute() {
  local dose_choice arms
  mapfile -t dose_choice < <(best_dose_arms)
  (( ${#dose_choice[@]} == 2 )) || { echo "stage b needs stage a's effects.json (run: $0 dose)" >&2; exit 1; }
  arms=(--arm vanilla:"JEPA_WEIGHT=0")
  for arm in "${dose_choice[@]}"; do arms+=(--arm "$arm"); done
  arms+=(--arm nextlat:"JEPA_MODE=nextlat JEPA_WEIGHT=1" --arm stp:"JEPA_MODE=stp JEPA_WEIGHT=0.02")
  python3 scripts/ab.py "${arms[@]}" --seeds 11,12,13,14,15,16,17,18 --budget compute \
    --calibration-steps 3 --calibration-rounds 20 \
    --env "$common ITERATIONS=100 LOG_DIR=campaign/active/compute/logs" \
    --out "$out"/compute --keep-going "${extra[@]}"
}

# Stage c0: the data-limited regime's vanilla curve (one run, validated every 20 steps): the first
# 65,536 training tokens, 200 steps of 4,096 tokens = 12.5 epochs.
limited="TRAIN_MAX_TOKENS=65536 ITERATIONS=200"

run_datacurve() {
  if (( building )) && [[ ! -f campaign/active/data_curve/logs/curve_vanilla_limited.json ]]; then
    env $common $limited JEPA_WEIGHT=0 VAL_LOSS_EVERY=20 MAX_WALLCLOCK_SECONDS=0 \
      LOG_DIR=campaign/active/data_curve/logs RUN_ID=curve_vanilla_limited python3 train_gpt_jepa.py
  fi
}

main() {
  case "$stage" in
    dose) run_dose ;;
    pull) run_pull ;;
    compute) run_compute ;;
    datacurve) run_datacurve ;;
    all) run_dose; run_pull; run_compute; run_datacurve ;;
    *) echo "usage: $0 dose|pull|compute|datacurve|all [ab.py options]" >&2; exit 2 ;;
  esac
}

# One line, read whole before it runs: editing this file during a campaign cannot change what runs.
main; exit
