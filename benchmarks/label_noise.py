"""Does removing the CGN's mislabelled masks help? (writes docs/label_noise.md and its JSON twin)

For the counterfactual datasets of a finished `skdcgn run` (its `<variant>/datasets/<row>`), this
script filters each with `skdcgn.label_noise.filter_labels` (confident learning on two folds of
masks, fold classifiers trained with the run's classifier settings), then trains the run's
classifier protocol on the filtered set for each seed and scores it on the same OOD test images
as the run. The unfiltered numbers are the run's own classifiers of that row and seed: the same
`train_classifier` call on the unfiltered data (reused when the run finished them, trained here
otherwise), scored here the same way, so both columns come from one protocol.

    python benchmarks/label_noise.py --run-dir runs/hybrid-quick [--rows student_cf teacher_cf]
        [--variants colored double_colored wildlife] [--seeds 3] [--out docs/label_noise.md]

Everything it trains lands in `<run>/<variant>/label_noise/<row>/` and is resumed when rerun.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from skdcgn.config import resolve_device, set_threads
from skdcgn.counterfactuals import load_image_dataset
from skdcgn.invariance import ClassifierConfig, accuracy, load_variant_split, train_classifier
from skdcgn.io import read_json, write_bytes, write_json
from skdcgn.label_noise import filter_labels
from skdcgn.results.records import format_mean_std, hardware_info, mean_std


def classifier_config(run: dict, seed: int) -> ClassifierConfig:
    """The classifier a `skdcgn run` with settings `run` trains for `seed` (pipeline._classifier_accuracy)."""
    return ClassifierConfig(arch=run["classifier_arch"], epochs=run["classifier_epochs"], seed=run["seed"] + seed,
                            device=run["device"], max_examples=run["classifier_max_examples"],
                            max_steps=run["classifier_max_steps"])


def measure(run_dir: Path, variant: str, row: str, seeds: int, run: dict) -> dict:
    vdir = run_dir / variant
    k = run["eval_examples"]
    test_x, test_y = load_variant_split(variant, "test")
    test_x, test_y = test_x[:k], test_y[:k]
    out = vdir / "label_noise" / row
    t0 = time.perf_counter()
    summary = filter_labels(vdir / "datasets" / row, out / "filtered", classifier_config(run, 0), folds=2)
    filter_s = time.perf_counter() - t0
    result = {"filter": summary, "filter_seconds_this_call": round(filter_s, 1)}
    for name, data, where in (("unfiltered", vdir / "datasets" / row, vdir / "classifiers" / row),
                              ("filtered", out / "filtered", out / "classifiers")):
        x, y = load_image_dataset(data, dtype=torch.uint8)
        accs = []
        for s in range(seeds):
            clf = train_classifier(x, y, classifier_config(run, s), where / f"seed{s}")
            accs.append({"test": accuracy(clf, test_x, test_y)})
        result[name] = mean_std(accs)["test"]
        result[name]["values"] = [round(100 * a["test"], 2) for a in accs]
    return result


def render(doc: dict) -> str:
    lines = ["# Label noise: counterfactual sets without the masks that read as another class", "",
             "Written by `benchmarks/label_noise.py`; do not edit by hand. Filtering: "
             "`skdcgn.label_noise.filter_labels` (confident learning, Northcutt et al. 2021, on 2 folds of masks; "
             "only generated data and classifiers trained on it). Accuracy: OOD test % of the run's classifier "
             "protocol, mean ± std over the seeds, unfiltered (the run's own classifiers) against filtered.", ""]
    for rec in doc["records"]:
        hw = rec["hardware"]
        lines += [f"## `{rec['run_dir']}`", "",
                  f"- command: `{rec['command']}`",
                  f"- date: {rec['date']}; skdcgn {hw['skdcgn']}; torch {hw['torch']}; {hw['cpu']}, "
                  f"{hw['cpus_usable']} usable cores, {hw['torch_threads']} torch threads",
                  f"- classifiers: {rec['protocol']}", "",
                  "| variant | set | masks flagged | images kept | unfiltered | filtered | Δ (points) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in rec["rows"]:
            f = r["filter"]
            lines.append(f"| {r['variant']} | {r['row']} | {f['flagged_masks']} of {f['masks']} "
                         f"({100 * f['flagged_fraction']:.1f}%) | {f['kept_images']} of {f['images']} | "
                         f"{format_mean_std(r['unfiltered'])} | {format_mean_std(r['filtered'])} | "
                         f"{r['filtered']['mean'] - r['unfiltered']['mean']:+.1f} |")
        lines += [""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, type=Path, help="a finished `skdcgn run` folder")
    ap.add_argument("--variants", nargs="+", default=None, help="default: the run's variants")
    ap.add_argument("--rows", nargs="+", default=["student_cf", "teacher_cf"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    ap.add_argument("--out", type=Path, default=Path("docs/label_noise.md"))
    args = ap.parse_args()
    set_threads(args.threads)
    run = read_json(args.run_dir / "run_config.json")
    t0 = time.perf_counter()
    rows = []
    for variant in args.variants or run["variants"]:
        for row in args.rows:
            r = measure(args.run_dir, variant, row, args.seeds, run)
            rows.append({"variant": variant, "row": row, **r})
            print(f"{variant} {row}: {r['filter']['flagged_masks']} of {r['filter']['masks']} masks flagged; "
                  f"unfiltered {format_mean_std(r['unfiltered'])}, filtered {format_mean_std(r['filtered'])}", flush=True)
    protocol = (f"{run['classifier_arch']}, {run['classifier_epochs']} epochs, max {run['classifier_max_steps']} steps, "
                f"max {run['classifier_max_examples']} examples; {args.seeds} seeds; scored on the first "
                f"{run['eval_examples']} OOD test images; datasets of {run['n_counterfactuals']} images, "
                f"{run['per_shape']} per mask")
    record = {"run_dir": str(args.run_dir), "command": "python " + " ".join(sys.argv), "protocol": protocol,
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "hardware": hardware_info(resolve_device(run["device"])), "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    twin = args.out.with_suffix(".json")
    doc = json.loads(twin.read_text()) if twin.is_file() else {"records": []}
    doc["records"] = [r for r in doc["records"] if r["run_dir"] != record["run_dir"]] + [record]
    write_json(twin, doc)
    write_bytes(args.out, render(doc).encode())
    print(f"wrote {args.out} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
