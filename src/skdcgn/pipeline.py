"""`skdcgn run`: the whole chain, stage by stage, resumable, for one or all MNIST variants.

    data ─► teacher ─► transfer sets ─► students ─► counterfactual datasets ─► classifiers ─► table, report

Each stage writes into `runs/NAME/<variant>/<stage>/` and is skipped when its manifest matches
its config, so an interrupted run picks up where it stopped. The table rows (the CGN paper's
Table 2, extended) and the composition-study rows are classifiers trained on:

- `original`: the variant's training images (colours/textures tied to the label);
- `teacher_samples`: teacher samples without counterfactuals (one class for all mechanisms);
- `teacher_cf`: teacher counterfactuals;
- `student_cf`: counterfactuals of the distilled students;
- `student_cf+original`: student counterfactuals and the original training images;
- `hybrid_teacher_shape`, `hybrid_student_shape` (on request, `--rows`): counterfactuals of a CGN
  whose shape mechanism comes from the teacher and textures from the students, or the reverse;
- `teacher_stream`, `student_stream` (on request, `--rows`): counterfactuals of the teacher or the
  students sampled at every classifier step (`counterfactuals.CounterfactualStream`, seeded by the
  step, nothing stored, no composite seen twice), for the stored rows' number of steps times
  `stream_budget`;
- `study_<composer>`: student counterfactuals composed with a composition-study variant.
"""
from __future__ import annotations

import logging
import dataclasses
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .compose import COMPOSERS
from .config import identity, load_presets, resolve_device, set_threads, setting, validate_config
from .errors import SkdcgnError
from .data.variants import BUILD_VERSION, VARIANTS
from .models.cgn import CGN
from .models.classifier import ARCHS
from .models.sampling import SAMPLER_MODES, resolve_sampler_mode
from .io import config_hash, folder_lock, read_json, stage_complete, write_json, write_manifest
from .results.records import (ALL_TRAINING_SETS, STREAM_TRAINING_SETS, TRAINING_SETS, command_line, data_build,
                              hardware_info, mean_std)
from .results.render import write_results
from .results.report import write_run_report

if TYPE_CHECKING:
    from .counterfactuals import CounterfactualStream

logger = logging.getLogger(__name__)
STUDY_COMPOSERS = tuple(c for c in COMPOSERS if c != "standard")  # the composition study's variants


