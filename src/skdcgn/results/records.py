"""Results records: what a measurement was and where and how it ran (hardware, command), and the
statistics a record holds (mean ± std over seeds).

`skdcgn bench` and `skdcgn run --record` each produce a record (a dict with a unique `key`);
`render.write_results` merges it into docs/results.json and renders docs/results.md. Nothing
here measures anything or imports a stage: results sit above the stages.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys

import torch

from .._version import __version__
from ..config import usable_cpus

# The training sets of the classifiers, one row each of the accuracy table, in its order (the CGN
# paper's Table 2, extended); the composition-study rows `study_<composer>` follow them. (The
# run's `rows` setting and `--rows` option pick among them: a table row is a training set.)
TRAINING_SETS = ("original", "teacher_samples", "teacher_cf", "student_cf", "student_cf+original")
# Hybrid CGNs (one mechanism from the teacher, the others from the students): which mechanism
# costs the students' counterfactuals accuracy. Trained only when asked for (`--rows`).
HYBRID_TRAINING_SETS = ("hybrid_teacher_shape", "hybrid_student_shape")
# Streamed counterfactuals (`counterfactuals.CounterfactualStream`): the teacher's or the students'
# counterfactuals sampled at every classifier step, never one twice, for as many steps as the
# stored rows (times the run's `stream_budget`). Trained only when asked for (`--rows`).
STREAM_TRAINING_SETS = ("teacher_stream", "student_stream")
# every row a run can train, in the table's order
ALL_TRAINING_SETS = TRAINING_SETS + HYBRID_TRAINING_SETS + STREAM_TRAINING_SETS


def hardware_info(device: torch.device) -> dict:
    """Where a measurement ran: CPU model and counts, torch threads, torch / Python / skdcgn versions,
    platform, device, and for CUDA the GPU name and CUDA version (`gpu` is None otherwise).
    """
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


def command_line() -> str:
    """The command as typed, `skdcgn` followed by this process's arguments."""
    return "skdcgn " + " ".join(sys.argv[1:])


def mean_std(accs: list[dict]) -> dict:
    """Per key of the accuracy dicts (fractions): mean and sample std in %, and n."""
    out = {}
    for split in accs[0]:
        vals = [100.0 * a[split] for a in accs]
        out[split] = {"mean": round(statistics.fmean(vals), 2),
                      "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out


def format_mean_std(a: dict) -> str:
    """'93.1 ± 0.7', or '93.1' for a single value."""
    return f"{a['mean']:.1f}" + (f" ± {a['std']:.1f}" if a["n"] > 1 else "")


def data_build(rec: dict) -> int:
    """The variants' data build a record was measured on (records from before builds were kept: 1)."""
    return int(rec.get("data_build", 1))
