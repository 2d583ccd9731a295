#!/usr/bin/env bash
# The first research campaign (campaign/README.md, campaign 1): every command that produced the
# committed logs, in order. Each stage writes its own folder (logs/ = the trainer's logs and
# summaries, table.md, effects.json, curves.png, step_times.json); rerunning a stage reuses every
# finished run, and `--no-run` recomputes its tables from the committed summaries alone.
#
#   bash campaign/run_campaign.sh stage1     # or stage0, stage2, stage3, byte, all
#   bash campaign/run_campaign.sh stage1 --no-run
#   CAMPAIGN_OUT=/tmp/check bash campaign/run_campaign.sh stage1 --no-run   # tables elsewhere
#
# CAMPAIGN_OUT moves the tables and pictures (not the logs, which stay under campaign/); a --no-run
# there needs each stage's step_times.json copied first (tests/test_campaign.py does that).
#
# Machine of the published run: a shared 2-core CPU, torch 2.13.0+cpu. Runs go one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."

stage="${1:-all}"
shift || true
extra=("$@")
out="${CAMPAIGN_OUT:-campaign}"
# With --no-run nothing trains, so no corpus needs building (the tables come from the summaries).
building=1
for argument in "${extra[@]}"; do [[ "$argument" == "--no-run" ]] && building=0; done

# The tiny preset at 4096 tokens per step (half its default batch: twice the steps for the same
# CPU time), validation only at the end (64k tokens), no sliding-window pass: the score is the
# int6+lzma roundtrip val_bpb. Baseline budget 100 steps: see stage0_budget_curve/. SWA was on in
# the tiny preset when these stages ran (it is off there now), so it is pinned here.
common="PRESET=tiny TRAIN_BATCH_TOKENS=4096 VAL_LOSS_EVERY=0 EVAL_STRIDE=0 SWA_ENABLED=1"

# The variants of stage 1 start from w0.1_sg (JEPA_WEIGHT=0.1, stop-gradient target) and change
# one thing each; the weight sweep runs with the stop-gradient target (no second forward) and
# with an EMA target encoder (the tiny preset's TARGET_EMA_DECAY=0.99).
variant="JEPA_WEIGHT=0.1 TARGET_EMA_DECAY=0"
# Arms that later stages run again, spelled once.
target_frac="$variant JEPA_TARGET_FRACTION=0.25"
chunk4="$variant JEPA_MODE=chunk JEPA_CHUNK=4"
chunk16="$variant JEPA_MODE=chunk JEPA_CHUNK=16"
pr896="JEPA_WEIGHT=0.3 TARGET_EMA_DECAY=0.9995 ANTI_COLLAPSE=vicreg VICREG_ON=target"
stage1_arms=(
  --arm vanilla:"JEPA_WEIGHT=0"
  --arm w0.001_sg:"JEPA_WEIGHT=0.001 TARGET_EMA_DECAY=0"
  --arm w0.003_sg:"JEPA_WEIGHT=0.003 TARGET_EMA_DECAY=0"
  --arm w0.01_sg:"JEPA_WEIGHT=0.01 TARGET_EMA_DECAY=0"
  --arm w0.03_sg:"JEPA_WEIGHT=0.03 TARGET_EMA_DECAY=0"
  --arm w0.1_sg:"$variant"
  --arm w0.3_sg:"JEPA_WEIGHT=0.3 TARGET_EMA_DECAY=0"
  --arm w0.001_ema:"JEPA_WEIGHT=0.001 TARGET_EMA_DECAY=0.99"
  --arm w0.01_ema:"JEPA_WEIGHT=0.01 TARGET_EMA_DECAY=0.99"
  --arm w0.1_ema:"JEPA_WEIGHT=0.1 TARGET_EMA_DECAY=0.99"
  --arm chunk4:"$chunk4"
  --arm chunk16:"$chunk16"
  --arm horizons1248:"$variant JEPA_OFFSETS=1,2,4,8"
  --arm span:"$variant JEPA_MODE=span"
  --arm sigreg:"$variant ANTI_COLLAPSE=sigreg"
  --arm cosine:"$variant JEPA_LOSS=cosine"
  --arm curriculum0.1:"$variant JEPA_ONLY_FRACTION=0.1"
  --arm layer_mid:"$variant JEPA_LAYER=1"
  --arm grad_last1:"$variant JEPA_GRAD_LAYERS=1"
  --arm target_frac0.25:"$target_frac"
  --arm pr896:"$pr896"
)

# Stage 0: the vanilla curve that sets the budget (one run, validated every 20 steps).
run_stage0() {
  if (( building )) && [[ ! -f campaign/stage0_budget_curve/logs/curve_vanilla_b4096.json ]]; then
    env $common JEPA_WEIGHT=0 ITERATIONS=300 VAL_LOSS_EVERY=20 MAX_WALLCLOCK_SECONDS=0 \
      LOG_DIR=campaign/stage0_budget_curve/logs RUN_ID=curve_vanilla_b4096 python3 train_gpt_jepa.py
  fi
  python3 campaign/campaign_figures.py
}

