#!/usr/bin/env bash
# The MbPA paper's MNIST experiments and the Hebbian-softmax class curriculum, full size.
#   bench/classify/run.sh [DATA_DIR] [EXPERIMENT ...]
# EXPERIMENT: permuted incremental unbalanced curriculum (default: all four), or the short
# settings permuted-short / incremental-short (minutes on one core: fewer tasks / less
# training and fewer test images, no grid search: the settings the full runs chose).
# Outputs go to $OUT_ROOT/classify-EXPERIMENT (OUT_ROOT default bench/out; refused if
# already there; delete to re-run); LMADAPT_THREADS sets the torch threads (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
data_dir="${1:-../shared/data}"
shift || true
exps=("$@")
[ ${#exps[@]} -gt 0 ] || exps=(permuted incremental unbalanced curriculum)
threads="${LMADAPT_THREADS:-2}"
root="${OUT_ROOT:-bench/out}"
mkdir -p "$root"
for exp in "${exps[@]}"; do
  out="$root/classify-$exp"
  case "$exp" in
    permuted)    cmd=(lmadapt classify permuted-mnist) ;;
    incremental) cmd=(lmadapt classify incremental) ;;
    unbalanced)  cmd=(lmadapt classify incremental --unbalanced) ;;
    curriculum)  cmd=(lmadapt classify curriculum) ;;
    permuted-short) cmd=(lmadapt classify permuted-mnist --tasks 5 --examples-per-task 2000
                         --memory-per-task 100,250 --test-per-task 2000 --no-tune --ewc-lambda 1
                         --mbpa-alpha 0.1 --mbpa-steps 10) ;;
    incremental-short) cmd=(lmadapt classify incremental --splits 2 --epochs 1
                            --eval-epochs 0.02,0.05,0.1,0.2,0.3,0.5,0.75,1 --test-examples 5000 --no-tune
                            --mbpa-alpha 0.01 --mbpa-steps 10) ;;
    *) echo "unknown experiment $exp"; exit 2 ;;
  esac
  echo "== $exp -> $out"
  /usr/bin/time -f "wall %e s, max RSS %M KB" "${cmd[@]}" --data-dir "$data_dir" --out "$out" --threads "$threads" \
    > "$root/classify-$exp.log" 2>&1 || { tail -5 "$root/classify-$exp.log"; exit 1; }
  tail -14 "$root/classify-$exp.log"
done
