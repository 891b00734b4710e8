"""Wall time of K classifiers trained one by one (`train_classifier`) vs together (`train_classifiers`).

Synthetic separable 32 px images (class k: a bright square at one of 10 places), one dataset per
job, the `cgn` architecture, every job with its own seed and folder; reports both wall times,
their ratio and the largest weight difference between the two ways (float tolerance expected).

    python benchmarks/multitrain_wall.py --jobs 6 --images 5000 --max-steps 300 --device cpu --threads 1
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from skdcgn.invariance import ClassifierConfig, train_classifier
from skdcgn.multitrain import ClassifierJob, train_classifiers


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 3, 32, 32] images and int64 [n] labels: class k a bright 6 × 6 square at place k on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=g)
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.4 - 1
    for k in range(10):
        r, c = divmod(k, 5)
        x[labels == k, :, 4 + 14 * r:10 + 14 * r, 2 + 6 * c:8 + 6 * c] = 1.0
    return ((x + 1) * 127.5).round().to(torch.uint8), labels


def main(argv: list[str] | None = None) -> dict:
    """Time both ways; print and return the JSON record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--images", type=int, default=5000, help="images per job")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = [separable(args.images, seed) for seed in range(args.jobs)]
    configs = [ClassifierConfig(epochs=args.epochs, batch_size=args.batch_size, seed=s, device=args.device,
                                max_steps=args.max_steps) for s in range(args.jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        alone = [train_classifier(x, y, c, Path(tmp) / f"one{i}", progress=False)
                 for i, ((x, y), c) in enumerate(zip(data, configs))]
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = train_classifiers([ClassifierJob(x, y, c, Path(tmp) / f"stack{i}")
                                      for i, ((x, y), c) in enumerate(zip(data, configs))], progress=False)
        batched = time.perf_counter() - t0
    diff = max((a - b).abs().max().item() for m, n in zip(alone, together)
               for a, b in zip(m.state_dict().values(), n.state_dict().values()) if a.is_floating_point())
    record = {"jobs": args.jobs, "images": args.images, "max_steps": args.max_steps, "batch_size": args.batch_size,
              "device": args.device, "threads": torch.get_num_threads(), "sequential_s": round(sequential, 1),
              "batched_s": round(batched, 1), "speedup": round(sequential / batched, 2),
              "max_abs_weight_difference": diff}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