@dataclasses.dataclass
class RunConfig:
    """What `skdcgn run` does per variant: the teacher (shipped or trained), the students (distilled
    with a distillation preset, or reused from an earlier run), the counterfactual sets (images per
    set, counterfactuals per mask) and the classifiers (rows, seeds, architecture, epochs, caps).
    Each field's choices (VARIANTS, ALL_TRAINING_SETS, COMPOSERS, the classifier architectures)
    or range is its `setting` metadata, checked by `validate()`, which raises `SkdcgnError` naming
    the field. Presets: `PRESETS` (YAML files in skdcgn/configs/run/)."""

    variants: tuple[str, ...] = setting(("double_colored",), choices=VARIANTS, help="MNIST variants to run")
    teacher: str = setting("shipped", choices=("shipped", "train"),
                           help="shipped (the released teacher of each variant) | train (train one first)")
    teacher_preset: str = setting("quick", help="with teacher=train: a preset of teacher_training")
    distill_preset: str = setting("quick", help="a preset of distill.trainer")
    students: str = setting("", help="an earlier run folder whose <variant>/distill/students are reused instead of distilling")
    n_counterfactuals: int = setting(10_000, lo=10, hi=10_000_000, unit="images", help="images per counterfactual dataset")
    per_shape: int = setting(10, lo=1, hi=1000, unit="images", help="counterfactuals per mask")
    seeds: int = setting(1, lo=1, hi=100, unit="classifiers", help="classifiers per row (mean ± std over seeds)")
    classifier_arch: str = setting("cgn", choices=ARCHS,
                                   help="cgn (the CGN authors' MNIST CNN) | mnist_example (learns in fewer steps)")
    classifier_epochs: int = setting(1, lo=1, hi=1000, unit="epochs")
    classifier_max_steps: int = setting(0, lo=0, hi=10**9, unit="steps", help="0: full epochs")
    classifier_max_examples: int = setting(0, lo=0, hi=10**9, unit="images", help="0: all images of the dataset")
    classifier_bf16: bool = setting(False, identity="changed",
                                    help="classifiers under bf16 autocast (GPU speed; changes the numbers, so their identity)")
    batch_classifiers: str = setting("auto", choices=("auto", "on", "off"), identity=False,
                                     help="train a variant's classifiers together in one process (skdcgn.multitrain; "
                                          "same results within float tolerance): auto = on a GPU, off on a CPU")
    classifier_compile: str = setting("auto", choices=("auto", "on", "off"), identity=False,
                                      help="run each step of a classifier stack through torch.compile (CUDA graphs on "
                                           "a GPU; same results within float tolerance; only with batched "
                                           "classifiers): auto = on a GPU, off on a CPU")
    sampler: str = setting("auto", choices=SAMPLER_MODES, identity=False,
                           help="how the CGN forward of the counterfactual sets and streams runs (skdcgn.models.sampling; "
                                "same draws, same images within float tolerance): auto = a CUDA graph on a GPU, "
                                "eager on a CPU")
    composers: tuple[str, ...] = setting((), choices=STUDY_COMPOSERS,
                                         help="composition-study variants (besides standard)")
    rows: tuple[str, ...] = setting(TRAINING_SETS, choices=ALL_TRAINING_SETS,
                                    help="which table rows to train (a subset saves hours on a CPU)")
    stream_budget: int = setting(1, lo=1, hi=1000, unit="×",
                                 help="the stream rows train for this many times the stored rows' steps (steps per "
                                      "epoch and max steps both scaled: the same learning-rate schedule, stretched)")
    stream_per_shape: int = setting(0, lo=0, hi=1000, unit="images",
                                    help="composites per mask in a stream row's batch; 0: per_shape (the stored recipe); "
                                         "1: every composite of a batch has its own mask")
    eval_examples: int = setting(10_000, lo=10, hi=10**6, unit="images", help="images per split used for the accuracy table")
    device: str = setting("auto", identity=False, help="auto | cpu | cuda[:N]")
    threads: int = setting(0, lo=0, hi=1024, identity=False, unit="threads",
                           help="torch CPU threads; 0: PyTorch's default (1 is steadier on a shared 2-core machine)")
    seed: int = setting(0, lo=0, hi=2**31)

    def validate(self) -> None:
        """Check names and ranges (`validate_config`); raises `SkdcgnError`."""
        validate_config(self)


# quick (the smoke run), full (the CGN paper's protocol), tiny (unit tests): skdcgn/configs/run/
PRESETS: dict[str, dict] = load_presets("run", RunConfig)