run_stage1() {
  python3 scripts/ab.py "${stage1_arms[@]}" --seeds 1,2 --budget compute \
    --env "$common ITERATIONS=100 LOG_DIR=campaign/stage1_screen/logs" \
    --out "$out"/stage1_screen --keep-going "${extra[@]}"
}

# Stage 2: the three best arms of stage 1 and #896's settings, on fresh seeds (3-10: the screen's
# seeds picked the arms, so they would flatter them), step times measured over more rounds.
stage2_arms=(
  --arm vanilla:"JEPA_WEIGHT=0"
  --arm target_frac0.25:"$target_frac"
  --arm chunk16:"$chunk16"
  --arm chunk4:"$chunk4"
  --arm pr896:"$pr896"
)

run_stage2() {
  python3 scripts/ab.py "${stage2_arms[@]}" --seeds 3,4,5,6,7,8,9,10 --budget compute \
    --calibration-steps 3 --calibration-rounds 20 \
    --env "$common ITERATIONS=100 LOG_DIR=campaign/stage2_confirm/logs" \
    --out "$out"/stage2_confirm --keep-going "${extra[@]}"
}

# Stage 3: the best arm of stage 2 at three times the budget, on a second corpus (the Node.js API
# documentation, campaign/nodejs_sections.py), and per step (--budget steps).
stage3_arms=(
  --arm vanilla:"JEPA_WEIGHT=0"
  --arm target_frac0.25:"$target_frac"
)
# Per step, the variants' base (every sequence given targets) runs beside it.
steps_arms=("${stage3_arms[@]}" --arm w0.1_sg:"$variant")
nodejs="DATA_PATH=./data/datasets/local_nodejs_sp1024 TOKENIZER_PATH=./data/tokenizers/local_nodejs_sp1024_bpe.model"

run_stage3() {
  python3 scripts/ab.py "${stage3_arms[@]}" --seeds 1,2,3 --budget compute \
    --calibration-steps 3 --calibration-rounds 20 \
    --env "$common ITERATIONS=300 LOG_DIR=campaign/stage3_robustness/budget3x/logs" \
    --out "$out"/stage3_robustness/budget3x --keep-going "${extra[@]}"
  if (( building )) && [[ ! -f data/datasets/local_nodejs_sp1024/manifest.json ]]; then
    python3 campaign/nodejs_sections.py /tmp/nodejs_sections.jsonl
    python3 data/build_local_corpus.py /tmp/nodejs_sections.jsonl --name local_nodejs_sp1024
  fi
  python3 scripts/ab.py "${stage3_arms[@]}" --seeds 1,2,3 --budget compute \
    --calibration-steps 3 --calibration-rounds 20 \
    --env "$common $nodejs ITERATIONS=100 LOG_DIR=campaign/stage3_robustness/nodejs/logs" \
    --out "$out"/stage3_robustness/nodejs --keep-going "${extra[@]}"
  python3 scripts/ab.py "${steps_arms[@]}" --seeds 1,2,3,4 --budget steps \
    --env "$common ITERATIONS=100 LOG_DIR=campaign/stage3_robustness/steps/logs" \
    --out "$out"/stage3_robustness/steps --keep-going "${extra[@]}"
}

# Byte level (#832's setting): chunk JEPA against its control on the byte260 build of the local
# corpus, 512-byte sequences.
byte="DATA_PATH=./data/datasets/local_byte260 TOKENIZER_PATH=./data/tokenizers/pure_byte_260.json VOCAB_SIZE=260 TRAIN_SEQ_LEN=512"

run_byte() {
  if (( building )) && [[ ! -f data/datasets/local_byte260/manifest.json ]]; then
    python3 data/build_local_corpus.py --tokenizer byte260
  fi
  python3 scripts/ab.py --arm vanilla:"JEPA_WEIGHT=0" --arm chunk8:"$variant JEPA_MODE=chunk JEPA_CHUNK=8" --seeds 1,2,3 --budget compute \
    --calibration-steps 3 --calibration-rounds 20 \
    --env "$common $byte ITERATIONS=150 LOG_DIR=campaign/byte_level/logs" \
    --out "$out"/byte_level --keep-going "${extra[@]}"
}

main() {
  case "$stage" in
    stage0) run_stage0 ;;
    stage1) run_stage1 ;;
    stage2) run_stage2 ;;
    stage3) run_stage3 ;;
    byte) run_byte ;;
    all) run_stage0; run_stage1; run_stage2; run_byte; run_stage3 ;;
    *) echo "usage: $0 stage0|stage1|stage2|stage3|byte|all [ab.py options]" >&2; exit 2 ;;
  esac
}

# One line, read whole before it runs: editing this file during a campaign cannot change what runs.
main; exit $?
