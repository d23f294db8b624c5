#!/usr/bin/env bash
# Hebbian softmax on a language-model recipe, against the plain run of the same recipe.
#   bench/hebbian/run.sh DATA_DIR RECIPE [EVAL_CONFIG_JSON]
# Needs bench/out/RECIPE (the plain run, from bench/recipes/run.sh). Trains RECIPE with
# model.softmax=hebbian into bench/out/RECIPE-hebbian with the same budget in optimiser
# steps as the plain run (train.max_steps = its step count, no time limit: the recipes'
# time budget would give fewer steps to a run made on a busier machine), scores both on
# test with lstm, cache, mbpa and mbpa+cache (settings from EVAL_CONFIG_JSON, e.g. the
# `lmadapt tune` output of bench/table2/run.py, else the defaults), and writes per-bucket
# reports hebbian vs plain to bench/out/hebbian-RECIPE/.
# Env: LMADAPT_THREADS (default 2); HEBBIAN_SET extra --set flags (e.g. another gamma/T)
# with HEBBIAN_TAG a suffix for the run and report folders so that runs do not collide.
set -euo pipefail
cd "$(dirname "$0")/../.."
data_dir="$1"; recipe="$2"; config="${3:-}"
plain="bench/out/$recipe"; tag="${HEBBIAN_TAG:-}"
heb="bench/out/$recipe-hebbian$tag"; out="bench/out/hebbian-$recipe$tag"
threads="${LMADAPT_THREADS:-2}"
[ -f "$plain/results.json" ] || { echo "train the plain run first: bench/recipes/run.sh $data_dir $recipe"; exit 2; }
mkdir -p "$out"
if [ ! -f "$heb/results.json" ]; then
  steps=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['steps'])" "$plain/results.json")
  lmadapt train --recipe "$recipe" --data-dir "$data_dir" --out "$heb" --threads "$threads" \
    --set model.softmax=hebbian --set train.max_minutes=0 --set "train.max_steps=$steps" ${HEBBIAN_SET:-} \
    > "$out/train.log" 2>&1
fi
cat "$heb/results.json"
for run in "$plain" "$heb"; do
  name=$(basename "$run")
  if [ -n "$config" ]; then method=(--config "$config"); else method=(--method mbpa+cache); fi
  lmadapt eval "$run" --data-dir "$data_dir" --split test "${method[@]}" --threads "$threads" \
    --json "$out/$name-test.json" --save-tokens "$out/$name-test-tokens.pt"
done
for m in lstm lstm+cache lstm+mbpa+cache; do
  lmadapt report "$out/$recipe-test-tokens.pt" --baseline "$m" --method "$m" \
    --method-tokens "$out/$recipe-hebbian$tag-test-tokens.pt" --out "$out/buckets-$m.md"
done