def run(run_dir: str | Path, config: RunConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Run every stage for every variant; write `results.json`, `results.md` and the report.

    Finished stages are skipped, interrupted ones resume. overwrite: replace stages made with
    other settings; without it the first such stage is a one-line SkdcgnError naming the
    setting. `run_dir` is locked for the whole run (`io.folder_lock`): a second `skdcgn run` into
    it gets one line. Raises SkdcgnError for bad settings or files.
    """
    config.validate()
    run_dir = Path(run_dir)
    for variant in config.variants:  # missing students fail now, before any work
        students_dir(config, variant, run_dir / variant)
    set_threads(config.threads)  # a bad count is one line before the folder is locked or written
    resolve_sampler_mode(config.sampler, resolve_device(config.device))  # sampler graph on a CPU: likewise
    with folder_lock(run_dir):
        return _run(run_dir, config, progress, overwrite)


def _run(run_dir: Path, config: RunConfig, progress: bool, overwrite: bool) -> dict:
    write_json(run_dir / "run_config.json", dataclasses.asdict(config))
    t0 = time.perf_counter()
    results = {}
    for variant in config.variants:
        results[variant] = run_variant(run_dir / variant, variant, config, progress, overwrite)
    summary = {"config": dataclasses.asdict(config), "data_build": BUILD_VERSION, "results": results,
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(run_dir / "results.json", summary)

    write_run_report(run_dir, summary)
    return summary


def _say(progress: bool, text: str) -> None:
    if progress:
        logger.info("[skdcgn run] %s", text)


def run_variant(vdir: Path, variant: str, config: RunConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Every stage of one variant into `vdir` (teacher, students, counterfactual sets, classifiers),
    each skipped when finished; returns the variant's summary (accuracy table of mean ± std in %,
    timings in seconds). Raises `SkdcgnError` for bad input or a stage of other settings (unless
    `overwrite`)."""
    from .api import load_cgn
    from .counterfactuals import generate_counterfactuals, load_image_dataset
    from .distill.trainer import distill, preset as distill_preset
    from .invariance import data_hash, load_variant_split

    device = resolve_device(config.device)
    timings: dict[str, float] = {}

    def timed(name: str, start: float) -> None:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 1)

    # data (built once, then cached by the data package)
    t = time.perf_counter()
    _say(progress, f"{variant}: data")
    train = load_variant_split(variant, "train")
    tests = {s: load_variant_split(variant, s) for s in ("test", "test_iid")}
    # what the classifiers are scored on: a stored score counts only for these very images
    k = config.eval_examples
    test_ids = {s: data_hash(x[:k], y[:k]) for s, (x, y) in tests.items()}
    timed("data", t)

    # teacher
    t = time.perf_counter()
    if config.teacher == "train":
        from .teacher_training import preset_config, train_teacher

        _say(progress, f"{variant}: training a teacher")
        teacher = train_teacher(variant, vdir, preset_config(config.teacher_preset, seed=config.seed, device=config.device),
                                progress=progress)
    else:
        teacher = load_cgn(variant)
    timed("teacher", t)

    # transfer sets and students (or the students of an earlier run, e.g. to run the classifiers on a GPU
    # machine without copying the transfer sets there)
    t = time.perf_counter()
    sdir = students_dir(config, variant, vdir)
    if config.students:
        _say(progress, f"{variant}: students of {sdir}")
    else:
        _say(progress, f"{variant}: distilling shape, foreground and background")
        dcfg = distill_preset(config.distill_preset, seed=config.seed, device=config.device)
        distill(teacher, ("shape", "foreground", "background"), vdir, dcfg, progress=progress, overwrite=overwrite)
    students = load_cgn(f"students:{sdir}")
    timed("distill", t)

    # counterfactual datasets
    t = time.perf_counter()
    rows = [r for r in ALL_TRAINING_SETS if r in config.rows] + [f"study_{c}" for c in config.composers]
    datasets = {
        "teacher_samples": (teacher, "standard", False),
        "teacher_cf": (teacher, "standard", True),
        "student_cf": (students, "standard", True),
        "hybrid_teacher_shape": (CGN(teacher.shape, students.foreground, students.background), "standard", True),
        "hybrid_student_shape": (CGN(students.shape, teacher.foreground, teacher.background), "standard", True),
        **{f"study_{c}": (students, c, True) for c in config.composers},
    }
    needed = {"student_cf" if r == "student_cf+original" else r for r in rows}
    for name, (cgn, composer, cf) in datasets.items():
        if name not in needed:
            continue
        _say(progress, f"{variant}: counterfactual dataset {name}")
        generate_counterfactuals(cgn.to(device), vdir / "datasets" / name, config.n_counterfactuals, config.per_shape,
                                 seed=config.seed, composer=composer, counterfactual=cf, cgn_name=name,
                                 overwrite=overwrite, progress=progress, sampler=config.sampler)
    timed("counterfactuals", t)

    # classifiers
    def training_data(row: str):
        if row == "original":
            return train
        key = "student_cf" if row == "student_cf+original" else row
        x, y = load_image_dataset(vdir / "datasets" / key, dtype=torch.uint8)
        if row == "student_cf+original":
            x, y = torch.cat([x, train[0]]), torch.cat([y, train[1]])
        return x, y

    streams = {"teacher_stream": (teacher, variant if config.teacher == "shipped" else f"{vdir}/teacher"),
               "student_stream": (students, f"students:{sdir}")}

    t = time.perf_counter()
    table, by_epoch = {}, {}
    stored_rows = [r for r in rows if r not in streams]  # stream rows train one by one, on their streams
    data, trained = _train_batched(vdir, stored_rows, config, training_data, tests, test_ids, progress, overwrite) \
        if _batched(config, device) else ({}, {})
    for row in rows:
        loaded: dict = {"data": data[row]} if row in data else {}  # the row's data, loaded once for all seeds if needed

        def get_data(row: str = row, loaded: dict = loaded):
            if "data" not in loaded:
                loaded["data"] = training_data(row)
            return loaded["data"]

        outs = [vdir / "classifiers" / row / f"seed{s}" for s in range(config.seeds)]
        stream = streams.get(row)
        accs = [_classifier_accuracy(out, row, s, config, get_data, tests, test_ids, progress, overwrite,
                                     trained.get((row, s)),
                                     stream=None if stream is None else (stream[0].to(device), stream[1]))
                for s, out in enumerate(outs)]
        table[row] = mean_std(accs)
        if (curve := _test_by_epoch(outs, test_ids["test"])) is not None:
            by_epoch[row] = curve
    timed("classifiers", t)
    summary = {"table": table, "timings_s": timings, **({"test_by_epoch": by_epoch} if by_epoch else {}),
               "stage_seconds": stage_seconds(vdir, rows, [d for d in datasets if d in needed], config.seeds, sdir)}
    write_json(vdir / "results.json", summary)
    return summary


