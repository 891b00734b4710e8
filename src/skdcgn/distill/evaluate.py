"""After distillation: students vs teacher on held-out (u, y), side-by-side grids, speed.

Writes `runs/NAME/distill/eval.json` (merged with earlier entries) and
`compare_<mechanism>.png` / `compare_composite.png` (teacher left, student right, same inputs;
composites with the same noise and the same texture-shift seed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import Tensor, nn

from ..errors import SkdcgnError, first_line
from ..grids import image_grid, save_png, stack_grids
from ..io import MANIFEST, load_tensors, read_json, write_json
from ..metrics.masks import sharpness
from ..models.cgn import CGN, MECHANISMS
from ..metrics.cost import throughput, unit_fn
from ..models.pretrained import load_model

EVAL_FILE = "eval.json"
SNAPSHOTS = "snapshots"  # in a student's folder: its weights at each sample step (`learning_curve`)


class EvalSettings(Protocol):
    """What the evaluation reads of a distillation config (`trainer.DistillConfig` has it)."""

    n_eval: int      # samples per mechanism for held-out L1 / IoU
    eval_seed: int   # seed of those samples and of the grids
    benchmark: bool  # also time teacher and students


def mask_iou(a: Tensor, b: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-image IoU of two masks thresholded at `threshold` ([N, 1, H, W] -> [N]); empty ∪ counts as 1."""
    a, b = (a > threshold).flatten(1), (b > threshold).flatten(1)
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def compare_mechanism(teacher: nn.Module, student: nn.Module, name: str, n: int, seed: int,
                      batch_size: int = 500) -> dict[str, float]:
    """Held-out errors of a student against the teacher for the same (u, y).

    `n` inputs are drawn from `seed`: y uniform in [0, n_classes), u standard normal
    [n, latent_dim]. Returns {"l1": mean absolute per-pixel difference (mask values in [0, 1],
    textures in [-1, 1]), "n", "seed"}, plus, when `name` is "shape", "iou@0.5" (mean
    `mask_iou`) and the masks' `metrics.masks.sharpness` of student and teacher ("binariness",
    "soft_fraction", "teacher_binariness", "teacher_soft_fraction").
    """
    device = next(student.parameters()).device
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, student.config.n_classes, (n,), generator=g)
    u = torch.randn(n, student.config.latent_dim, generator=g)
    l1, iou, masks_t, masks_s = [], [], [], []
    for s in range(0, n, batch_size):
        ub, yb = u[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
        t, o = teacher(ub, yb).float().cpu(), student(ub, yb).float().cpu()
        l1.append((t - o).abs().flatten(1).mean(1))
        if name == "shape":
            iou.append(mask_iou(t, o))
            masks_t.append(t)
            masks_s.append(o)
    out = {"l1": torch.cat(l1).mean().item(), "n": n, "seed": seed}
    if iou:
        out["iou@0.5"] = torch.cat(iou).mean().item()
        out.update(sharpness(torch.cat(masks_s)))
        out.update({f"teacher_{k}": v for k, v in sharpness(torch.cat(masks_t)).items()})
    return out


CURVE_SAMPLES = 500  # held-out inputs per snapshot: a learning curve is a trend, the final entry is exact


@torch.no_grad()
def learning_curve(teacher: nn.Module, student: nn.Module, name: str, snapshots: Sequence[Path], n: int, seed: int,
                   batch_size: int = 500) -> list[dict[str, float]]:
    """`compare_mechanism` for each weight snapshot of a student (`snapshots/step_<N>.safetensors`,
    written by the trainer at each sample step), in step order: [{"step", "l1", ...}]. `student` is
    a model of the snapshots' architecture; its weights are restored afterwards. Raises
    `SkdcgnError` for a snapshot that does not fit it."""
    final = {k: v.clone() for k, v in student.state_dict().items()}
    curve = []
    try:
        for path in sorted(snapshots, key=lambda p: int(p.stem.split("_")[-1])):
            student.load_state_dict(load_tensors(path), strict=True)
            entry = compare_mechanism(teacher, student.eval(), name, n, seed, batch_size)
            curve.append({"step": int(path.stem.split("_")[-1]),
                          **{k: v for k, v in entry.items() if k not in ("n", "seed")}})
    except (RuntimeError, KeyError, ValueError) as e:
        raise SkdcgnError(f"{path}: not a snapshot of this student ({first_line(e)})") from None
    finally:
        student.load_state_dict(final)
    return curve


def composites_per_second(cgn: CGN, batch_size: int = 256, repeats: int = 5) -> float:
    """Composites per second of `cgn.sample` (noise, three mechanisms, shift, compose) at
    `batch_size`: the median of `repeats` timings by the one timer, `metrics.cost.throughput`."""
    fn = unit_fn(cgn, "composite", batch_size, cgn.device)
    return throughput({"cgn": fn}, batch_size, cgn.device, warmup=1, repeats=repeats)["cgn"]


@torch.no_grad()
def evaluate_distillation(teacher_cgn: CGN, run_dir: str | os.PathLike, config: EvalSettings,
                          mechanisms: Sequence[str] = MECHANISMS, timings: dict | None = None) -> dict:
    """Compare each student in `mechanisms` (and, when all three exist, their composites) with
    the teacher; merge the result into `run_dir/distill/eval.json` and return it."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "distill"
    path = out_dir / EVAL_FILE
    result = read_json(path) if path.is_file() else {}
    result.setdefault("mechanisms", {})
    device = teacher_cgn.device
    inputs = _evaluation_inputs(out_dir, config, device)
    if not timings and result.get("inputs") == inputs and all(m in result["mechanisms"] for m in mechanisms):
        return result  # the same students, evaluated the same way: a resumed run does not re-measure them
    teacher = teacher_cgn.mechanisms()
    students = {}
    for m in MECHANISMS:
        folder = out_dir / "students" / m
        if (folder / "config.json").is_file():
            students[m] = load_model(folder).to(device).eval()
    n_classes = min(teacher_cgn.n_classes, 10)  # grid columns: the first 10 classes (ImageNet has 1000)
    eval_batch = min(500, getattr(config, "query_batch_size", 500))  # ImageNet teachers: smaller batches
    y_grid = torch.arange(2 * n_classes) % n_classes  # two samples per class
    for m in mechanisms:
        s = students[m]
        entry = compare_mechanism(teacher[m], s, m, config.n_eval, config.eval_seed, batch_size=eval_batch)
        snapshots = list((out_dir / "students" / m / SNAPSHOTS).glob("step_*.safetensors"))
        if snapshots:
            entry["curve"] = learning_curve(teacher[m], s, m, snapshots, min(config.n_eval, CURVE_SAMPLES),
                                            config.eval_seed, batch_size=eval_batch)
        entry["params"] = s.get_num_params()
        entry["teacher_params"] = teacher[m].get_num_params()
        previous = result["mechanisms"].get(m, {})
        entry.update(timings[m] if timings and m in timings else  # a reused student keeps its recorded times
                     {k: previous[k] for k in ("query_s", "train_s") if k in previous})
        result["mechanisms"][m] = entry
        g = torch.Generator().manual_seed(config.eval_seed)
        u = torch.randn(len(y_grid), s.config.latent_dim, generator=g).to(device)
        t_img, s_img = teacher[m](u, y_grid.to(device)), s(u, y_grid.to(device))
        save_png(stack_grids([image_grid(t_img, n_classes, title=f"teacher {m}"),
                              image_grid(s_img, n_classes, title=f"student {m}")]), out_dir / f"compare_{m}.png")
    if len(students) == len(MECHANISMS):
        student_cgn = CGN(*(students[m] for m in MECHANISMS)).eval()
        n, l1 = config.n_eval, []
        g_t, g_s = torch.Generator().manual_seed(config.eval_seed), torch.Generator().manual_seed(config.eval_seed)
        y = torch.arange(n) % teacher_cgn.n_classes
        for start in range(0, n, eval_batch):
            x_t = teacher_cgn.sample(y[start:start + eval_batch], generator=g_t).composite.cpu()
            x_s = student_cgn.sample(y[start:start + eval_batch], generator=g_s).composite.cpu()
            l1.append((x_t - x_s).abs().flatten(1).mean(1))
        grid_y = torch.arange(3 * n_classes) % n_classes
        x_t = teacher_cgn.sample(grid_y, generator=torch.Generator().manual_seed(config.eval_seed + 1)).composite
        x_s = student_cgn.sample(grid_y, generator=torch.Generator().manual_seed(config.eval_seed + 1)).composite
        save_png(stack_grids([image_grid(x_t, n_classes, title="teacher composites"),
                              image_grid(x_s, n_classes, title="student composites")]), out_dir / "compare_composite.png")
        result["composite"] = {
            "l1": torch.cat(l1).mean().item(), "n": n, "seed": config.eval_seed,
            "params": {"teacher": teacher_cgn.get_num_params(), "students": student_cgn.get_num_params()},
        }
        if config.benchmark:
            speed_t, speed_s = composites_per_second(teacher_cgn), composites_per_second(student_cgn)
            result["composite"]["composites_per_s"] = {
                "teacher": round(speed_t, 1), "students": round(speed_s, 1), "speedup": round(speed_s / speed_t, 2),
                "batch_size": 256, "device": str(device), "threads": torch.get_num_threads(),
                "note": "best of 5 batches, same process; noisy on a shared machine"}
    result["inputs"] = inputs
    write_json(path, result)
    return result


def _evaluation_inputs(out_dir: Path, config: EvalSettings, device: torch.device) -> dict:
    """What an evaluation depends on: each finished student (its manifest's hash names its config,
    transfer set and hence teacher), the held-out draw and, for the speed numbers, where they ran."""
    students = {}
    for m in MECHANISMS:
        manifest = out_dir / "students" / m / MANIFEST
        if manifest.is_file():
            students[m] = read_json(manifest).get("config_hash")
    inputs = {"students": students, "n_eval": config.n_eval, "eval_seed": config.eval_seed, "benchmark": config.benchmark}
    if config.benchmark:
        inputs.update(device=str(device), threads=torch.get_num_threads())
    return inputs
