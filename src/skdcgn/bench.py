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

import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .config import resolve_device, set_threads, usable_cpus
from .errors import SkdcgnError
from .io import read_json, write_bytes, write_json


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    n_quality: int            # images per set for FID/KID (balanced over classes)
    kid_subsets: int
    kid_subset_size: int
    mask_per_class: int       # masks per class for mask health
    batch_sizes: tuple[int, ...]
    warmup: int
    repeats: int
    min_seconds: float        # each timed repeat lasts at least this long


PRESETS = {
    "quick": BenchPreset(n_quality=2000, kid_subsets=50, kid_subset_size=500, mask_per_class=100,
                         batch_sizes=(1, 64, 256), warmup=2, repeats=5, min_seconds=0.05),
    "full": BenchPreset(n_quality=10_000, kid_subsets=100, kid_subset_size=1000, mask_per_class=500,
                        batch_sizes=(1, 64, 256, 1024), warmup=3, repeats=10, min_seconds=0.2),
}
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
    log: Callable[[str], None]


# A hook returns None (nothing to add) or {"title": str, "markdown": str, "data": JSON-able}.
SectionHook = Callable[[BenchContext], "dict | None"]
SECTION_HOOKS: dict[str, SectionHook] = {}


def register_section(name: str, hook: SectionHook) -> None:
    """Append a section to every bench run (e.g. the invariant-classifier accuracy table)."""
    SECTION_HOOKS[name] = hook


# ---- environment --------------------------------------------------------------------------------

