#!/usr/bin/env bash
# Issue #22: the CGN paper's protocol in minutes on one GPU, measured in a single device call.
#   0. benchmarks/sampling_speed.py: composites/s of the MNIST students vs the teacher at batch 1, 256
#      and 8,192, eager and captured in a CUDA graph (skdcgn.models.sampling), with a tiny distillation
#      of its own (default student architecture) → docs/sampling_speed.{json,md} (90 s at most);
#   1. benchmarks/multitrain_speed.py: ms per optimizer step of one classifier alone vs K = 1, 33, 99
#      stacked (fp32 and bf16), eager, and at K = 33 also compiled as the trainer compiles it on a GPU
#      (torch.compile "reduce-overhead": CUDA graphs; its compile seconds too), with the stack's weights
#      checked against separate training → docs/multitrain_speed.{json,md} (240 s at most);
#   2. `skdcgn run --variant all --preset full --device cuda --batch-classifiers on` end to end
#      (data, distillation, 100k-image counterfactual sets, 3 × 33 classifiers trained as one stack per
#      variant, its step compiled: --classifier-compile $CLASSIFIER_COMPILE, default auto = on on a GPU),
#      timed; recorded in docs/results.md (--record) when it finishes within the budget.
#      If it does not, the stage manifests say where the time went (printed below); run the script
#      again on the same machine to resume.
#   3. if time is left: two rows of one variant with bf16 classifiers, beside the fp32 table.
# Logs go to $LOGS; with $OUT set (the device tool's return folder) the results are copied there.
#   bash benchmarks/gpu_protocol.sh [BUDGET_SECONDS]   (default 540)
# A dry run of the script itself on a CPU (tiny sizes, one variant, not recorded):
#   DEVICE=cpu THREADS=1 PRESET=tiny VARIANT=colored RECORD= \
#     BENCH="--ks 1 2 --steps 2 --warmup 0 --batch-size 4 --compile --compile-ks 2" \
#     SAMPLING="--batch-sizes 1 4 --modes eager graph --repeats 1 --min-seconds 0" \
#     RUN_DIR=/tmp/protocol-dry bash benchmarks/gpu_protocol.sh 300
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOGS=${LOGS:-runs/gpu-logs}
RUN_DIR=${RUN_DIR:-runs/gpu-protocol}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-full}
VARIANT=${VARIANT:-all}
RECORD=${RECORD-docs/results.md}
THREADS=${THREADS:-8}
BENCH=${BENCH:---ks 1 33 99 --steps 100 --warmup 20 --bf16 --compile --compile-ks 33}
CLASSIFIER_COMPILE=${CLASSIFIER_COMPILE:-auto}
SAMPLING=${SAMPLING:---batch-sizes 1 256 8192 --modes eager graph}
mkdir -p "$LOGS"
DEADLINE=$(( $(date +%s) + ${1:-540} ))
left() { echo $(( DEADLINE - $(date +%s) )); }

python3 -c "import torch, safetensors, tqdm, yaml; print('torch', torch.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || exit 1

SAMPLED=docs/sampling_speed
[ "$DEVICE" = cuda ] || SAMPLED="$LOGS/sampling_speed"  # a dry run leaves docs/ alone
timeout 90 python3 benchmarks/sampling_speed.py --device "$DEVICE" $SAMPLING \
    --json "$SAMPLED.json" --md "$SAMPLED.md" > "$LOGS/sampling_speed.log" 2>&1
echo "sampling benchmark: exit $? ($(left) s left)"
cat "$SAMPLED.md" 2>/dev/null || tail -5 "$LOGS/sampling_speed.log"

SPEED=docs/multitrain_speed
[ "$DEVICE" = cuda ] || SPEED="$LOGS/multitrain_speed"  # a dry run leaves docs/ alone
rm -f "$SPEED.md"  # a killed benchmark shows its log below, never an earlier run's table
timeout 240 python3 benchmarks/multitrain_speed.py --device "$DEVICE" $BENCH \
    --json "$SPEED.json" --md "$SPEED.md" > "$LOGS/multitrain_speed.log" 2>&1
