"""`skdcgn bench`: the measurements behind docs/results.md (and its JSON twin docs/results.json).

Students: given with `--students RUN_DIR`, or, without it, distilled by the bench itself with the
distillation API (`skdcgn.distill.distill`; bench `quick` uses its `quick` preset, a few minutes
on 2 CPU cores, and bench `full` its `default` preset) into `runs/bench-<preset>-<teacher>/`; a finished distillation there is
reused (its stages are skipped). `--no-distill` measures the teacher alone.

One call measures, in one process:
1. cost, teacher vs student CGN (when students are given), per mechanism and for composites:
   parameters, MACs per image, images/s at several batch sizes, peak memory (CUDA), ratios;
2. quality in the domain network's feature space (`skdcgn.metrics.domain`): FID / KID / intra-FID
   of composites (student vs teacher, teacher vs real, student vs real, and teacher vs teacher
   from another seed: the finite-sample floor) and of each mechanism's output (student vs teacher);
3. mask health per class for teacher and student;
4. any registered extra section (`register_section`), e.g. the invariant-classifier table.

Results of several runs live side by side: docs/results.json maps a run key (`<preset>-<device>`,
e.g. `quick-cpu`, `full-cuda`) to its record, and docs/results.md is rendered from all of them, so
a CPU quick run and a GPU full run appear together. Both files are written atomically.
"""
from __future__ import annotations

import logging
import dataclasses
import datetime as _dt
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .config import config_from_dict, load_presets, preset_values, resolve_device, set_threads, setting
from .errors import SkdcgnError
from .io import read_json, write_json
from .results.figures import plot_bench_cost_vs_fid
from .results.records import hardware_info
from .results.render import write_results

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    """Sizes of one `skdcgn bench` preset ("quick" or "full" in `PRESETS`, YAML files in
    skdcgn/configs/bench/; `bench_preset(name)` validates one into this class). Every field is
    required; ranges are its `setting` metadata.

    Fields:
        n_quality: images per set for FID/KID (balanced over classes).
        kid_subsets: number of random subsets KID is averaged over.
        kid_subset_size: images per KID subset and set (capped by the set sizes).
        mask_per_class: masks sampled per class for mask health.
        batch_sizes: batch sizes (images) at which throughput is measured.
        warmup: untimed calls per function before timing.
        repeats: timed repeats per function (the median is reported).
        min_seconds: each timed repeat lasts at least this long (seconds).
    """
    n_quality: int = setting(lo=10, hi=10**7, unit="images", help="images per set for FID/KID (balanced over classes)")
    kid_subsets: int = setting(lo=1, hi=10**5, unit="subsets", help="random subsets KID is averaged over")
    kid_subset_size: int = setting(lo=1, hi=10**7, unit="images", help="images per KID subset and set")
    mask_per_class: int = setting(lo=1, hi=10**6, unit="masks", help="masks per class for mask health")
    batch_sizes: tuple[int, ...] = setting(lo=1, hi=65_536, unit="images", help="batch sizes measured for throughput")
    warmup: int = setting(lo=0, hi=1000, unit="calls", help="untimed calls per function before timing")
    repeats: int = setting(lo=1, hi=10_000, unit="repeats", help="timed repeats per function (the median is reported)")
    min_seconds: float = setting(lo=0.0, hi=3600.0, unit="s", help="each timed repeat lasts at least this long")


# quick and full: skdcgn/configs/bench/<name>.yaml, field values of a BenchPreset
PRESETS: dict[str, dict] = load_presets("bench", BenchPreset)


def bench_preset(name: str) -> BenchPreset:
    """The validated `BenchPreset` of preset `name`; raises `SkdcgnError` for an unknown name."""
    return config_from_dict(BenchPreset, preset_values(PRESETS, name), f"preset {name}")


DISTILL_PRESET = {"quick": "quick", "full": "default"}  # bench preset → skdcgn.distill preset
TEACHER_VARIANT = {"colored": "colored", "double_colored": "double_colored", "wildlife": "wildlife"}


# ---- extra sections (hooks) ---------------------------------------------------------------------

@dataclasses.dataclass
class BenchContext:
    """What a section hook gets: the loaded models, the settings, the results so far."""

    preset: str
    settings: BenchPreset
    device: torch.device
    teacher_name: str
    teacher: object
    student: object | None
    students_dir: str | None
    record: dict


# A hook returns None (nothing to add) or {"title": str, "markdown": str, "data": JSON-able}.
SectionHook = Callable[[BenchContext], "dict | None"]
SECTION_HOOKS: dict[str, SectionHook] = {}


def register_section(name: str, hook: SectionHook) -> None:
    """Append a section to every bench run (e.g. the invariant-classifier accuracy table)."""
    SECTION_HOOKS[name] = hook


# ---- environment --------------------------------------------------------------------------------


# ---- quality ------------------------------------------------------------------------------------