def hardware_info(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = usable_cpus()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "skdcgn": __version__, "device": str(device), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


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


def quality_section(teacher, student, variant: str, settings: BenchPreset, device: torch.device,
                    log: Callable[[str], None]) -> dict:
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
    log(f"quality: sampled {n} images per set; real = {variant}/test_iid ({len(real_x)})")

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
            log(f"quality {unit:<10} {title:<36} FID {row['fid']:8.3f}  KID {row['kid'] * 1e3:7.3f}e-3  "
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

def distill_students(preset: str, teacher_name: str, teacher, run_dir: str | os.PathLike, device: str,
                     log: Callable[[str], None] = print) -> tuple[str, float]:
    """Distil the three mechanisms with the distillation API's preset `preset`; (run dir, seconds)."""
    from .distill.trainer import distill, preset as distill_preset

    t0 = time.time()
    log(f"distilling students (distill preset {DISTILL_PRESET[preset]!r}) into {run_dir}")
    cfg = distill_preset(DISTILL_PRESET[preset], device=device)
    distill(teacher, ["shape", "foreground", "background"], run_dir, cfg, progress=False, evaluate=False)
    return str(run_dir), time.time() - t0


def run_bench(preset: str = "quick", device: str = "cpu", teacher: str = "double_colored",
              students: str | None = None, out: str | os.PathLike = "docs/results.md",
              command: str | None = None, threads: int | None = None, quality: bool = True,
              distill: bool = True, distill_dir: str | os.PathLike | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Measure, merge into `<out>.json` under the key `<preset>-<device type>`, render `out`.

    Without `students`, students are distilled first (unless `distill` is False): see the module doc.
    """
    from .api import load_cgn
    from .metrics.cost import cost_table

    if preset not in PRESETS:
        raise SkdcgnError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if teacher not in TEACHER_VARIANT:
        raise SkdcgnError(f"--teacher must be a shipped teacher ({', '.join(TEACHER_VARIANT)}), got {teacher!r}")
    settings = PRESETS[preset]
    dev = resolve_device(device)
    set_threads(threads, "--threads")
    t0 = time.time()
    t_cgn = load_cgn(teacher).to(dev).eval()
    distill_seconds = None
    if not students and distill:
        run_dir = distill_dir or Path("runs") / f"bench-{preset}-{teacher}"
        students, distill_seconds = distill_students(preset, teacher, t_cgn, run_dir, str(dev), log)
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
    log(f"bench {record['key']}: teacher {teacher}" + (f", students {students}" if students else ", no students"))
    record["cost"] = cost_table(models, dev, settings.batch_sizes, warmup=settings.warmup, repeats=settings.repeats,
                                min_seconds=settings.min_seconds, log=log)
    if quality:
        record["quality"] = quality_section(t_cgn, s_cgn, TEACHER_VARIANT[teacher], settings, dev, log)
    ctx = BenchContext(preset, settings, dev, teacher, t_cgn, s_cgn, str(students) if students else None, record, log)
    record["sections"] = {}
    for name, hook in SECTION_HOOKS.items():
        section = hook(ctx)
        if section:
            record["sections"][name] = section
    record["seconds"] = round(time.time() - t0, 1)
    write_results(out, record)
    log(f"wrote {out} and {Path(out).with_suffix('.json')} ({record['seconds']:.0f}s)")
    return record


def write_results(out: str | os.PathLike, record: dict, supersedes: Callable[[dict], bool] | None = None) -> list[str]:
    """Merge `record` into the JSON twin of `out` (by its key) and re-render the markdown.

    supersedes(old) -> True drops an older record that `record` makes redundant; returns their keys."""
    out = Path(out)
    twin = out.with_suffix(".json")
    runs: dict = {}
    if twin.is_file():
        try:
            runs = read_json(twin).get("runs", {})
        except SkdcgnError:
            runs = {}  # a broken twin is replaced, not trusted
        if not isinstance(runs, dict):
            runs = {}
    dropped = [k for k, r in runs.items() if supersedes is not None and k != record["key"] and supersedes(r)]
    runs = {k: r for k, r in runs.items() if k not in dropped}
    runs[record["key"]] = record
    doc = {"skdcgn_version": __version__, "runs": dict(sorted(runs.items()))}
    write_json(twin, doc)
    write_bytes(out, render_markdown(doc).encode())
    return dropped


# ---- markdown -----------------------------------------------------------------------------------

def _n(x: float | int | None, digits: int = 0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def _macs(x: int) -> str:
    return f"{x / 1e6:,.2f} M"


def _ratio(x: float) -> str:
    return f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


def render_markdown(doc: dict) -> str:
    lines = ["# skdcgn results", "",
             "Written by `skdcgn bench` and `skdcgn run --record`; do not edit by hand. Every number in the README "
             "comes from here; its accuracy tables are copied from the summaries.",
             "The JSON twin (`results.json`) holds the same numbers, unrounded.", ""]
    from .pipeline import render_summaries

    lines += render_summaries(doc["runs"])
    for key, rec in doc["runs"].items():
        lines += render_run(rec)
    return "\n".join(lines).rstrip() + "\n"


def render_run(rec: dict) -> list[str]:
    if rec.get("kind") == "pipeline":  # recorded by `skdcgn run --record`
        from .pipeline import render_record

        return render_record(rec)
    hw = rec["hardware"]
    L = [f"## Run `{rec['key']}`", "",
         f"- command: `{rec['command']}`",
         f"- date: {rec['date']}; skdcgn {hw['skdcgn']}; torch {hw['torch']}; Python {hw['python']}",
         f"- hardware: {hw['cpu']}, {hw['cpus_usable']} usable cores of {hw['cpu_count']}, "
         f"{hw['torch_threads']} torch threads" + (f"; GPU {hw['gpu']} (CUDA {hw.get('cuda')})" if hw.get("gpu") else "; no GPU used"),
         f"- teacher: `{rec['teacher']}`; students: " + (f"`{rec['students']}`" if rec["students"] else "none")
         + (f" (distilled by this run, finished stages reused: {rec['distill_seconds']:.0f} s)" if rec.get("distill_seconds") else ""),
         f"- wall time: {rec.get('seconds', 0):.0f} s", ""]
    L += _render_cost(rec["cost"])
    if rec.get("quality"):
        L += _render_quality(rec["quality"])
    for section in rec.get("sections", {}).values():
        L += [f"### {section['title']}", "", section["markdown"].rstrip(), ""]
    return L


def _render_cost(cost: dict) -> list[str]:
    bs = cost["batch_sizes"]
    rows = cost["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    L = [f"### Cost ({cost['device']}, {cost['threads']} threads)", "",
         f"MACs: torch's FLOP counter (FLOPs / 2; convolutions and matmuls). images/s: median of "
         f"{cost['repeats']} timed repeats after {cost['warmup']} warm-up calls, teacher and student interleaved. "
         "`composite` = `CGN.sample` (three mechanisms, noise, texture shift, composition)."
         + (f" **ratio** rows: {' ÷ '.join(models)} for params and MACs (how many times smaller), "
            f"{' ÷ '.join(reversed(models))} for images/s (speed-up; below 1 means slower)." if len(models) == 2 else ""),
         ""]
    head = ["unit", "model", "params", "MACs / image"] + [f"img/s @ {b}" for b in bs]
    has_mem = any(v is not None for r in rows for v in r["peak_memory_bytes"].values())
    if has_mem:
        head.append(f"peak MiB @ {bs[-1]}")
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_unit: dict[str, list[dict]] = {}
    for r in rows:
        by_unit.setdefault(r["unit"], []).append(r)
    ratios = {r["unit"]: r for r in cost.get("ratios", [])}
    for unit, rs in by_unit.items():
        for r in rs:
            cells = [unit, r["model"], _n(r["params"]), _macs(r["macs_per_image"])]
            cells += [_n(r["images_per_s"][_k(r["images_per_s"], b)]) for b in bs]
            if has_mem:
                v = r["peak_memory_bytes"][_k(r["peak_memory_bytes"], bs[-1])]
                cells.append("n/a" if v is None else f"{v / 2**20:,.1f}")
            L.append("| " + " | ".join(cells) + " |")
        if unit in ratios and len(models) == 2:
            q = ratios[unit]
            cells = [unit, "**ratio**", f"**{_ratio(q['params'])}**", f"**{_ratio(q['macs'])}**"]
            cells += [f"**{_ratio(q['speed'][_k(q['speed'], b)])}**" for b in bs]
            if has_mem:
                cells.append("")
            L.append("| " + " | ".join(cells) + " |")
    if not has_mem:
        L += ["", "Peak memory: n/a on CPU (no reliable per-call measure; see `skdcgn.metrics.cost`)."]
    return L + [""]


def _k(d: dict, b: int):
    """JSON turns int keys into strings; accept both."""
    return b if b in d else str(b)


def _render_quality(q: dict) -> list[str]:
    L = ["### Quality: FID / KID in the domain network's feature space", "",
         f"{q['feature_space']}. {q['n_per_set']:,} images per set, classes balanced; real = `{q['real']}` "
         f"(the domain network reads its digits with accuracy {q['domain_net_accuracy_on_real']:.3f}). "
         f"KID: unbiased MMD² (cubic kernel), mean ± std over {q['kid_subsets']} subsets of {q['kid_subset_size']}, "
         "shown × 10³. intra-FID: mean over classes of the per-class FID. The teacher-vs-teacher row "
         "(another seed) is the floor that finite samples give: a perfect student reaches it, not 0. "
         "Masks are rendered as white digits on black.", "",
         "| output | pair | FID | KID × 10³ | intra-FID |", "|---|---|---|---|---|"]
    for r in q["rows"]:
        L.append(f"| {r['unit']} | {r['pair']} | {r['fid']:.3f} | {r['kid'] * 1e3:.3f} ± {r['kid_std'] * 1e3:.3f} | "
                 f"{_n(r['intra_fid']['mean'], 3)} |")
    comp = [r for r in q["rows"] if r["unit"] == "composite"]
    if comp:
        classes = list(comp[0]["intra_fid"]["per_class"])
        L += ["", "Per-class FID of composites (intra-FID's terms):", "",
              "| pair | " + " | ".join(str(c) for c in classes) + " |", "|---|" + "---|" * len(classes)]
        for r in comp:
            pc = r["intra_fid"]["per_class"]
            L.append(f"| {r['pair']} | " + " | ".join(_n(pc[c], 2) for c in classes) + " |")
    L += [""] + _render_masks(q["mask_health"])
    return L


def _render_masks(health: dict) -> list[str]:
    names = list(health)
    first = health[names[0]]
    t = first["thresholds"]
    L = ["### Mask health per class", "",
         "area: mean mask value; binary: 1 − mean 4·m·(1 − m); soft: fraction of pixels in (0.1, 0.9); "
         "read: fraction of masks (as white digits on black) that the domain network reads as the intended "
         f"digit. Flags: empty (area < {t['min_area']}), full (area > {t['max_area']}), blurry "
         f"(binary < {t['min_binariness']}), wrong_digit (read < {t['min_readable']}).", ""]
    head = ["class"] + [f"{n} {c}" for n in names for c in ("area", "binary", "soft", "read", "flags")]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per = {n: {r["class"]: r for r in health[n]["per_class"]} for n in names}
    for k in sorted(per[names[0]]):
        cells = [str(k)]
        for n in names:
            r = per[n].get(k)
            cells += (["–"] * 5 if r is None else
                      [f"{r['area']:.3f}", f"{r['binariness']:.3f}", f"{r['soft_fraction']:.3f}", f"{r['readable']:.2f}",
                       ", ".join(r["flags"]) or "ok"])
        L.append("| " + " | ".join(cells) + " |")
    cells = ["mean"]
    for n in names:
        m = health[n]["mean"]
        cells += [f"{m['area']:.3f}", f"{m['binariness']:.3f}", f"{m['soft_fraction']:.3f}", f"{m['readable']:.2f}",
                  f"{len(health[n]['flagged'])} flagged"]
    L.append("| " + " | ".join(cells) + " |")
    return L + [""]


def command_line() -> str:
    return "skdcgn " + " ".join(sys.argv[1:])


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
                       out: str | os.PathLike | None = "docs/imagenet_results.json", threads: int | None = None,
                       log: Callable[[str], None] = print) -> dict:
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
                      mac_batch=1, log=log)
    record = {"key": f"imagenet-256-{dev.type}", "hardware": hardware_info(dev),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "params": {k: m.get_num_params() for k, m in models.items()}, "cost": cost,
              "seconds": round(time.time() - t0, 1)}
    for r in cost["ratios"]:
        log(f"{r['unit']}: params {r['params']:.1f}x, MACs {r['macs']:.1f}x, speed "
            + ", ".join(f"batch {b}: {v:.1f}x" for b, v in r["speed"].items()))
    if out is not None:
        out = Path(out)
        runs = read_json(out).get("runs", {}) if out.is_file() else {}
        runs[record["key"]] = record
        write_json(out, {"runs": runs})
        log(f"wrote {out} ({record['seconds']:.0f}s)")
    return record


def render_imagenet(record: dict) -> str:
    """A markdown table of one `run_imagenet_bench` record."""
    cost = record["cost"]
    b = cost["batch_sizes"]
    lines = ["| unit | model | params | MACs / image | " + " | ".join(f"images/s (batch {x})" for x in b) + " |",
             "|---|---|---:|---:|" + "---:|" * len(b)]
    for r in cost["rows"]:
        macs = r["macs_per_image"]
        lines.append(f"| {r['unit']} | {r['model']} | {r['params']:,} | "
                     f"{f'{macs / 1e9:,.1f} G' if macs >= 1e9 else f'{macs / 1e6:,.0f} M'} | "
                     + " | ".join(f"{_at_batch(r['images_per_s'], x):.3g}" for x in b) + " |")
    lines += ["", "| unit | params ratio | MACs ratio | " + " | ".join(f"speed-up (batch {x})" for x in b) + " |",
              "|---|---:|---:|" + "---:|" * len(b)]
    for r in cost["ratios"]:
        lines.append(f"| {r['unit']} | {r['params']:.1f}× | {r['macs']:.0f}× | "
                     + " | ".join(f"{_at_batch(r['speed'], x):.1f}×" for x in b) + " |")
    return "\n".join(lines) + "\n"


def _at_batch(values: dict, batch: int) -> float:
    """A per-batch-size value; JSON turns the int keys of a record read back from disk into strings."""
    return values[batch] if batch in values else values[str(batch)]
