#!/usr/bin/env bash
# Issue #20 at the paper protocol, in one device call: do better students, or the students'
# speed, close the gap to the teacher? Per variant (the three side by side: a small CNN leaves a
# GPU mostly idle), `long`-preset students distilled on the device (their learning curves land in
# <run>/<variant>/distill/eval.json), then 3 seeds of: teacher_cf, student_cf (stored sets, the
# paper's 100k counterfactuals, 10 per mask) and student_stream (the students sampled at every
# classifier step, one composite per mask, the same steps), classifiers stacked (multitrain).
# Each variant is recorded in docs/results.md; rerun the script to resume what the budget cut.
# Then, budget left, the same students widened (the shape reads $WIDE·u, StudentConfig.noise_scale:
# docs/distillation.md, quick-budget finding of issue #20), student_cf only, recorded apart in
# $WIDE_RECORD (a summary must not merge two student sets); WIDE= skips it.
#   bash benchmarks/gpu_students.sh [BUDGET_SECONDS]      (default 540)
#   PRESET=tiny DISTILL=tiny DEVICE=cpu SEEDS=1 bash benchmarks/gpu_students.sh 600   (a dry run on a CPU)
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PRESET=${PRESET:-full}
DISTILL=${DISTILL:-long}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-3}
RECORD=${RECORD-docs/results.md}
LOGS=${LOGS:-runs/students-logs}
mkdir -p "$LOGS"
DEADLINE=$(( $(date +%s) + ${1:-540} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
args() {  # variant
  echo "--variant $1 --preset $PRESET --distill-preset $DISTILL --rows teacher_cf student_cf student_stream" \
       "--stream-per-shape 1 --seeds $SEEDS --device $DEVICE --batch-classifiers on --threads 1" \
       "--run-dir runs/students-$PRESET-$DISTILL-$1 --quiet"
}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
after_variant() {  # the shape student's final held-out numbers, from its learning curve's evaluation
  python3 - "runs/students-$PRESET-$DISTILL-$1/$1/distill/eval.json" <<'PY'
import json, sys
ev = json.load(open(sys.argv[1]))["mechanisms"]["shape"]
print("  shape student: IoU@0.5 %.3f, binariness %.3f (teacher %.3f)" % (ev["iou@0.5"], ev["binariness"], ev["teacher_binariness"]))
PY
}
source "$(dirname "$0")/side_by_side.sh"
run_side_by_side colored double_colored wildlife

WIDE=${WIDE-1.3}
WIDE_RECORD=${WIDE_RECORD-docs/noise_scale/full-wide.md}
if [ -n "$WIDE" ] && [ "$(left)" -gt 120 ]; then
  for v in colored double_colored wildlife; do  # the device's students, their shape reading $WIDE·u
    python3 benchmarks/shape_distribution.py --students "runs/students-$PRESET-$DISTILL-$v" --variant "$v" \
        --rows "1:$WIDE" --n 100 --threads 1 --out "$LOGS/wide-$v.md" --write "runs/students-wide-$DISTILL:1:$WIDE" \
        >> "$LOGS/wide.log" 2>&1 || echo "$v: no widened students (see $LOGS/wide.log)"
  done
  args() {  # variant
    echo "--variant $1 --preset $PRESET --distill-preset $DISTILL --students runs/students-wide-$DISTILL" \
         "--rows student_cf --seeds $SEEDS --device $DEVICE --batch-classifiers on --threads 1" \
         "--run-dir runs/wide-$PRESET-$DISTILL-$1 --quiet"
  }
  unset -f after_variant
  RECORD=$WIDE_RECORD
  echo "widened students (shape noise × $WIDE), student_cf:"
  run_side_by_side colored double_colored wildlife
fi
if [ -n "${OUT:-}" ]; then
  cp -r "$LOGS" "$OUT/" 2>/dev/null
  cp docs/results.md docs/results.json "$OUT/" 2>/dev/null
  [ -n "$WIDE_RECORD" ] && cp "$WIDE_RECORD" "${WIDE_RECORD%.md}.json" "$OUT/" 2>/dev/null
  for v in colored double_colored wildlife; do
    cp "runs/students-$PRESET-$DISTILL-$v/$v/distill/eval.json" "$OUT/eval-$v.json" 2>/dev/null
  done
fi
