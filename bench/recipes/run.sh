#!/usr/bin/env bash
# Train the CPU recipes against the real corpora and print their results.
#   bench/recipes/run.sh [DATA_DIR] [RECIPE ...]      (default: ../shared/data ptb-cpu wt2-cpu)
# Each run goes to bench/out/RECIPE (refused if it already finished; delete it to re-run).
set -euo pipefail
cd "$(dirname "$0")/../.."
data_dir="${1:-../shared/data}"
shift || true
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(ptb-cpu wt2-cpu)
for recipe in "${recipes[@]}"; do
  out="bench/out/$recipe"
  echo "== $recipe -> $out"
  mkdir -p bench/out
  /usr/bin/time -v lmadapt train --recipe "$recipe" --data-dir "$data_dir" --out "$out" --threads "${LMADAPT_THREADS:-2}" \
    > "bench/out/$recipe.log" 2>&1 || { tail -5 "bench/out/$recipe.log"; exit 1; }
  grep -E "valid ppl|Maximum resident|Elapsed" "bench/out/$recipe.log"
  cat "$out/results.json"
done
