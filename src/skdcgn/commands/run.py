"""`skdcgn run`: the whole chain (data → teacher → transfer sets → students → counterfactuals →
classifiers → table and report), resumable stage by stage; and `skdcgn report` to redraw a report."""
from __future__ import annotations

import argparse
import time

from . import write_dumped_config
from ..config import add_config_arguments, config_from_args, load_yaml
from ..pipeline import PRESETS, VARIANTS, RunConfig, run
from ..results.records import ALL_TRAINING_SETS
from ..results.render import format_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `run` subcommand's parser to `subparsers` (the CLI's `add_subparsers()` object). Also adds `report`."""
    p = sub.add_parser("run", help="the whole chain as one resumable command",
                       description="Run every stage for the given variants; run again to resume. "
                                   "Outputs: RUN_DIR/<variant>/{transfer,distill,datasets,classifiers}, "
                                   "RUN_DIR/results.md, RUN_DIR/report.html. With --rows and without "
                                   "--composers, only those rows are trained (no composition-study rows).")
    p.add_argument("--variant", default=None, choices=(*VARIANTS, "all"), help="default: the preset's")
    p.add_argument("--preset", default="quick", choices=[k for k in PRESETS if k != "tiny"] + ["tiny"],
                   help="quick: a few minutes on a laptop CPU; full: the CGN paper protocol with 3 seeds and the "
                        "composition study, 33 classifiers per variant (measured: ~45 s each on an H200 GPU, "
                        "8-25 min each on one CPU core, by training-set size; use a GPU)")
    p.add_argument("--run-dir", default=None, help="default: runs/<preset>")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace stages of RUN_DIR made with other settings (otherwise they are refused, naming the "
                        "first difference)")
    p.add_argument("--record", metavar="MD", help="also add the accuracy table to this results file (e.g. docs/results.md)")
    add_config_arguments(p, RunConfig, skip=("variants",))
    p.set_defaults(func=run_command)

    r = sub.add_parser("report", help="redraw results.md and report.html of a finished run")
    r.add_argument("run_dir")
    r.set_defaults(func=report_command)


def run_command(args: argparse.Namespace) -> None:
    """`skdcgn run`: run (or resume) every stage, optionally record the table, and print it."""
    config = run_config(args)
    if write_dumped_config(args, config):
        return
    run_dir = args.run_dir or f"runs/{args.preset}"
    rows = [r for r in ALL_TRAINING_SETS if r in config.rows] + [f"study_{c}" for c in config.composers]
    print(f"[skdcgn run] {', '.join(config.variants)}: rows {', '.join(rows) or '(none)'}; {config.seeds} seed(s) each "
          f"→ {run_dir}", flush=True)
    t0 = time.perf_counter()
    summary = run(run_dir, config, progress=not args.quiet, overwrite=args.overwrite)
    if args.record:
        from ..pipeline import record_results

        for key in record_results(args.record, run_dir, summary, args.preset):
            print(f"{args.record}: replaced {key} (its rows are in this run's table)")
    print(format_table(summary))
    print(f"done in {time.perf_counter() - t0:.0f} s: {run_dir}/results.md, {run_dir}/report.html")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The preset, then the YAML file, then the options; `--rows` without `--composers` drops the
    preset's composition-study rows (picked rows would otherwise grow by six study rows, hours unasked)."""
    override = {"variants": list(VARIANTS) if args.variant == "all" else [args.variant]} if args.variant else {}
    base = dict(PRESETS[args.preset])
    from_file = load_yaml(args.config) if args.config else {}
    if (args.cfg_rows is not None or "rows" in from_file) and args.cfg_composers is None and "composers" not in from_file:
        base.pop("composers", None)
    return config_from_args(RunConfig, args, base=base, override=override)


def report_command(args: argparse.Namespace) -> None:
    """`skdcgn report`: redraw results.md and report.html of a finished run from its results.json."""
    from ..io import read_json
    from ..results.report import write_run_report

    out = write_run_report(args.run_dir, read_json(f"{args.run_dir}/results.json"))
    print(f"wrote {out}")
