"""What does integrity verification cost? (writes docs/verify_cost.md)

Every file a manifest records is checked against its sha256 where it is read (`skdcgn.io.verify_file`),
and a cached variant against the digest of its content (`skdcgn.io.tensor_digest`). This script
measures both throughputs in seconds per GB (files in the page cache, as right after they were
written; best of `--repeats`), and the verification time a `skdcgn run --preset quick` adds to its
loads: the files of the sizes that run reads (transfer-set shards, counterfactual-dataset shards, as
the quick presets configure them) are written with the real writers and read back through the
verifying readers, as often as that run reads them, and the three cached splits are digested.

    python benchmarks/verify_cost.py [--size-mb 512] [--repeats 3] [--out docs/verify_cost.md]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from skdcgn.bench import hardware_info
from skdcgn.io import save_tensors, sha256_file, tensor_digest, verify_file, write_bytes

QUICK_RUN_SECONDS = 455  # README: `skdcgn run --preset quick`, one variant, 2-core CPU, measured 2026-12-01 (data cached)


def best(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def throughput(size_mb: int, repeats: int, tmp: Path) -> dict:
    """Seconds per GB of sha256 over a file (verify_file) and of tensor_digest over a uint8 tensor."""
    size = size_mb << 20
    path = tmp / "blob.bin"
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8)
    write_bytes(path, data.numpy().tobytes())
    digest = sha256_file(path)
    t_file = best(lambda: verify_file(path, digest, "benchmark"), repeats)
    t_tensor = best(lambda: tensor_digest({"images": data}), repeats)
    path.unlink()
    gb = size / 1e9
    return {"file_s_per_gb": t_file / gb, "tensor_s_per_gb": t_tensor / gb, "size_mb": size_mb}


def quick_run_loads(repeats: int, tmp: Path) -> list[dict]:
    """The verified reads of one variant's `skdcgn run --preset quick`, at their real sizes."""
    from skdcgn.counterfactuals import SHARD_PATTERN
    from skdcgn.data.variants import SIZE, TEST_RANGE, TRAIN_RANGE
    from skdcgn.distill.trainer import preset as distill_preset
    from skdcgn.pipeline import PRESETS, TRAINING_SETS

    run = PRESETS["quick"]
    dcfg = distill_preset(run["distill_preset"])
    g = torch.Generator().manual_seed(0)
    rows = []

    # transfer sets: three mechanisms, each read once by its student (TransferSet verifies every shard)
    paths = []
    for mech, channels in (("shape", 1), ("foreground", 3), ("background", 3)):
        for i in range(math.ceil(dcfg.n_transfer / dcfg.shard_size)):
            s = min(dcfg.shard_size, dcfg.n_transfer - i * dcfg.shard_size)
            p = tmp / "transfer" / mech / f"shard_{i:05d}.safetensors"
            save_tensors(p, {"u": torch.randn(s, 32, generator=g), "y": torch.randint(0, 10, (s,), dtype=torch.uint8),
                             "out": torch.randint(0, 256, (s, channels, 32, 32), generator=g, dtype=torch.uint8)})
            paths.append(p)
    rows.append(_verify_row("transfer sets (3 mechanisms, read once each)", paths, 1, repeats))

    # counterfactual datasets: teacher_samples, teacher_cf, student_cf; each row's classifier reads its set
    # once (student_cf twice: student_cf and student_cf+original)
    n, shard = run["n_counterfactuals"], 10_000
    paths = []
    for name in ("teacher_samples", "teacher_cf", "student_cf"):
        for i in range(math.ceil(n / shard)):
            s = min(shard, n - i * shard)
            p = tmp / "datasets" / name / SHARD_PATTERN.format(i)
            labels = torch.randint(0, 10, (s,), generator=g)
            save_tensors(p, {"images": torch.randint(0, 256, (s, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
                             "labels": labels, "y_fg": labels, "y_bg": labels})
            paths.append(p)
    reads = sum(1 for r in TRAINING_SETS if r != "original") / 3  # 4 dataset reads over 3 datasets
    rows.append(_verify_row("counterfactual datasets (3, read by 4 rows)", paths, reads, repeats))

    # the cached variant splits: train, test, test_iid, each digested once when loaded
    n_images = (TRAIN_RANGE[1] - TRAIN_RANGE[0]) + 2 * (TEST_RANGE[1] - TEST_RANGE[0])
    images = torch.randint(0, 256, (n_images, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    t = best(lambda: tensor_digest({"images": images, "labels": labels}), repeats)
    rows.append({"what": "cached variant splits (train, test, test_iid), digested on load",
                 "mb": (images.numel() + 8 * labels.numel()) / 1e6, "seconds": t})
    return rows


def _verify_row(what: str, paths: list[Path], reads: float, repeats: int) -> dict:
    digests = {p: sha256_file(p) for p in paths}
    t = best(lambda: [verify_file(p, d, "benchmark") for p, d in digests.items()], repeats)
    return {"what": what, "mb": reads * sum(p.stat().st_size for p in paths) / 1e6, "seconds": reads * t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512, help="bytes hashed for the throughput (default 512 MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/verify_cost.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="skdcgn-verify-") as d:
        tp = throughput(args.size_mb, args.repeats, Path(d))
        loads = quick_run_loads(args.repeats, Path(d))
    total_mb = sum(r["mb"] for r in loads)
    total_s = sum(r["seconds"] for r in loads)
    hw = hardware_info(torch.device("cpu"))
    lines = [
        "# What integrity verification costs", "",
        "Generated by `benchmarks/verify_cost.py`; do not edit by hand (run the command again).", "",
        *__doc__.split("\n\n")[1].splitlines(), "",
        "- command: `" + " ".join(["python benchmarks/verify_cost.py", *sys.argv[1:]]) + "`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- hardware: {hw['cpu']}, {hw['cpus_usable']} usable CPU cores, Python {hw['python']}, torch {hw['torch']}, "
        f"skdcgn {hw['skdcgn']}",
        f"- this script ran {time.perf_counter() - t0:.0f} s", "",
        "## Throughput", "",
        "| check | seconds per GB |", "|---|---|",
        f"| sha256 of a file (`verify_file`), {tp['size_mb']} MB, in the page cache | {tp['file_s_per_gb']:.3f} |",
        f"| digest of a tensor's bytes (`tensor_digest`, the cache) | {tp['tensor_s_per_gb']:.3f} |", "",
        "## Added to the loads of `skdcgn run --preset quick` (one variant)", "",
        "| verified read | MB | seconds |", "|---|---|---|",
        *[f"| {r['what']} | {r['mb']:.0f} | {r['seconds']:.2f} |" for r in loads],
        f"| **total** | **{total_mb:.0f}** | **{total_s:.2f}** |", "",
        f"That is {100 * total_s / QUICK_RUN_SECONDS:.2f}% of the quick run's {QUICK_RUN_SECONDS} s (README). "
        "sha256 is cheap enough that no weaker digest is used. A rerun of a finished run verifies the "
        "finished stages it checks once more (the datasets and students; a finished student's transfer set is "
        "not read at all).", "",
    ]
    write_bytes(args.out, "\n".join(lines).encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