def students_dir(config: RunConfig, variant: str, vdir: Path) -> Path:
    """The variant folder whose `distill/students` a run uses: its own (`vdir`), or `config.students`'s."""
    if not config.students:
        return vdir
    folder = Path(config.students) / variant
    missing = [m for m in ("shape", "foreground", "background")
               if not (folder / "distill" / "students" / m / "manifest.json").is_file()]
    if missing:
        raise SkdcgnError(f"students: {folder}/distill/students has no finished {', '.join(missing)} student "
                          f"(give the run folder of an earlier `skdcgn run` of {variant})")
    return folder


def stage_seconds(vdir: Path, rows: list[str], datasets: list[str], seeds: int, students: Path) -> dict[str, float]:
    """Compute time of the stages behind a variant's table, read from their manifests: a run resumed
    over several invocations (or reusing stages) still reports what its artifacts cost to make."""
    def seconds(manifest: Path, key: str) -> float:
        return float(read_json(manifest).get(key, 0.0)) if manifest.is_file() else 0.0

    return {"students": round(sum(seconds(students / "distill" / "students" / m / "manifest.json", "train_seconds")
                                  for m in ("shape", "foreground", "background")), 1),
            "counterfactuals": round(sum(seconds(vdir / "datasets" / d / "manifest.json", "seconds") for d in datasets), 1),
            "classifiers": round(sum(seconds(vdir / "classifiers" / r / f"seed{s}" / "manifest.json", "train_seconds")
                                     for r in rows for s in range(seeds)), 1)}


def _test_by_epoch(outs: list[Path], test_id: str) -> dict | None:
    """OOD test accuracy (%) after each epoch from the classifiers' logs, mean over the seeds whose
    every epoch was monitored on the test images `test_id` (classifiers trained before monitoring
    existed, or on the test images of another data build, have none); None if none."""
    curves, seeds = [], []
    for s, out in enumerate(outs):
        manifest = read_json(out / "manifest.json") if (out / "manifest.json").is_file() else {}
        log = manifest.get("log", [])
        if log and all("test_accuracy" in r for r in log) and manifest.get("monitor", {}).get("test") == test_id:
            curves.append([100.0 * r["test_accuracy"] for r in log])
            seeds.append(s)
    if not curves or len({len(c) for c in curves}) != 1:
        return None
    return {"seeds": seeds, "mean": [round(statistics.fmean(v), 2) for v in zip(*curves)]}


def _batched(config: RunConfig, device: torch.device) -> bool:
    """Whether the run trains a variant's classifiers as one stack (`batch_classifiers`; auto: on a GPU)."""
    return config.batch_classifiers == "on" or (config.batch_classifiers == "auto" and device.type != "cpu")


def _classifier_config(config: RunConfig, seed: int):
    """The `ClassifierConfig` of a table classifier of `seed` (0-based, offset by the run's seed)."""
    from .invariance import ClassifierConfig

    return ClassifierConfig(arch=config.classifier_arch, epochs=config.classifier_epochs, seed=config.seed + seed,
                            device=config.device, max_examples=config.classifier_max_examples,
                            max_steps=config.classifier_max_steps, bf16=config.classifier_bf16)


def _eval_config(config: RunConfig, seed: int, test_ids: dict[str, str]) -> dict:
    # the classifier's identity: its device is identity=False
    return {"classifier": identity(_classifier_config(config, seed)), "eval_examples": config.eval_examples,
            "tests": test_ids}


