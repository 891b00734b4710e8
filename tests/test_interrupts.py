"""Interrupt each stage, as a user or a cluster scheduler would, and resume.

Each stage runs as a real `skdcgn` subprocess on a tiny config and is stopped three times:
once with SIGTERM (a clean stop: exit code 143, one line on stderr, no traceback, no temporary
file, no manifest) and twice with SIGKILL after a random delay (no clean-up at all). After each
stop, every deterministic artifact on disk (dataset and transfer-set shards, model weights) is
either absent or bitwise equal to the artifact of an uninterrupted run: nothing half-written can
be mistaken for complete. The last run resumes and must end with files bitwise equal to the
uninterrupted run's, and leave no temporary file behind.

The uninterrupted reference runs in this process through `skdcgn.cli.main` (the same code);
everything uses one CPU thread, so results do not depend on the thread count.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from skdcgn.cli import main
from skdcgn.io import save_tensors, write_manifest

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}



@dataclass
class Stage:
    name: str
    argv: Callable[[Path], list[str]]        # the command, writing into the given folder
    progress: Callable[[Path], int]          # how far it got: shards, epochs or logged steps on disk
    total: int                               # progress of a finished run
    artifacts: Callable[[Path], list[Path]]  # deterministic outputs compared bitwise
    done: Callable[[Path], Path]             # the manifest that marks the whole command complete


def _count(pattern: str) -> Callable[[Path], int]:
    return lambda d: len(list(d.glob(pattern)))


def _rows(relative: str) -> Callable[[Path], int]:
    def rows(d: Path) -> int:
        try:
            return max(0, (d / relative).read_text().count("\n") - 1)  # minus the header
        except OSError:
            return 0
    return rows


STAGES = [
    Stage("counterfactuals",
          lambda d: ["counterfactuals", "--cgn", "colored", "--n", "400", "--per-shape", "10", "--shard-size", "40",
                     "--seed", "3", "--device", "cpu", "--out", str(d)],
          _count("shard_*.safetensors"), 10,
          lambda d: [d / f"shard_{i:05d}.safetensors" for i in range(10)] + [d / "preview.png"],
          lambda d: d / "manifest.json"),
    Stage("classifier",
          lambda d: ["classify", "train", "--data", str(d.parent / "data"), "--out", str(d), "--epochs", "6",
                     "--batch-size", "16", "--seed", "1", "--device", "cpu"],
          _rows("train_log.csv"), 6,
          lambda d: [d / "model.safetensors", d / "config.json"],
          lambda d: d / "manifest.json"),
    Stage("teacher",
          lambda d: ["teacher", "train", "--variant", "double_colored", "--run-dir", str(d), "--steps", "14",
                     "--batch-size", "8", "--ngf", "8", "--ndf", "32", "--checkpoint-every", "2", "--sample-every", "0",
                     "--log-every", "1", "--bn-recalibration-batches", "1", "--device", "cpu", "--no-progress"],
          _rows("teacher/train/losses.csv"), 14,
          lambda d: [d / "teacher" / m / f for m in ("shape", "foreground", "background")
                     for f in ("model.safetensors", "config.json")],
          lambda d: d / "teacher" / "manifest.json"),
    Stage("distill",
          lambda d: ["distill", "--teacher", "colored", "--mechanism", "shape", "--run-dir", str(d), "--preset", "tiny",
                     "--steps", "40", "--checkpoint-interval", "4", "--sample-interval", "20", "--threads", "1",
                     "--device", "cpu", "--no-progress"],
          lambda d: _count("transfer/shape/shard_*.safetensors")(d) + _rows("distill/students/shape/losses.csv")(d), 4 + 20,
          lambda d: [d / "transfer" / "shape" / f"shard_{i:05d}.safetensors" for i in range(4)]
          + [d / "distill" / "students" / "shape" / f for f in ("model.safetensors", "config.json")],
          lambda d: d / "distill" / "students" / "shape" / "manifest.json"),
]


def _synthetic_dataset(folder: Path, n: int = 96) -> None:
    """A small dataset in the format of `skdcgn counterfactuals` (one shard), for classifier training."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(10, (n,), generator=g)
    x = torch.randint(0, 90, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    for k in range(10):
        r, c = divmod(k, 5)
        x[labels == k, :, 4 + 14 * r:10 + 14 * r, 2 + 6 * c:8 + 6 * c] = 255
    save_tensors(folder / "shard_00000.safetensors", {"images": x, "labels": labels, "y_fg": labels, "y_bg": labels})
    write_manifest(folder, {"synthetic": n}, shards=[{"file": "shard_00000.safetensors", "count": n}], n_classes=10)


# ---- every file of a run folder, compared (only the time each took may differ) --------------------------

def _timed(key: str) -> bool:
    """A field that records how long something took (or when): the one thing a resumed run may change."""
    return key in ("seconds", "elapsed", "timings") or key.endswith(("seconds", "_seconds", "_s", "seconds_this_session"))


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not _timed(str(k))}
    if isinstance(obj, (list, tuple)):
        return [_untimed(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return "nan"  # NaN != NaN: a logged loss not computed at that step
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.dtype, tuple(obj.shape), obj.flatten().view(torch.uint8).tolist() if obj.numel() else [])
    return obj


def _content(path: Path):
    """What a file holds, with its time-valued fields left out; bytes for everything else."""
    import csv
    import io
    import json

    if path.suffix == ".json":
        return _untimed(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [_untimed(json.loads(line)) for line in path.read_text().splitlines()]
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(path.read_text())))
        keep = [i for i, name in enumerate(rows[0]) if not _timed(name)] if rows else []
        return [[r[i] for i in keep if i < len(r)] for r in rows]
    if path.name.startswith("checkpoint") and path.suffix == ".safetensors":  # every trainer's one format
        from skdcgn.checkpoint import load_checkpoint

        state = load_checkpoint(path)
        if "rows" in state and "elapsed" in state:  # distillation: a row ends with its time
            state = {**state, "rows": [list(r)[:-1] for r in state["rows"]]}
        return _untimed(state)
    return path.read_bytes()