@torch.no_grad()
def sample_all(cgn, labels: torch.Tensor, seed: int, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """mask, foreground, background, composite for `labels` (no counterfactuals), seeded, on CPU."""
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"shape": [], "foreground": [], "background": [], "composite": []}
    for y in labels.split(batch_size):
        m, f, b, x = cgn.sample(y, generator=g)
        for k, t in zip(parts, (m, f, b, x)):
            parts[k].append(t.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _images_of(unit: str, t: torch.Tensor) -> torch.Tensor:
    from .metrics.masks import render_mask

    return render_mask(t) if unit == "shape" else t


def quality_section(teacher, student, variant: str, settings: BenchPreset, device: torch.device) -> dict:
    """FID/KID/intra-FID in the domain network's space; mask health (see the module doc)."""
    from .data import load_variant
    from .metrics.domain import load_domain_extractor
    from .metrics.fid import extract_features, fid_kid, intra_fid
    from .metrics.masks import mask_health

    ext = load_domain_extractor(device)
    n = settings.n_quality
    labels = torch.arange(n) % teacher.n_classes
    sets: dict[str, dict[str, torch.Tensor]] = {"teacher": sample_all(teacher, labels, seed=1),
                                                 "teacher_seed2": sample_all(teacher, labels, seed=2)}
    if student is not None:
        sets["student"] = sample_all(student, labels, seed=1)
    real_x, real_y = load_variant(variant, "test_iid")
    real_x, real_y = real_x[:n], real_y[:n]
    logger.info(f"quality: sampled {n} images per set; real = {variant}/test_iid ({len(real_x)})")

    feats = {(name, unit): extract_features(ext, _images_of(unit, t), device=device)
             for name, parts in sets.items() for unit, t in parts.items()}
    feats[("real", "composite")] = extract_features(ext, real_x, device=device)
    lab = {"teacher": labels, "teacher_seed2": labels, "student": labels, "real": real_y}

    pairs = [("teacher", "teacher_seed2", "teacher vs teacher (seed 2): floor"), ("teacher", "real", "teacher vs real")]
    if student is not None:
        pairs = [("student", "teacher_seed2", "student vs teacher"), ("student", "real", "student vs real")] + pairs
    rows = []
    for unit in ("composite", "shape", "foreground", "background"):
        for a, b, title in pairs:
            if (b, unit) not in feats or (a, unit) not in feats:
                continue  # real data has no mechanism outputs
            fa, fb = feats[(a, unit)], feats[(b, unit)]
            row = {"unit": unit, "pair": title, **fid_kid(fa, fb, settings.kid_subsets, settings.kid_subset_size)}
            row["intra_fid"] = intra_fid(fa, lab[a], fb, lab[b])
            rows.append(row)
            logger.info(f"quality {unit:<10} {title:<36} FID {row['fid']:8.3f}  KID {row['kid'] * 1e3:7.3f}e-3  "
                f"intra-FID {row['intra_fid']['mean']:.3f}")
    health = {"teacher": mask_health(teacher, ext.predict, settings.mask_per_class, seed=3)}
    if student is not None:
        health["student"] = mask_health(student, ext.predict, settings.mask_per_class, seed=3)
    real_read = float((ext.predict(real_x) == real_y).float().mean())
    return {"feature_space": "domain_net (64-d penultimate features; skdcgn.metrics.domain)",
            "n_per_set": n, "real": f"{variant}/test_iid", "domain_net_accuracy_on_real": real_read,
            "kid_subsets": settings.kid_subsets, "kid_subset_size": min(settings.kid_subset_size, n),
            "rows": rows, "mask_health": health}


# ---- the run ------------------------------------------------------------------------------------

def distill_students(preset: str, teacher_name: str, teacher, run_dir: str | os.PathLike, device: str) -> tuple[str, float]:
    """Distil the three mechanisms with the distillation API's preset `preset`; (run dir, seconds)."""
    from .distill.trainer import distill, preset as distill_preset

    t0 = time.time()
    logger.info(f"distilling students (distill preset {DISTILL_PRESET[preset]!r}) into {run_dir}")
    cfg = distill_preset(DISTILL_PRESET[preset], device=device)
    distill(teacher, ["shape", "foreground", "background"], run_dir, cfg, progress=False, evaluate=False)
    return str(run_dir), time.time() - t0


def run_bench(preset: str = "quick", device: str = "cpu", teacher: str = "double_colored",
              students: str | None = None, out: str | os.PathLike = "docs/results.md",
              command: str | None = None, threads: int | None = None, quality: bool = True,
              distill: bool = True, distill_dir: str | os.PathLike | None = None) -> dict:
    """Measure, merge into `<out>.json` under the key `<preset>-<device type>`, render `out`.

    Without `students`, students are distilled first (unless `distill` is False): see the module doc.
    """
    from .api import load_cgn
    from .metrics.cost import cost_table

    if preset not in PRESETS:
        raise SkdcgnError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if teacher not in TEACHER_VARIANT:
        raise SkdcgnError(f"--teacher must be a shipped teacher ({', '.join(TEACHER_VARIANT)}), got {teacher!r}")
    settings = bench_preset(preset)
    dev = resolve_device(device)
    set_threads(threads, "--threads")
    t0 = time.time()
    t_cgn = load_cgn(teacher).to(dev).eval()
    distill_seconds = None
    if not students and distill:
        run_dir = distill_dir or Path("runs") / f"bench-{preset}-{teacher}"
        students, distill_seconds = distill_students(preset, teacher, t_cgn, run_dir, str(dev))
    s_cgn = load_cgn(f"students:{students}").to(dev).eval() if students else None
    models = {"teacher": t_cgn} if s_cgn is None else {"teacher": t_cgn, "student": s_cgn}
    record: dict = {
        # an explicit thread count gets its own record: 1 and 2 threads are different regimes on a CPU
        "key": f"{preset}-{dev.type}" + (f"-{threads}thread" + ("s" if threads > 1 else "") if threads else ""),
        "preset": preset, "settings": dataclasses.asdict(settings),
        "command": command or f"skdcgn bench --preset {preset} --device {device}",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware_info(dev), "teacher": teacher, "students": str(students) if students else None,
        "params": {k: m.get_num_params() for k, m in models.items()},
        "distill_seconds": None if distill_seconds is None else round(distill_seconds, 1),
    }
    logger.info(f"bench {record['key']}: teacher {teacher}" + (f", students {students}" if students else ", no students"))
    record["cost"] = cost_table(models, dev, settings.batch_sizes, warmup=settings.warmup, repeats=settings.repeats,
                                min_seconds=settings.min_seconds)
    if quality:
        record["quality"] = quality_section(t_cgn, s_cgn, TEACHER_VARIANT[teacher], settings, dev)
    ctx = BenchContext(preset, settings, dev, teacher, t_cgn, s_cgn, str(students) if students else None, record)
    record["sections"] = {}
    for name, hook in SECTION_HOOKS.items():
        section = hook(ctx)
        if section:
            record["sections"][name] = section
    record["seconds"] = round(time.time() - t0, 1)
    figure = Path("images") / f"bench-{record['key']}.png"  # beside `out`, linked from its markdown
    if plot_bench_cost_vs_fid(record, Path(out).parent / figure):
        record["figure"] = figure.as_posix()
    write_results(out, record)
    logger.info(f"wrote {out} and {Path(out).with_suffix('.json')} ({record['seconds']:.0f}s)")
    return record


# ---- markdown -----------------------------------------------------------------------------------


# ---- ImageNet track: full-size random-weight CGN-ImageNet teacher vs 256-px students -----------

def imagenet_models(image_size: int = 256, seed: int = 0) -> dict:
    """The full-size CGN-ImageNet teacher (three BigGAN-deep-256 + the full U2-Net) and a CGN of
    three ImageNet students, all with random weights: cost does not depend on the weights."""
    from .models.cgn import CGN, MECHANISMS
    from .models.imagenet import ImageNetMechanismConfig, random_cgn
    from .models.students import imagenet_student_config, make_student

    def teacher_config(m: str) -> ImageNetMechanismConfig:
        cfg = ImageNetMechanismConfig(mechanism=m)
        cfg.validate()
        return cfg

    teacher = random_cgn(teacher_config, seed=seed)
    torch.manual_seed(seed)
    students = CGN(*(make_student(imagenet_student_config(m, image_size)) for m in MECHANISMS)).eval()
    return {"teacher": teacher, "student": students}


def run_imagenet_bench(device: str = "cpu", batch_sizes: tuple[int, ...] = (1,), repeats: int = 2, warmup: int = 1,
                       units: tuple[str, ...] = ("shape", "foreground", "background", "composite"),
                       out: str | os.PathLike | None = "docs/imagenet_results.json", threads: int | None = None) -> dict:
    """Parameters, MACs and images/s of the CGN-ImageNet teacher vs the 256-px students.

    Uses `metrics.cost.cost_table` (interleaved timing, MACs from torch's FLOP counter, one image
    per MAC count). On a CPU the teacher needs seconds per composite: keep batches and repeats
    small. The record is merged into `out` (a JSON file keyed by device type) when given.
    """
    from .metrics.cost import cost_table

    dev = resolve_device(device)
    set_threads(threads, "--threads")
    t0 = time.time()
    models = imagenet_models()
    cost = cost_table(models, dev, batch_sizes, units=units, warmup=warmup, repeats=repeats, min_seconds=0.0,
                      mac_batch=1)
    record = {"key": f"imagenet-256-{dev.type}", "hardware": hardware_info(dev),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "params": {k: m.get_num_params() for k, m in models.items()}, "cost": cost,
              "seconds": round(time.time() - t0, 1)}
    for r in cost["ratios"]:
        logger.info(f"{r['unit']}: params {r['params']:.1f}x, MACs {r['macs']:.1f}x, speed "
            + ", ".join(f"batch {b}: {v:.1f}x" for b, v in r["speed"].items()))
    if out is not None:
        out = Path(out)
        runs = read_json(out).get("runs", {}) if out.is_file() else {}
        runs[record["key"]] = record
        write_json(out, {"runs": runs})
        logger.info(f"wrote {out} ({record['seconds']:.0f}s)")
    return record