def _train_batched(vdir: Path, rows: list[str], config: RunConfig, training_data, tests, test_ids: dict[str, str],
                   progress: bool, overwrite: bool) -> tuple[dict, dict]:
    """Train every (row, seed) classifier of a variant in one `multitrain.train_classifiers` call (the
    same folders as one by one); returns ({row: (images, labels)}, {(row, seed): classifier}) for
    `_classifier_accuracy` to score. Every classifier is passed, finished ones included, so that a
    resumed run stacks them as the first run did; nothing is loaded when every score is recorded."""
    from .multitrain import ClassifierJob, batchable, train_classifiers

    pairs = [(row, s) for row in rows for s in range(config.seeds)]
    if not batchable(_classifier_config(config, 0)):
        logger.info("classifier arch %s is not stacked (dropout); its classifiers train one by one",
                    config.classifier_arch)
        return {}, {}
    if all(stage_complete(vdir / "classifiers" / row / f"seed{s}" / "eval", _eval_config(config, s, test_ids))
           for row, s in pairs):
        return {}, {}
    k = config.eval_examples
    monitor = {"test": (tests["test"][0][:k], tests["test"][1][:k])}
    data = {row: training_data(row) for row in rows}
    jobs = [ClassifierJob(*data[row], _classifier_config(config, s), vdir / "classifiers" / row / f"seed{s}", monitor)
            for row, s in pairs]
    _say(progress, f"{len(jobs)} classifiers together")
    return data, dict(zip(pairs, train_classifiers(jobs, progress=progress, overwrite=overwrite,
                                                   compile=config.classifier_compile)))


def stream_for(config: RunConfig, cgn: CGN, seed: int, cgn_name: str | None = None) -> CounterfactualStream:
    """The `CounterfactualStream` of a stream row's classifier `seed`: the stored sets' recipe
    (`per_shape` composites per mask, or `stream_per_shape` when set; standard composer,
    counterfactual classes), seeded with the classifier's seed (config.seed + seed), with as many
    steps per epoch as a stored row trains on (its min(n_counterfactuals, classifier_max_examples)
    images at batch 64) times `stream_budget`. Raises `SkdcgnError` for a bad setting."""
    from .counterfactuals import CounterfactualStream
    from .invariance import ClassifierConfig

    n = min(config.n_counterfactuals, config.classifier_max_examples or config.n_counterfactuals)
    steps = -(-n // ClassifierConfig.batch_size) * config.stream_budget
    return CounterfactualStream(cgn, per_shape=config.stream_per_shape or config.per_shape, seed=config.seed + seed,
                                steps_per_epoch=steps, cgn_name=cgn_name, sampler=config.sampler)



def _classifier_accuracy(out: Path, row: str, seed: int, config: RunConfig, get_data, tests, test_ids: dict[str, str],
                         progress: bool, overwrite: bool = False, trained=None, stream: tuple[CGN, str] | None = None
                         ) -> dict:
    """Train (or reuse) one classifier and return its accuracies on train / test / test_iid.
    trained: the classifier `_train_batched` made for it (then it is only scored).
    stream: (CGN, its name) for a stream row: trained on `stream_for(config, cgn, seed)` for the
    stored rows' steps × `stream_budget`; its "train" accuracy is on `eval_examples` composites of
    the same recipe that training never drew (`CounterfactualStream.sample`)."""
    from .invariance import accuracy, train_classifier, train_classifier_on_stream

    ccfg = _classifier_config(config, seed)
    eval_cfg = _eval_config(config, seed, test_ids)
    source = None
    if stream is not None:
        source = stream_for(config, stream[0], seed, stream[1])
        ccfg = dataclasses.replace(ccfg, max_examples=0, max_steps=config.classifier_max_steps * config.stream_budget)
        eval_cfg = {**eval_cfg, "classifier": identity(ccfg), "stream": source.identity()}
    eval_dir = out / "eval"
    if stage_complete(eval_dir, eval_cfg):
        return read_json(eval_dir / "manifest.json")["accuracy"]
    k = config.eval_examples
    test_x, test_y = tests["test"]
    monitor = {"test": (test_x[:k], test_y[:k])}
    if source is not None:
        _say(progress, f"classifier {row} (seed {seed})")
        clf = train_classifier_on_stream(source, ccfg, out, progress=progress, monitor=monitor, overwrite=overwrite)
        acc = {"train": accuracy(clf, *source.sample(k, "train-eval"))}
    else:
        x, y = get_data()
        if trained is not None:
            clf = trained
        else:
            _say(progress, f"classifier {row} (seed {seed})")
            clf = train_classifier(x, y, ccfg, out, progress=progress, monitor=monitor, overwrite=overwrite)
        sub = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))[:k]
        acc = {"train": accuracy(clf, x[sub], y[sub])}
    for split, (tx, ty) in tests.items():
        acc[split] = accuracy(clf, tx[:k], ty[:k])
    write_manifest(eval_dir, eval_cfg, accuracy=acc)
    return acc


