#!/usr/bin/env bash
# The ImageNet classifier's GPU checks in one device call, within a time budget:
#   1. training throughput at 224 px (benchmarks/imagenet_classifier_throughput.py, bf16): real images
#      alone, + stored counterfactuals, + streamed from the 256-px students, + streamed from the
#      full-size teacher (3 x BigGAN-deep-256 + U2-Net), all with random weights; writes
#      docs/imagenet_classifier_throughput.{json,md}. The target: students >= 0.8 x real-only.
#   2. a one-process torchrun of `skdcgn imagenet train-classifier` (DDP over nccl) in bf16 on a tiny
#      fake ImageFolder tree with tiny streamed students: the CUDA paths of the trainer.
#   bash benchmarks/gpu_imagenet.sh [BUDGET_SECONDS]   (default 420)
# Needs: pip install -e ".[imagenet]" (pytorch-pretrained-biggan builds the random-weight teacher).
set -u
LOGS=${LOGS:-runs/gpu-logs}
mkdir -p "$LOGS"
BUDGET=${1:-420}
DEADLINE=$(( $(date +%s) + BUDGET ))
left() { echo $(( DEADLINE - $(date +%s) )); }

python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# the teacher runs last: the budget cuts it first (a run that would start after --budget is skipped)
timeout $(( $(left) - 90 )) python3 benchmarks/imagenet_classifier_throughput.py --device cuda --bf16 \
    --batch-size 128 --cf-ratio 1 --steps 20 --warmup 5 --workers 12 --budget $(( $(left) - 180 )) \
    --out docs/imagenet_classifier_throughput.json 2>&1 | tee "$LOGS/classifier-throughput.log" | tail -12
echo "throughput: exit ${PIPESTATUS[0]} ($(left) s left)"

python3 - <<'PY'
from pathlib import Path
import torch
from PIL import Image
from skdcgn.models.cgn import CGN, MECHANISMS
from skdcgn.models.students import imagenet_student_config, make_student
root = Path("runs/gpu-clf-check")
g = torch.Generator().manual_seed(0)
for c in range(3):
    (root / "real" / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()).save(root / "real" / f"c{c}" / f"{i}.png")
torch.manual_seed(0)
CGN(*(make_student(imagenet_student_config(m, 32, widths=(8, 8, 8), embed_dim=8)) for m in MECHANISMS)).save_pretrained(root / "cgn")
PY
timeout $(( $(left) > 60 ? 60 : $(left) )) torchrun --nproc-per-node 1 -m skdcgn imagenet train-classifier \
    --real runs/gpu-clf-check/real --counterfactuals stream:runs/gpu-clf-check/cgn --out runs/gpu-clf-check/clf \
    --arch tiny --image-size 32 --steps 4 --batch-size 4 --device cuda --bf16 true --quiet --overwrite \
    > "$LOGS/clf-torchrun-bf16.log" 2>&1
echo "torchrun train-classifier (bf16, nccl): exit $? ($(left) s left)"
tail -3 "$LOGS/clf-torchrun-bf16.log"
echo "done ($(left) s left)"
