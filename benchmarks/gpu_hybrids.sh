#!/usr/bin/env bash
# Issue #20, step 1 at the paper protocol: which mechanism costs the students' counterfactuals
# accuracy? The hybrid table (teacher_cf, student_cf, teacher shape + student textures, student
# shape + teacher textures), 3 seeds, default-preset students distilled on the device, the three
# variants side by side (a small CNN leaves a GPU mostly idle), each recorded in docs/results.md.
#   bash benchmarks/gpu_hybrids.sh [BUDGET_SECONDS]      (default 540; one device call)
#   PRESET=tiny DEVICE=cpu RECORD= bash benchmarks/gpu_hybrids.sh 300   (a dry run of the script on a CPU)
# On a 2-core CPU the full preset costs 36 classifiers x 8-25 min: run it row by row instead.
set -u
PRESET=${PRESET:-full}
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-3}
LOGS=${LOGS:-runs/hybrid-logs}
RECORD=${RECORD-docs/results.md}
mkdir -p "$LOGS"
DEADLINE=$(( $(date +%s) + ${1:-540} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
ROWS="teacher_cf student_cf hybrid_teacher_shape hybrid_student_shape"
args() {  # variant
  echo "--variant $1 --preset $PRESET --rows $ROWS --seeds $SEEDS --device $DEVICE --threads 1" \
       "--run-dir runs/hybrid-$PRESET-$1 --quiet"
}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
source "$(dirname "$0")/side_by_side.sh"
run_side_by_side colored double_colored wildlife
