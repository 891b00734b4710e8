"""Students of one mechanism side by side: which architecture or objective closes the mask gap (issue #20).

Each `--variant NAME:FIELD=VALUE;FIELD=VALUE` is a `skdcgn distill` preset with those
`DistillConfig` overrides (tuples as `16,48,32`); every variant distils one mechanism (`--mechanism`, the shape by default) of
the same teacher in its own run folder, from the same seeded transfer set, and is scored on the
same held-out (u, y) (`eval_seed`, never queried for training): L1 (and for masks IoU@0.5,
binariness and soft fraction beside the teacher's), parameters, training seconds, and outputs/s of the student against
the teacher's mechanism at batch 256, timed interleaved in this process (ratio = student /
teacher, so machine load cancels out to first order).

    python benchmarks/shape_students.py --teacher double_colored --preset default --threads 2 \
        --run-root runs/shape-sweep --out docs/shape_students.md \
        --variant 'base:' --variant 'wide:shape_widths=64,48,32;beta1=0.9'

Finished variants are reused (the trainer's manifests), so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch

from skdcgn import load_cgn
from skdcgn.distill.evaluate import compare_mechanism
from skdcgn.distill.trainer import DistillConfig, distill, preset
from skdcgn.cli import script_exit
from skdcgn.errors import SkdcgnError
from skdcgn.io import read_json, write_bytes, write_json
from skdcgn.metrics.cost import throughput
from skdcgn.models.pretrained import load_model
from skdcgn.results.records import hardware_info

FIELDS = {f.name: f for f in DistillConfig.__dataclass_fields__.values()}


def parse_variant(spec: str) -> tuple[str, dict]:
    """'name:a=1;b=2,3' → ("name", {"a": 1, "b": (2, 3)}), values typed by the DistillConfig field."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        if key not in FIELDS:
            raise SkdcgnError(f"--variant {spec!r}: {key!r} is not a DistillConfig field")
        default = FIELDS[key].default
        try:
            if isinstance(default, tuple):
                overrides[key] = tuple(int(v) for v in value.split(","))
            elif isinstance(default, bool):
                overrides[key] = value.lower() in ("1", "true", "yes")
            else:
                overrides[key] = type(default)(value)
        except ValueError:
            raise SkdcgnError(f"--variant {spec!r}: {key}={value!r} is not a {type(default).__name__}") from None
    if not name:
        raise SkdcgnError(f"--variant {spec!r}: give it a name, NAME:FIELD=VALUE;...")
    return name, overrides


def masks_per_second(teacher: torch.nn.Module, student: torch.nn.Module, batch: int = 256) -> dict[str, float]:
    """Masks/s of both shape mechanisms at `batch`, timed interleaved (fixed seeded inputs)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, student.config.latent_dim, generator=g)
    y = torch.randint(0, student.config.n_classes, (batch,), generator=g)
    return throughput({"teacher": lambda: teacher(u, y), "student": lambda: student(u, y)}, batch,
                      torch.device("cpu"), repeats=7, min_seconds=0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="double_colored", help="a skdcgn.load_cgn spec (default: double_colored)")
    ap.add_argument("--preset", default="default", help="the distillation preset every variant starts from (default: default)")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME:FIELD=VALUE;FIELD=VALUE with DistillConfig fields (skdcgn distill --help, underscores), "
                         "tuples as 8,16,8; 'NAME:' alone is the preset as it is (repeatable)")
    ap.add_argument("--run-root", type=Path, required=True)
    ap.add_argument("--mechanism", default="shape", choices=("shape", "foreground", "background"),
                    help="the mechanism distilled (textures: L1 only)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--out", type=Path, required=True, help="markdown table (and its .json twin)")
    args = ap.parse_args()
    variants = [parse_variant(spec) for spec in args.variant]  # every spec checked before any work
    if len({name for name, _ in variants}) != len(variants):
        raise SkdcgnError("--variant: two variants share a name (each has its own run folder)")
    configs = [(name, overrides, preset(args.preset, threads=args.threads, benchmark=False, **overrides))
               for name, overrides in variants]
    torch.set_num_threads(args.threads)
    teacher = load_cgn(args.teacher).eval()
    shape_t = teacher.mechanisms()[args.mechanism]
    rows = []
    for name, overrides, cfg in configs:
        run = args.run_root / name
        distill(teacher, [args.mechanism], run, cfg, progress=False, evaluate=False)
        folder = run / "distill" / "students" / args.mechanism
        student = load_model(folder).eval()
        scores = compare_mechanism(shape_t, student, args.mechanism, cfg.n_eval, cfg.eval_seed)
        speed = masks_per_second(shape_t, student)
        manifest = read_json(folder / "manifest.json")
        rows.append({"variant": name, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
                     "params": manifest["params"], "steps": manifest["steps"], "train_s": manifest["train_seconds"],
                     **{k: scores.get(k, float("nan")) for k in ("l1", "iou@0.5", "binariness", "soft_fraction",
                                                                  "teacher_binariness", "teacher_soft_fraction")},
                     "masks_per_s": speed, "speed_ratio": speed["student"] / speed["teacher"]})
        print(f"{name}: L1 {scores['l1']:.4f} IoU {scores.get('iou@0.5', float('nan')):.4f} "
              f"binariness {scores.get('binariness', float('nan')):.4f} params {manifest['params']}", flush=True)
    record = {"command": "python " + " ".join(f"'{a}'" if (";" in a or " " in a) else a for a in sys.argv),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "hardware": hardware_info(torch.device("cpu")), "teacher": args.teacher, "preset": args.preset, "mechanism": args.mechanism,
              "teacher_params": sum(p.numel() for p in shape_t.parameters()), "rows": rows}
    write_json(args.out.with_suffix(".json"), record)
    write_bytes(args.out, render(record).encode())
    print(f"wrote {args.out}")
    return 0


def render(record: dict) -> str:
    """The markdown table of a sweep record."""
    rows = record["rows"]
    mech = record.get("mechanism", "shape")
    lines = [f"# {mech.capitalize()} students of `{record['teacher']}`, preset `{record['preset']}`", "",
             "Written by `benchmarks/shape_students.py`; do not edit by hand.", "",
             f"- command: `{record['command']}`",
             f"- date: {record['date']}; skdcgn {record['hardware']['skdcgn']}; {record['hardware'].get('cpu', '')}",
             f"- teacher {mech} mechanism: {record['teacher_params']:,} parameters (its class embedding included)"
             + (f"; masks: binariness {rows[0]['teacher_binariness']:.4f}, soft fraction "
                f"{rows[0]['teacher_soft_fraction']:.4f}" if rows and mech == "shape" else ""),
             "- held-out: the preset's n_eval (u, y) from its eval_seed, never in a transfer set; speed: outputs/s at "
             "batch 256, student and teacher timed interleaved in one process (median of 7)", "",
             "Runs share the machine with other jobs: compare speeds within a row (the ratio), not across rows.", "",
             "| variant | overrides | params | steps | train s | L1 | IoU@0.5 | binariness | soft fraction | outputs/s vs teacher |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "–" if v != v else f"{v:.4f}"  # noqa: E731  (NaN: not a mask)
    for r in rows:
        ov = "; ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in r["overrides"].items()) or "–"
        lines.append(f"| {r['variant']} | {ov} | {r['params']:,} | {r['steps']:,} | {r['train_s']:.0f} | {r['l1']:.4f} | "
                     f"{fmt(r['iou@0.5'])} | {fmt(r['binariness'])} | {fmt(r['soft_fraction'])} | {r['speed_ratio']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    script_exit(main, "shape_students.py")
