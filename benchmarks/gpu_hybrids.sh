#!/usr/bin/env bash
# Issue #20, step 1 at the paper protocol: which mechanism costs the students' counterfactuals
# accuracy? The hybrid table (teacher_cf, student_cf, teacher shape + student textures, student
# shape + teacher textures), 3 seeds, default-preset students distilled on the device, the three
# variants side by side (a small CNN leaves a GPU mostly idle), each recorded in docs/results.md.
#   bash benchmarks/gpu_hybrids.sh [BUDGET_SECONDS]      (default 540; one device call)
#   PRESET=tiny DEVICE=cpu bash benchmarks/gpu_hybrids.sh 300   (a dry run of the script on a CPU)
# On a 2-core CPU the full preset costs 36 classifiers x 8-25 min: run it row by row instead.
set -u
PRESET=${PRESET:-full}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-3}
LOGS=${LOGS:-runs/hybrid-logs}
mkdir -p "$LOGS"
DEADLINE=$(( $(date +%s) + ${1:-540} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
ROWS="teacher_cf student_cf hybrid_teacher_shape hybrid_student_shape"
args() {  # variant
  echo "--variant $1 --preset $PRESET --rows $ROWS --seeds $SEEDS --device $DEVICE --threads 1" \
       "--run-dir runs/hybrid-$PRESET-$1 --quiet"
}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
declare -A pid
for v in colored double_colored wildlife; do
  timeout "$(left)" python3 -m skdcgn run $(args "$v") > "$LOGS/$v.log" 2>&1 &
  pid[$v]=$!
done
for v in colored double_colored wildlife; do
  if wait "${pid[$v]}"; then
    python3 -m skdcgn run $(args "$v") --record docs/results.md >> "$LOGS/$v.log" 2>&1
    echo "$v: recorded ($(left) s left)"
  else
    echo "$v: not finished in the budget ($(left) s left); rerun the script to resume it"
  fi
done
