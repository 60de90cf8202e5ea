#!/usr/bin/env bash
# The SmolLM2 study's 50-token prompts, run with the CLI beside eval/smollm2_study.py (which runs
# the 10-token ones): the same recipe as recipes/smollm2-study.yaml with 50 virtual tokens, on
# Wanda-50% + NF4, Wanda-2:4 + NF4 and the dense model, each scored on the first 128 windows of
# 256 tokens of the embedded test split. Needs the study's compressed models (run
# eval/smollm2_study.py first). 31 minutes on 2 cores. Outputs (JSON, as ctp prints them) go to
# eval/results/smollm2_p50/, each written only when its command succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${STUDY:-ctp-smollm2-study}
WORK=$STUDY/extra
OUT=eval/results/smollm2_p50
for target in wanda-50pct+nf4 wanda-2of4+nf4; do
  [ -f "$STUDY/models/$target/ctp_compression.json" ] || {
    echo "smollm2_p50.sh: $STUDY/models/$target is missing: run python eval/smollm2_study.py first" >&2; exit 2; }
done
mkdir -p "$WORK" "$OUT"
trap 'rm -f "$OUT"/*.tmp' EXIT
keep() { ctp "$@" > "$OUT/$FILE.tmp" && mv "$OUT/$FILE.tmp" "$OUT/$FILE"; }
CFG=(--num-virtual-tokens 50 --init vocab --data embedded --steps 200 --lr 0.01 --warmup-steps 20
     --seqlen 128 --batch-size 4 --eval-every 40 --eval-windows 32 --save-every 40 --seed 0
     --device cpu --no-progress --json)
EVAL=(--ppl embedded --seqlen 256 --max-windows 128 --batch-size 8 --device cpu --no-progress --json)
for pair in "wanda-50pct+nf4:$STUDY/models/wanda-50pct+nf4" "wanda-2of4+nf4:$STUDY/models/wanda-2of4+nf4" \
            "dense:smollm2-135m"; do
  name=${pair%%:*}; model=${pair#*:}
  if [ ! -d "$WORK/p50-$name" ]; then
    FILE=tune-p50-$name.json keep tune-prompt "$model" --out "$WORK/p50-$name" "${CFG[@]}"
  fi
  FILE=eval-p50-$name.json keep eval "$model" --prompt "$WORK/p50-$name" "${EVAL[@]}"
done
