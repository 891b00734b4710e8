#!/usr/bin/env bash
# The GPU measurements of docs/results.md in one go on one CUDA GPU, within a time budget:
#   1. the composition study at full size (1 seed) with the students of earlier CPU runs
#      (runs/full-<variant>/<variant>/distill/students, from `skdcgn run --preset full`);
#   2. the speed benchmarks: MNIST teacher vs students, ImageNet-size teacher vs students;
#      and a one-process torchrun distillation (the DDP/nccl path), plain and bf16;
#   3. the study again with 3 seeds, for as long as the budget lasts (seeds 0 are reused).
# Each finished study is recorded in docs/results.md; logs go to $LOGS.
#   bash benchmarks/gpu_checks.sh [BUDGET_SECONDS]   (default 540)
set -u
LOGS=${LOGS:-runs/gpu-logs}
mkdir -p "$LOGS"
DEADLINE=$(( $(date +%s) + ${1:-540} ))
VARIANTS="colored double_colored wildlife"
COMPOSERS="rotate mask_noise opacity binary swap_textures shape_only"
left() { echo $(( DEADLINE - $(date +%s) )); }
study_args() {  # variant seeds
  echo "--variant $1 --preset full --students runs/full-$1 --rows student_cf --composers $COMPOSERS --seeds $2" \
       "--device cuda --threads 4 --run-dir runs/study-full-$1 --quiet"
}
study() {  # seeds: the three variants side by side (a small CNN leaves the GPU mostly idle), then record
  local seeds=$1 v
  declare -A pid
  for v in $VARIANTS; do
    timeout "$(left)" python3 -m skdcgn run $(study_args "$v" "$seeds") > "$LOGS/study-$v-${seeds}seeds.log" 2>&1 &
    pid[$v]=$!
  done
  for v in $VARIANTS; do
    if wait "${pid[$v]}"; then
      python3 -m skdcgn run $(study_args "$v" "$seeds") --record docs/results.md >> "$LOGS/study-$v-${seeds}seeds.log" 2>&1
      echo "study $v, $seeds seed(s): recorded ($(left) s left)"
    else
      echo "study $v, $seeds seed(s): not finished ($(left) s left)"
    fi
  done
}

python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
study 1
timeout 150 python3 -m skdcgn bench --preset full --teacher double_colored --students runs/full-double_colored/double_colored \
    --device cuda > "$LOGS/bench-mnist.log" 2>&1; echo "bench mnist: exit $? ($(left) s left)"
timeout 150 python3 -m skdcgn bench --imagenet --device cuda --batch-sizes 1 16 64 > "$LOGS/bench-imagenet.log" 2>&1
echo "bench imagenet: exit $? ($(left) s left)"
for bf16 in false true; do
  timeout 60 torchrun --nproc-per-node 1 -m skdcgn distill --teacher double_colored --preset tiny --device cuda \
      --bf16 $bf16 --run-dir "runs/gpu-ddp-bf16-$bf16" --no-progress > "$LOGS/ddp-bf16-$bf16.log" 2>&1
  echo "torchrun distill (bf16 $bf16): exit $?"
done
[ "$(left)" -gt 60 ] && study 3
echo "done ($(left) s left)"
