#!/usr/bin/env bash
# Issue #20 at the paper protocol, in one device call: do better students, or the students'
# speed, close the gap to the teacher? Per variant (the three side by side: a small CNN leaves a
# GPU mostly idle), `long`-preset students distilled on the device (their learning curves land in
# <run>/<variant>/distill/eval.json), then 3 seeds of: teacher_cf, student_cf (stored sets, the
# paper's 100k counterfactuals, 10 per mask) and student_stream (the students sampled at every
# classifier step, one composite per mask, the same steps), classifiers stacked (multitrain).
# Each variant is recorded in docs/results.md; rerun the script to resume what the budget cut.
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
if [ -n "${OUT:-}" ]; then
  cp -r "$LOGS" "$OUT/" 2>/dev/null
  cp docs/results.md docs/results.json "$OUT/" 2>/dev/null
  for v in colored double_colored wildlife; do
    cp "runs/students-$PRESET-$DISTILL-$v/$v/distill/eval.json" "$OUT/eval-$v.json" 2>/dev/null
  done
fi
