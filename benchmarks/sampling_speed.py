"""Composites/s of the MNIST students against their teacher, per batch size and sampler mode (issue #22).

Each CGN makes composites through `skdcgn.models.sampling.CGNSampler` (the noise drawn from a
seeded CPU generator exactly as `CGN.sample` does, then the forward):
- eager: the modules as they are (`CGN.sample`);
- compile: the forward through `torch.compile`, compiled once per batch size;
- graph: the forward captured once per batch size in a CUDA graph and replayed (CUDA only;
  skipped with a note on another device).
Teacher and students are timed in the same process, interleaved (`skdcgn.metrics.cost.throughput`:
the repeats of the two alternate, the median seconds per call counts), so a busy machine slows
both alike. For each compiled or captured sampler the script also reports the seconds it took to
set up and the largest |difference| of its composites from eager ones of the same generator
state, so a fast but wrong forward shows.

Students: `--students` (a run folder with distill/students, or a saved CGN folder); without it, a
distillation of its own in a temporary folder with the `tiny` preset's sizes (a few steps) but the
default preset's student architecture: speed depends on the architecture, not on how well the
students were trained, and the tiny preset shrinks the architecture.

    python benchmarks/sampling_speed.py --device cuda --modes eager graph \\
        --json docs/sampling_speed.json --md docs/sampling_speed.md
    python benchmarks/sampling_speed.py --device cpu --batch-sizes 1 256 --modes eager compile \\
        --json docs/sampling_speed_cpu.json --md docs/sampling_speed_cpu.md

The JSON and markdown are rewritten after every (mode, batch) row, so a run cut short by a
timeout leaves the rows it finished.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from skdcgn.api import load_cgn
from skdcgn.config import resolve_device
from skdcgn.cli import script_exit
from skdcgn.errors import SkdcgnError
from skdcgn.io import write_bytes, write_json
from skdcgn.metrics.cost import throughput
from skdcgn.models.cgn import CGN
from skdcgn.models.cgn_mnist import SHIPPED_TEACHERS, load_original_cgn_mnist, shipped_teacher_path
from skdcgn.models.sampling import SAMPLER_MODES, CGNSampler
from skdcgn.results.records import hardware_info

logger = logging.getLogger("sampling_speed")
MODES = tuple(m for m in SAMPLER_MODES if m != "auto")


def distill_tiny(teacher: CGN, run_dir: Path, device: str) -> CGN:
    """Students of the default preset's architecture, trained for the `tiny` preset's few steps."""
    from skdcgn.distill.trainer import DistillConfig, distill, preset

    arch = DistillConfig()
    cfg = preset("tiny", device=device, student_widths=arch.student_widths, benchmark=False,
                 student_extra_blocks=arch.student_extra_blocks, student_embed_dim=arch.student_embed_dim)
    distill(teacher, ["shape", "foreground", "background"], run_dir, cfg, progress=False, evaluate=False)
    return load_cgn(f"students:{run_dir}")


def load_students(path: str) -> CGN:
    """A saved CGN folder (with cgn.json), or a run folder of distilled students."""
    return load_cgn(path if (Path(path) / "cgn.json").is_file() else f"students:{path}")


def measure(models: dict[str, CGN], mode: str, batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    """One row: both CGNs' composites/s at `batch` through samplers of `mode`, timed interleaved."""
    row: dict = {"mode": mode, "batch": batch}
    fns, setup, diff, used = {}, {}, {}, {}
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(args.seed))
    for name, cgn in models.items():
        t0 = time.perf_counter()
        sampler = CGNSampler(cgn, batch, mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setup[name] = round(time.perf_counter() - t0, 2)
        used[name] = sampler.mode  # "eager" after a failed compile or capture (the sampler warned)
        if mode != "eager":
            x = sampler.sample(y, generator=torch.Generator().manual_seed(args.seed + 1)).composite
            ref = cgn.sample(y, generator=torch.Generator().manual_seed(args.seed + 1)).composite
            diff[name] = float((x.float() - ref.float()).abs().max())
        g = torch.Generator().manual_seed(args.seed + 2)
        fns[name] = (lambda s=sampler, g=g: s.sample(y, generator=g))
    speed = throughput(fns, batch, device, args.warmup, args.repeats, args.min_seconds)
    row.update({"composites_per_s": {k: round(v, 1) for k, v in speed.items()},
                "ratio_students_teacher": round(speed["students"] / speed["teacher"], 3),
                "setup_seconds": setup, "mode_used": used})
    if diff:
        row["max_abs_diff_vs_eager"] = diff
    logger.info(f"{mode:>7} batch {batch:>5}: teacher {speed['teacher']:,.0f}/s, students {speed['students']:,.0f}/s, "
                f"ratio {row['ratio_students_teacher']:.2f}x")
    return row


def markdown(record: dict) -> str:
    """The generated table of a record (students vs teacher composites/s per batch and mode)."""
    hw = record["hardware"]
    where = (f"GPU {hw['gpu']} (CUDA {hw.get('cuda')})" if hw.get("gpu") else
             f"CPU {hw['cpu']}, {hw['cpus_usable']} usable cores, {hw['torch_threads']} torch thread(s)")
    lines = [f"# Composites/s: students vs teacher, per batch and sampler mode ({record['device']})", "",
             "Generated by `benchmarks/sampling_speed.py` (do not edit by hand) on "
             f"{record['date']}:", "", f"    {record['command']}", "",
             f"- where: {where}; torch {hw['torch']}" + (f"; {record['note']}" if record["note"] else ""),
             f"- teacher: `{record['teacher']}` ({record['params']['teacher']:,} parameters); students: "
             f"{record['students']} ({record['params']['students']:,} parameters)",
             f"- timing: `skdcgn.metrics.cost.throughput`, teacher and students interleaved, median of "
             f"{record['repeats']} repeats of at least {record['min_seconds']} s after {record['warmup']} warm-up calls; "
             "a call is `CGNSampler.sample` (noise drawn on the CPU, forward, composite)", "",
             "| mode | batch | teacher composites/s | students composites/s | students / teacher "
             "| set-up s (teacher, students) | max abs diff vs eager (teacher, students) |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        c, s = r["composites_per_s"], r["setup_seconds"]
        d = r.get("max_abs_diff_vs_eager")
        fell = [k for k, v in r["mode_used"].items() if v != r["mode"]]
        mode = r["mode"] + (f" (fell back to eager: {', '.join(fell)})" if fell else "")
        diff = "–" if d is None else f"{d['teacher']:.1e}, {d['students']:.1e}"
        lines.append(f"| {mode} | {r['batch']:,} | {c['teacher']:,.0f} | {c['students']:,.0f} "
                     f"| {r['ratio_students_teacher']:.2f}× | {s['teacher']}, {s['students']} | {diff} |")
    for note in record["skipped"]:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement; returns (and writes) the JSON record."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N] (default: auto)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256, 8192], help="composites per call")
    p.add_argument("--modes", nargs="+", default=["eager", "compile", "graph"], choices=MODES,
                   help="sampler modes (graph: CUDA only, skipped with a note elsewhere)")
    p.add_argument("--teacher", default="double_colored", choices=tuple(SHIPPED_TEACHERS), help="shipped teacher")
    p.add_argument("--students", default=None,
                   help="a run folder with distill/students or a saved CGN folder (default: a tiny distillation "
                        "of the teacher, default-preset architecture, in a temporary folder)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per sampler before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per sampler (the median counts)")
    p.add_argument("--min-seconds", type=float, default=0.2, help="each timed repeat lasts at least this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line for the markdown (e.g. 'shared machine')")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0:
        raise SkdcgnError("--batch-sizes and --repeats must be at least 1, --warmup at least 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    # every sampler of one mode compiles `CGNSampler._forward` again: room for all of them
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(args.batch_sizes))

    teacher = load_original_cgn_mnist(shipped_teacher_path(args.teacher)).to(device).eval()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sampling-speed-") as tmp:
        if args.students:
            students, source = load_students(args.students), f"`{args.students}`"
        else:
            students = distill_tiny(teacher, Path(tmp), str(device))
            source = "a `tiny`-preset distillation with the default preset's student architecture (speed only)"
    students = students.to(device).eval()
    logger.info(f"students ready ({time.perf_counter() - t0:.0f} s)")
    models = {"teacher": teacher, "students": students}

    record = {"device": str(device), "hardware": hardware_info(device), "teacher": args.teacher, "students": source,
              "params": {k: m.get_num_params() for k, m in models.items()},
              "command": "python benchmarks/sampling_speed.py " + " ".join(shlex.quote(a) for a in
                                                                          (sys.argv[1:] if argv is None else argv)),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "note": args.note, "warmup": args.warmup, "repeats": args.repeats,
              "min_seconds": args.min_seconds, "rows": [], "skipped": []}
    def save() -> None:  # after every row, so a timeout keeps what finished
        if args.json:
            write_json(args.json, record)
        if args.md:
            write_bytes(args.md, markdown(record).encode())

    for mode in args.modes:
        if mode == "graph" and device.type != "cuda":
            record["skipped"].append(f"graph: not measured: a CUDA graph needs a CUDA device, this run is on {device}.")
            save()
            continue
        for batch in args.batch_sizes:
            try:
                record["rows"].append(measure(models, mode, batch, device, args))
            except (SkdcgnError, RuntimeError) as err:  # e.g. out of memory at a large batch: the other rows stand
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                record["skipped"].append(f"{mode} at batch {batch}: failed ({first})")
                logger.warning(record["skipped"][-1])
            save()
    print(markdown(record))
    return record


if __name__ == "__main__":
    script_exit(main, "sampling_speed.py")
