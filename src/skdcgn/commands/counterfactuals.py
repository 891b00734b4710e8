"""`skdcgn counterfactuals`: write a counterfactual dataset from a teacher or distilled students."""
from __future__ import annotations

import argparse
import time

from ..compose import COMPOSERS
from ..models.sampling import SAMPLER_MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `counterfactuals` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object)."""
    p = subparsers.add_parser(
        "counterfactuals", help="sample a counterfactual dataset (sharded, resumable) from a CGN",
        description="Each shape sample gets --per-shape random foreground/background classes; "
                    "its label is the shape's class. Run the same command again to resume. "
                    "--format tar writes WebDataset-style tar shards of JPEG/PNG images with "
                    "(shape, texture, background) labels, for CGN-ImageNet teachers or students; "
                    "it runs under `torchrun --nproc-per-node N -m skdcgn counterfactuals ...` "
                    "(shard i written by rank i % N).")
    p.add_argument("--cgn", default="double_colored",
                   help="shipped teacher name, students:<run dir>, CGN folder or .pth, imagenet-biggan:<dir>, "
                        "imagenet-cgn:<file>, hybrid:... (default: double_colored)")
    p.add_argument("--n", "--n-images", dest="n", type=int, default=100_000,
                   help="number of images (default 100000); under torchrun write --n-images (torchrun takes --n "
                        "for one of its own options)")
    p.add_argument("--per-shape", type=int, default=10, help="counterfactuals per mask (default 10)")
    p.add_argument("--out", required=True, help="dataset folder")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "tar"),
                   help="safetensors: uint8 tensor shards (CGN-MNIST); tar: WebDataset-style JPEG/PNG shards "
                        "(CGN-ImageNet; several processes under torchrun) (default: safetensors)")
    p.add_argument("--composer", default="standard", help=f"composition variant: {', '.join(COMPOSERS)} "
                   "(default: standard; tar: standard only)")
    p.add_argument("--no-counterfactual", dest="counterfactual", action="store_false",
                   help="tie foreground and background to the shape's class (no counterfactuals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard file (default 10000 for safetensors, 1000 for tar)")
    tar = p.add_argument_group("tar format (CGN-ImageNet)")
    tar.add_argument("--truncation", type=float, default=None,
                     help="BigGAN truncation in (0, 1] for every mechanism (default: as loaded, 0.5); "
                          "refused for students, which learned their teacher's")
    tar.add_argument("--classes", default=None,
                     help="class subset to draw shapes, textures and backgrounds from: indices and ranges "
                          "('0-9,207 409') or a file of them (default: all classes)")
    tar.add_argument("--image-format", default="jpg", choices=("jpg", "png"), help="sample images (default: jpg)")
    tar.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality in [1, 100] (default 95)")
    tar.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--sampler", default="auto", choices=SAMPLER_MODES,
                   help="how the CGN's forward runs (safetensors sets): auto = captured once in a CUDA graph on a GPU, "
                        "eager on a CPU; compile = torch.compile; same draws, same images within float tolerance "
                        "(default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto; under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset in --out made with other settings")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..api import load_cgn
    from ..config import resolve_device
    from ..errors import SkdcgnError

    device = resolve_device(args.device)
    if args.format == "tar":
        return _run_tar(args, device)
    tar_only = [flag for flag, value in (("--truncation", args.truncation), ("--classes", args.classes)) if value is not None]
    if tar_only:
        raise SkdcgnError(f"{tar_only[0]} applies to --format tar only")
    from ..counterfactuals import generate_counterfactuals
    from ..distill.distributed import dist_env

    if dist_env().enabled:
        raise SkdcgnError("several processes (torchrun) write --format tar only; run safetensors sets in one process")
    cgn = load_cgn(args.cgn).to(device)
    t0 = time.perf_counter()
    out = generate_counterfactuals(cgn, args.out, n=args.n, per_shape=args.per_shape, seed=args.seed,
                                   composer=args.composer, counterfactual=args.counterfactual,
                                   shard_size=10_000 if args.shard_size is None else args.shard_size, cgn_name=args.cgn, overwrite=args.overwrite,
                                   progress=args.progress, sampler=args.sampler)
    print(f"wrote {out} ({args.n} images, preview {out / 'preview.png'}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _run_tar(args: argparse.Namespace, device) -> int:
    from ..api import load_cgn
    from ..distill.distributed import init_distributed
    from ..errors import SkdcgnError
    from ..imagenet_counterfactuals import write_counterfactual_tars

    if args.composer != "standard":
        raise SkdcgnError(f"--composer {args.composer}: tar sets use the standard composition only")
    env, device = init_distributed(device)
    cgn = load_cgn(args.cgn).to(device)
    t0 = time.perf_counter()
    try:
        out = write_counterfactual_tars(cgn, args.out, n=args.n, per_shape=args.per_shape, seed=args.seed,
                                        truncation=args.truncation, classes=args.classes,
                                        image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                                        counterfactual=args.counterfactual, shard_size=1000 if args.shard_size is None else args.shard_size,
                                        batch_size=args.batch_size, cgn_name=args.cgn, overwrite=args.overwrite,
                                        progress=args.progress, rank=env.rank, world_size=env.world_size)
    finally:
        if env.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if env.is_main:
        seconds = time.perf_counter() - t0
        print(f"wrote {out} ({args.n} images, preview {out / 'preview.png'}) in {seconds:.1f} s")
    return 0
