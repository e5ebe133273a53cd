#!/usr/bin/env bash
# The one-shot GPU check (see scripts/gpu_check.py): returns within ~9.5 minutes, results under $OUT.
#   on the lent machine:  bash scripts/gpu_check.sh            (Fashion-MNIST carried in .gpudata/fashion-mnist)
#   anywhere, tiny, CPU:  OUT=/tmp/gc bash scripts/gpu_check.sh --dry-run
set -u
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-555}
if [ "${1:-}" = "--dry-run" ]; then
  DATA=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
  BUDGET=${GPU_CHECK_BUDGET_S:-400}
  exec timeout -k 10 $((BUDGET + 15)) "$PY" scripts/gpu_check.py --out "$OUT" --budget "$BUDGET" \
    --data-dir "$DATA" --dry-run
fi
DATA=${DATA_DIR:-.gpudata/fashion-mnist}
timeout -k 10 $((BUDGET + 15)) "$PY" scripts/gpu_check.py --out "$OUT" --budget "$BUDGET" --data-dir "$DATA"
rc=$?
ls -la "$OUT" "$OUT/bench" 2>/dev/null
exit $rc