echo "speed benchmark: exit $? ($(left) s left)"
cat "$SPEED.md" 2>/dev/null || tail -12 "$LOGS/multitrain_speed.log"  # killed: the rows it printed

T0=$(date +%s)
timeout "$(( $(left) - 15 ))" python3 -m skdcgn run --variant "$VARIANT" --preset "$PRESET" --device "$DEVICE" \
    --batch-classifiers on --classifier-compile "$CLASSIFIER_COMPILE" --threads "$THREADS" --run-dir "$RUN_DIR" --quiet \
    ${RECORD:+--record "$RECORD"} > "$LOGS/protocol.log" 2>&1
rc=$?
echo "skdcgn run --variant $VARIANT --preset $PRESET --device $DEVICE --batch-classifiers on" \
     "--classifier-compile $CLASSIFIER_COMPILE: exit $rc after $(( $(date +%s) - T0 )) s"
tail -30 "$LOGS/protocol.log"
python3 - "$RUN_DIR" <<'PY'
"""Where the time went: each finished stage's own seconds, from its manifest (also after a timeout)."""
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for vdir in sorted(p for p in run.iterdir() if p.is_dir()) if run.is_dir() else []:
    def secs(pattern, key):
        found = [json.loads(m.read_text()).get(key, 0.0) for m in vdir.glob(pattern)]
        return f"{len(found)} done, {sum(found):.0f} s"
    print(f"{vdir.name}: students {secs('distill/students/*/manifest.json', 'train_seconds')}; "
          f"datasets {secs('datasets/*/manifest.json', 'seconds')}; "
          f"classifiers {secs('classifiers/*/seed*/manifest.json', 'train_seconds')} (each its share of the stack)")
    if (vdir / "results.json").is_file():
        print("   timings_s", json.loads((vdir / "results.json").read_text())["timings_s"])
PY
# 3. bf16: does it keep the accuracy? Two rows, one seed, the fp32 run's students (its datasets are
#    generated again: the classifiers' identity differs, so they cannot share the run folder).
if [ "$rc" = 0 ] && [ "$(left)" -gt 150 ] && [ -z "${SKIP_BF16:-}" ]; then
  timeout "$(( $(left) - 15 ))" python3 -m skdcgn run --variant colored --preset "$PRESET" --device "$DEVICE" \
      --students "$RUN_DIR" --rows original student_cf --composers --seeds 1 --classifier-bf16 true \
      --batch-classifiers on --classifier-compile "$CLASSIFIER_COMPILE" --threads "$THREADS" --run-dir "$RUN_DIR-bf16" \
      --quiet ${RECORD:+--record "$RECORD"} \
      > "$LOGS/protocol-bf16.log" 2>&1
  echo "bf16 classifiers (colored, original + student_cf, seed 0): exit $? ($(left) s left)"
  tail -12 "$LOGS/protocol-bf16.log"
  echo "fp32, same rows (mean over its seeds):"; grep -E "^\| (trained on|original|student_cf) " "$RUN_DIR/results.md" 2>/dev/null
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/docs" "$OUT/logs" "$OUT/run"
  cp "$SAMPLED".* "$SPEED".* docs/results.md docs/results.json "$OUT/docs/" 2>/dev/null
  cp "$LOGS"/*.log "$OUT/logs/" 2>/dev/null
  for d in "$RUN_DIR" "$RUN_DIR-bf16"; do
    [ -d "$d" ] || continue
    mkdir -p "$OUT/run/$(basename "$d")"
    (cd "$d" && find . -name 'results.json' -o -name 'results.md' -o -name 'run_config.json' \
       | xargs -r cp --parents -t "$OUT/run/$(basename "$d")/")
  done
fi
echo "done ($(left) s left)"
