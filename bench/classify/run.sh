#!/usr/bin/env bash
# The MbPA paper's MNIST experiments and the Hebbian-softmax class curriculum, full size.
#   bench/classify/run.sh [DATA_DIR] [EXPERIMENT ...]
# EXPERIMENT: permuted incremental unbalanced curriculum (default: all four).
# Outputs go to bench/out/classify-EXPERIMENT (refused if already there; delete to re-run).
set -euo pipefail
cd "$(dirname "$0")/../.."
data_dir="${1:-../shared/data}"
shift || true
exps=("$@")
[ ${#exps[@]} -gt 0 ] || exps=(permuted incremental unbalanced curriculum)
threads="${LMADAPT_THREADS:-2}"
for exp in "${exps[@]}"; do
  out="bench/out/classify-$exp"
  case "$exp" in
    permuted)    cmd=(lmadapt classify permuted-mnist) ;;
    incremental) cmd=(lmadapt classify incremental) ;;
    unbalanced)  cmd=(lmadapt classify incremental --unbalanced) ;;
    curriculum)  cmd=(lmadapt classify curriculum) ;;
    *) echo "unknown experiment $exp"; exit 2 ;;
  esac
  echo "== $exp -> $out"
  /usr/bin/time -f "wall %e s, max RSS %M KB" "${cmd[@]}" --data-dir "$data_dir" --out "$out" --threads "$threads" \
    > "bench/out/classify-$exp.log" 2>&1 || { tail -5 "bench/out/classify-$exp.log"; exit 1; }
  tail -14 "bench/out/classify-$exp.log"
done
