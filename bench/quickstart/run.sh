#!/usr/bin/env bash
# The README's quick start, recorded: train on the bundled sample corpus, then score the
# trained run with mbpa+cache.
#   bench/quickstart/run.sh [RUN_DIR]          (default: runs/sample; refused if it holds a run)
# Env: PYTHON (default python), LMADAPT_THREADS (default: torch's choice).
# Writes bench/quickstart/results/{train.log,eval.log,results.json,eval.json,timing.json}.
set -euo pipefail
cd "$(dirname "$0")/../.."
run="${1:-runs/sample}"
py="${PYTHON:-python}"
res=bench/quickstart/results
threads=()
[ -z "${LMADAPT_THREADS:-}" ] || threads=(--threads "$LMADAPT_THREADS")
mkdir -p "$res"
rm -f "$res/eval.json"  # the previous record; --json refuses to overwrite
start=$(date +%s)
"$py" -m lmadapt train --out "$run" "${threads[@]}" 2>&1 | tee "$res/train.log"
mid=$(date +%s)
"$py" -m lmadapt eval "$run" --method mbpa+cache "${threads[@]}" --json "$res/eval.json" 2>&1 | tee "$res/eval.log"
end=$(date +%s)
cp "$run/results.json" "$res/results.json"
printf '{"train_wall_seconds": %d, "eval_wall_seconds": %d, "threads": "%s"}\n' \
  $((mid - start)) $((end - mid)) "${LMADAPT_THREADS:-default}" > "$res/timing.json"
