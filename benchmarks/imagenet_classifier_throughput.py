"""Training throughput of the CGN invariant classifier: real images alone vs with counterfactuals.

Four runs of `skdcgn.imagenet_classifier.train_ensemble` (ResNet-50 ensemble, SGD, the same
settings), each timed over `--steps` steps after `--warmup` steps:

  real       real images only (cf_ratio 0)
  stored     + stored counterfactuals (uint8, 256 px, in memory: a decoded shard; resized on the device)
  students   + counterfactuals streamed from the ImageNet students (`imagenet_student_config`, 256 px)
  teacher    + counterfactuals streamed from the full-size teacher (3 × BigGAN-deep-256 + U2-Net)

All weights are random (cost does not depend on them); nothing is downloaded. "Real" images are
random uint8 images of 256 × 320 px held in memory, augmented as in training (RandomResizedCrop to
`--image-size`, flip) in `--workers` DataLoader processes; JPEG decoding is not measured. A step
trains on batch_size real images + cf_ratio · batch_size counterfactuals; images/s counts both.
Each run's ratio is its images/s over the real-only images/s of the same invocation. On CUDA the
clock reads after a synchronisation at every step.

    python benchmarks/imagenet_classifier_throughput.py --device cuda --batch-size 128 --bf16
    python benchmarks/imagenet_classifier_throughput.py --tiny          # CPU smoke run: tiny models, 32 px

`--tiny`: a tiny ResNet, 32-px images, tiny students and a tiny BigGAN-deep/U2-Net teacher (a test
of the script, not a measurement of anything at full size). `--budget S` skips runs that would
start after S seconds. Writes `--out` (JSON) and the same table as markdown beside it (.md).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from skdcgn.bench import hardware_info
from skdcgn.config import resolve_device
from skdcgn.imagenet_classifier import (EnsembleTrainConfig, StoredCounterfactuals, StreamedCounterfactuals,
                                        TensorCounterfactuals, train_ensemble)
from skdcgn.io import write_bytes, write_json
from skdcgn.models.cgn import CGN, MECHANISMS

SOURCES = ("real", "stored", "students", "teacher")


class RandomImages(Dataset):
    """`n` random uint8 images [3, h, w] with labels in [0, classes), generated once (seeded)."""

    def __init__(self, n: int, h: int, w: int, classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g).tolist()

    def identity(self) -> dict:
        return {"random": list(self.images.shape)}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def make_cgn(kind: str, tiny: bool) -> CGN:
    """Random-weight students or teacher, full size or tiny."""
    from skdcgn.models.students import imagenet_student_config, make_student

    torch.manual_seed(0)
    if kind == "students":
        cfg = (lambda m: imagenet_student_config(m, 32, widths=(8, 8, 8), embed_dim=8)) if tiny else \
              (lambda m: imagenet_student_config(m, 256))
        return CGN(*(make_student(cfg(m)) for m in MECHANISMS)).eval()
    from skdcgn.models.imagenet import ImageNetMechanismConfig, random_cgn, tiny_config

    return random_cgn((lambda m: tiny_config(m, image_size=32)) if tiny else (lambda m: ImageNetMechanismConfig(mechanism=m)))


def measure(source: str, args: argparse.Namespace, real: Dataset, device: torch.device) -> dict:
    """Build the source, train warmup + steps steps, time the last `steps`."""
    size = args.image_size
    cf = None
    t_build = time.perf_counter()
    if source == "stored":
        side = 32 if args.tiny else 256
        g = torch.Generator().manual_seed(1)
        n = max(args.batch_size * 4, 64)
        cf = StoredCounterfactuals(TensorCounterfactuals(
            torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g),
            torch.randint(0, 1000, (n, 3), generator=g)), size)
    elif source in ("students", "teacher"):
        cgn = make_cgn(source, args.tiny)
        cf = StreamedCounterfactuals(cgn, size, identity={"bench": source})
        params = cgn.get_num_params()
    build_s = time.perf_counter() - t_build
    config = EnsembleTrainConfig(arch="tiny" if args.tiny else "resnet50", image_size=size, steps=args.warmup + args.steps,
                                 batch_size=args.batch_size, cf_ratio=0.0 if source == "real" else args.cf_ratio,
                                 bf16=args.bf16, device=str(device), workers=args.workers,
                                 checkpoint_interval=10**9, log_interval=10**9)
    stamps: list[float] = []

    def on_step(step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    train_ensemble(real, cf, config, None, progress=False, on_step=on_step)
    seconds = stamps[-1] - stamps[args.warmup - 1] if args.warmup else stamps[-1] - stamps[0]
    timed = args.steps if args.warmup else args.steps - 1
    per_step = config.batch_size + config.n_counterfactuals()
    out = {"source": source, "steps": timed, "real_per_step": config.batch_size,
           "counterfactuals_per_step": config.n_counterfactuals(), "seconds": round(seconds, 4),
           "images_per_s": round(timed * per_step / seconds, 2), "steps_per_s": round(timed / seconds, 4),
           "build_seconds": round(build_s, 2)}
    if source in ("students", "teacher"):
        out["generator_params"] = params
    if device.type == "cuda":
        out["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def markdown(record: dict) -> str:
    a = record["args"]
    hw = record["hardware"]
    where = (f"{hw['gpu']}" if hw.get("gpu") else f"CPU {hw.get('cpu')}, {hw.get('torch_threads')} torch thread(s)")
    lines = [f"# Classifier training throughput ({record['date']})", "",
             f"{where}, torch {record['torch']}; {'tiny models, ' if a['tiny'] else ''}{a['image_size']} px, "
             f"{a['batch_size']} real images per step + cf_ratio {a['cf_ratio']}, bf16 {a['bf16']}, "
             f"{a['workers']} workers, {a['steps']} timed steps after {a['warmup']}.", "",
             "| source | images/step | images/s | steps/s | × real-only |", "|---|---:|---:|---:|---:|"]
    for r in record["runs"]:
        ratio = f"{r['ratio_to_real']:.2f}" if r.get("ratio_to_real") is not None else "–"
        lines.append(f"| {r['source']} | {r['real_per_step'] + r['counterfactuals_per_step']} | {r['images_per_s']:.1f} | "
                     f"{r['steps_per_s']:.3f} | {ratio} |")
    for s in record.get("skipped", []):
        lines.append(f"| {s} | skipped (budget) | | | |")
    lines += ["", "images/s counts every image the classifier trains on (real + counterfactual); × real-only is "
              "images/s over the real-only run's, so 1.00 means the counterfactuals cost nothing beyond the "
              "classifier's own step."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="real images per step (default 128; 8 with --tiny)")
    p.add_argument("--cf-ratio", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=20, help="timed steps per source")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (32 with --tiny)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA) for the classifier and the generators")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="tiny models and images: a CPU smoke run")
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    p.add_argument("--budget", type=float, default=0, help="seconds; runs that would start later are skipped (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--out", default="docs/imagenet_classifier_throughput.json")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.tiny else 128)
    args.image_size = args.image_size or (32 if args.tiny else 224)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "real" not in args.sources:
        args.sources = ["real", *args.sources]  # every ratio needs the real-only run of the same invocation
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    real = RandomImages(max(args.batch_size * 8, 64), 48 if args.tiny else 256, 56 if args.tiny else 320, 1000)
    record = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "hardware": hardware_info(device), "torch": torch.__version__, "args": vars(args), "runs": [], "skipped": []}
    out = Path(args.out)
    for source in args.sources:
        if args.budget and time.perf_counter() - t0 > args.budget:
            record["skipped"].append(source)
            continue
        r = measure(source, args, real, device)
        base = record["runs"][0]["images_per_s"] if record["runs"] else r["images_per_s"]
        r["ratio_to_real"] = round(r["images_per_s"] / base, 4)
        record["runs"].append(r)
        print(json.dumps(r), flush=True)
        write_json(out, record)  # after every run: a budget cut keeps what was measured
        write_bytes(out.with_suffix(".md"), markdown(record).encode())
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