def _assert_same_folder(ref: Path, out: Path) -> None:
    """Every file of `out` (logs, manifests, checkpoints, samples, temporaries, locks) is in `ref`,
    every file of `ref` in `out`, with the same content but for the time each step took."""
    def files(d: Path) -> list[str]:
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())

    assert files(out) == files(ref)
    for name in files(ref):
        assert _content(out / name) == _content(ref / name), f"{name} differs from an uninterrupted run's"


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "skdcgn", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ONE_THREAD})


def _wait_for(p: subprocess.Popen, stage: Stage, out: Path, target: int, timeout: float = 120.0) -> None:
    """Until the running stage has made `target` progress (or ended)."""
    end = time.monotonic() + timeout
    while stage.progress(out) < target and p.poll() is None and time.monotonic() < end:
        time.sleep(0.005)


def _check_no_false_completion(stage: Stage, ref: Path, out: Path) -> None:
    """Every artifact present is whole (bitwise the reference's); complete only with its manifest."""
    for a, b in zip(stage.artifacts(ref), stage.artifacts(out)):
        if b.exists():
            assert b.read_bytes() == a.read_bytes(), f"{b} exists but differs from an uninterrupted run's"
    if stage.done(out).exists():
        assert all(b.exists() for b in stage.artifacts(out)), "manifest written before the artifacts"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each stage run once without interruption, in this process: {name: folder}."""
    root = tmp_path_factory.mktemp("reference")
    _synthetic_dataset(root / "data")
    refs = {}
    for stage in STAGES:
        assert main(stage.argv(root / stage.name)) == 0
        assert stage.progress(root / stage.name) == stage.total
        refs[stage.name] = root / stage.name
    return refs


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_sigterm_then_sigkills_then_resume_is_bitwise_identical(stage, references, tmp_path, capfd):
    ref = references[stage.name]
    _synthetic_dataset(tmp_path / "data")
    out = tmp_path / stage.name
    argv = stage.argv(out)

    # 1. SIGTERM once the stage has made some progress: a clean, one-line stop
    p = _start(argv)
    _wait_for(p, stage, out, 1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    messages = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("skdcgn")]
    assert messages == ["skdcgn: stopped by SIGTERM; run the same command again to resume"], err
    assert _temporaries(out) == []
    assert not stage.done(out).exists()
    _check_no_false_completion(stage, ref, out)

    # 2. SIGKILL twice, each time resuming the previous run, at a random point of the remaining work
    #    (once a random amount of progress is on disk, plus a random delay: often in the middle of a write)
    rng = random.Random(f"{stage.name}-kill")
    for _ in range(2):
        reached = stage.progress(out)
        p = _start(argv)
        _wait_for(p, stage, out, rng.randint(min(reached + 1, stage.total - 1), stage.total - 1))
        time.sleep(rng.uniform(0.0, 0.05))
        p.kill()
        p.communicate(timeout=120)
        _check_no_false_completion(stage, ref, out)

    # a SIGKILL in the middle of a write leaves a temporary file: never read, removed on completion
    if not stage.done(out).exists():
        (stage.done(out).parent / ".model.safetensors.k1ll3d00.tmp").write_bytes(b"half a file")

    # 3. resume to the end: bitwise the uninterrupted run's artifacts, no temporary file left, and
    #    every file of the folder as in the uninterrupted run (logs, manifests, checkpoints: but for times)
    capfd.readouterr()
    assert main(argv) == 0
    for a, b in zip(stage.artifacts(ref), stage.artifacts(out)):
        assert b.read_bytes() == a.read_bytes(), f"{b.relative_to(out)} differs from an uninterrupted run's"
    assert _temporaries(out) == []
    _assert_same_folder(ref, out)


LAST_CHECKPOINT = {  # the file a stage writes last before its final export (what it resumes from)
    "counterfactuals": "shard_00009.safetensors",
    "classifier": "checkpoint.safetensors",
    "teacher": "teacher/train/checkpoint.safetensors",
    "distill": "distill/students/shape/checkpoint.safetensors",
}


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_a_kill_right_after_the_last_checkpoint_resumes_to_the_same_folder(stage, references, tmp_path):
    """The crash window a random kill rarely hits, made exact: every file written after the stage's
    last checkpoint (its log, its model, its manifest...) is taken away, as a SIGKILL at that moment
    would leave the folder; the resumed run must end with every file as the uninterrupted run's."""
    import shutil

    ref = references[stage.name]
    out = tmp_path / stage.name
    shutil.copytree(ref, out)
    (tmp_path / "data").symlink_to(ref.parent / "data")
    last = (out / LAST_CHECKPOINT[stage.name]).stat().st_mtime_ns
    later = [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime_ns > last]
    assert stage.done(out) in later
    for p in later:
        p.unlink()
    assert main(stage.argv(out)) == 0
    _assert_same_folder(ref, out)


def test_sigterm_handler_is_only_installed_while_a_command_runs(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["data", "preview", "--variant", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