def record_results(out: str | Path, run_dir: str | Path, summary: dict, preset: str) -> list[str]:
    """Add this run's table to `out` (docs/results.md) and its JSON twin, keyed by preset and variants;
    return the keys of the records it replaces (its row subsets)."""
    import datetime as _dt

    device = resolve_device(summary["config"]["device"])
    key = record_key(summary, preset) + ("" if device.type == "cpu" else f"-{device.type}")  # GPU runs beside CPU ones
    record = {"kind": "pipeline", "key": key, "command": command_line(), "run_dir": str(run_dir),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "hardware": hardware_info(device), **summary}
    return write_results(out, record, supersedes=lambda old: _row_subset_of(old, record))


def _row_subset_of(old: dict, new: dict) -> bool:
    """True when `old` recorded some of `new`'s rows and seeds (seeds 0..n-1) from the same run folder
    and settings: the classifiers are the same ones (resumed, not retrained), so its table is a part
    of the new one."""
    if (old.get("kind") != "pipeline" or old.get("run_dir") != new["run_dir"] or set(old["results"]) != set(new["results"])
            or data_build(old) != data_build(new)):
        return False
    defaults = dataclasses.asdict(RunConfig())  # fields added since `old` was recorded: it ran with their defaults
    a, b = {**defaults, **old["config"]}, {**defaults, **new["config"]}
    a.pop("threads"), b.pop("threads")  # the same classifier folders are resumed with any thread count
    rows_a, rows_b = set(a.pop("rows", TRAINING_SETS)), set(b.pop("rows", TRAINING_SETS))
    seeds_a, seeds_b = a.pop("seeds"), b.pop("seeds")
    return config_hash(a) == config_hash(b) and rows_a <= rows_b and seeds_a <= seeds_b  # hashed: lists vs tuples


def record_key(summary: dict, preset: str) -> str:
    """The results-file key of a run: preset, variants, and what differs from the preset's defaults."""
    cfg = summary["config"]
    key = f"run-{preset}-" + "+".join(summary["results"])
    students = PRESETS.get(preset, {}).get("distill_preset", RunConfig.distill_preset)
    if cfg.get("students"):  # students reused from a folder: its name tells runs with other students apart
        key += f"-students-{Path(cfg['students']).name}"
    elif cfg["distill_preset"] != students:
        key += f"-{cfg['distill_preset']}-students"
    rows = tuple(cfg.get("rows", TRAINING_SETS))
    if rows != TRAINING_SETS:
        key += "-" + "+".join(rows)
    per_shape = cfg.get("per_shape", RunConfig.per_shape)
    if per_shape != PRESETS.get(preset, {}).get("per_shape", RunConfig.per_shape):  # other counterfactual sets
        key += f"-per-shape{per_shape}"
    if set(rows) & set(STREAM_TRAINING_SETS):
        key += f"-stream{cfg['stream_budget']}x" if cfg.get("stream_budget", 1) != 1 else ""
        key += f"-stream-per-shape{cfg['stream_per_shape']}" if cfg.get("stream_per_shape", 0) else ""
    seeds = cfg["seeds"]
    if seeds != PRESETS.get(preset, {}).get("seeds", RunConfig.seeds):
        key += f"-{seeds}seed" + ("s" if seeds > 1 else "")
    key += "-trained-teacher" if cfg["teacher"] == "train" else ""
    return key + (f"-data{data_build(summary)}" if data_build(summary) != 1 else "")  # beside the earlier builds' records


