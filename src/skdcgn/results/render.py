"""The results file and its markdown: `write_results` merges a record into docs/results.json and
renders docs/results.md from every record there. The markdown (run tables, protocol summaries,
the cost and quality sections of `skdcgn bench`, the ImageNet cost table) is a pure function of
the records."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..compose import COMPOSERS
from ..data.variants import VARIANTS
from .._version import __version__
from ..errors import SkdcgnError
from ..io import config_hash, read_json, write_bytes, write_json
from .records import ALL_TRAINING_SETS, STREAM_TRAINING_SETS, data_build, format_mean_std


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


def _n(x: float | int | None, digits: int = 0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def _macs(x: int) -> str:
    return f"{x / 1e6:,.2f} M"


def _ratio(x: float) -> str:
    return f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


def render_markdown(doc: dict) -> str:
    """docs/results.md from the results document `doc` (its `runs`): summaries first, then each run."""
    lines = ["# skdcgn results", "",
             "Written by `skdcgn bench` and `skdcgn run --record`; do not edit by hand. Every number in the README "
             "comes from here; its accuracy tables are copied from the summaries.",
             "The JSON twin (`results.json`) holds the same numbers, unrounded.", ""]
    lines += render_summaries(doc["runs"])
    for key, rec in doc["runs"].items():
        lines += render_run(rec)
    return "\n".join(lines).rstrip() + "\n"


def render_run(rec: dict) -> list[str]:
    """Markdown lines of one record: `render_record` for a pipeline record (`skdcgn run --record`),
    else a bench record's setup, cost, quality and extra sections."""
    if rec.get("kind") == "pipeline":  # recorded by `skdcgn run --record`
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
    if rec.get("figure"):  # written by the bench beside the markdown (`figures.plot_bench_cost_vs_fid`)
        L += [f"![cost against quality, {rec['key']}]({rec['figure']})", ""]
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


# ---- records of `skdcgn run --record` ------------------------------------------------------------


def table_rows(results: dict) -> list[str]:
    """The rows present in `results`, in the table's order (JSON files keep keys sorted)."""
    names = {r for v in results.values() for r in v["table"]}
    order = [*ALL_TRAINING_SETS, *(f"study_{c}" for c in COMPOSERS)]
    return [r for r in order if r in names] + sorted(names - set(order))


def format_table(summary: dict) -> str:
    """The accuracy table (markdown): one row per training set, train / test (OOD) / test_iid per variant."""
    results = summary["results"]
    variants = list(results)
    rows = table_rows(results)
    head = "| trained on | " + " | ".join(f"{v}: train / test (OOD) / test_iid" for v in variants) + " |"
    lines = [head, "|---|" + "---|" * len(variants)]
    for row in rows:
        cells = []
        for v in variants:
            acc = results[v]["table"].get(row)
            if acc is None:
                cells.append("–")
                continue
            cells.append(" / ".join(format_mean_std(acc[s]) for s in ("train", "test", "test_iid")))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _build_text(build: int) -> str:
    return f"data build {build}" + (" (digits resized bilinearly; later builds resize as the authors' loaders)"
                                    if build == 1 else "")

# what does not change a classifier's accuracy (beyond run-to-run noise) or is what a summary combines


_SUMMARY_FREE = ("variants", "rows", "composers", "seeds", "threads", "device", "students")


def render_summaries(runs: dict) -> list[str]:
    """One table per protocol (preset, settings, device type) recorded more than once: for each
    variant and row, the record with the most seeds (the latest among equals). The README's tables
    are copied from these."""
    groups: dict[tuple, list[dict]] = {}
    for rec in runs.values():
        if rec.get("kind") == "pipeline":
            cfg = {k: v for k, v in rec["config"].items() if k not in _SUMMARY_FREE}
            preset = rec["key"].split("-")[1]
            groups.setdefault((preset, rec["hardware"]["device"], data_build(rec), config_hash(cfg)), []).append(rec)
    lines = []

    def newest_build_first(group: tuple) -> tuple:
        preset, device, build, _ = group[0]
        return preset, device, -build

    for (preset, device, build, _), recs in sorted(groups.items(), key=newest_build_first):
        if len(recs) < 2:
            continue
        best: dict[tuple[str, str], tuple[dict, str]] = {}
        for rec in sorted(recs, key=lambda r: r["date"]):
            for v, res in rec["results"].items():
                for row, acc in res["table"].items():
                    if (v, row) not in best or acc["test"]["n"] >= best[(v, row)][0]["test"]["n"]:
                        best[(v, row)] = (acc, rec["key"])
        variants = [v for v in VARIANTS if any(key[0] == v for key in best)]
        rows = table_rows({v: {"table": {row: None for (w, row) in best if w == v}} for v in variants})
        lines += [f"## Summary: `{preset}` preset on {device}, data build {build}", "",
                  f"- settings: {_settings_text(recs[0]['config'], 'earlier runs' if recs[0]['config'].get('students') else None)}"
                  f"; {_build_text(build)}",
                  "- each cell: the record with the most seeds for it (n = seeds); from "
                  + ", ".join(f"`{k}`" for k in sorted({key for _, key in best.values()})), "",
                  "OOD test accuracy (%), mean ± std (n):", "",
                  "| trained on | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for row in rows:
            cells = [f"{format_mean_std(best[(v, row)][0]['test'])} ({best[(v, row)][0]['test']['n']})" if (v, row) in best else "–"
                     for v in variants]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _settings_text(cfg: dict, students_from: str | None = None) -> str:
    students_from = students_from or (f"`{cfg['students']}`" if cfg.get("students") else None)
    return (f"teacher {cfg['teacher']}, students `{cfg['distill_preset']}`"
            + (f" (reused from {students_from})" if students_from else "") + f", {cfg['n_counterfactuals']:,} "
            f"images per counterfactual set ({cfg['per_shape']} per shape), classifier `{cfg['classifier_arch']}`, "
            f"{cfg['classifier_epochs']} epochs" + (f" capped at {cfg['classifier_max_steps']} steps" if cfg["classifier_max_steps"] else "")
            + (f" on ≤ {cfg['classifier_max_examples']:,} images" if cfg["classifier_max_examples"] else "")
            + f", accuracy on {cfg['eval_examples']:,} images per split" + _stream_text(cfg))


def _stream_text(cfg: dict) -> str:
    """The stream rows' settings, for records that trained any (none otherwise)."""
    if not set(cfg.get("rows", ())) & set(STREAM_TRAINING_SETS):
        return ""
    budget = cfg.get("stream_budget", 1)
    return (f"; stream rows: {cfg.get('stream_per_shape') or cfg['per_shape']} per mask, "
            + ("the stored rows' steps" if budget == 1 else f"{budget}× the stored rows' steps"))


def render_record(rec: dict) -> list[str]:
    """The markdown of a recorded run (see `record_results`)."""
    hw = rec["hardware"]
    cfg = rec["config"]
    lines = [f"## Invariant classifiers: `{rec['key']}`", "",
             f"- command: `{rec['command']}` (run folder `{rec['run_dir']}`)",
             f"- date: {rec['date']}; skdcgn {hw['skdcgn']}; torch {hw['torch']}; hardware: {hw['cpu']}, "
             f"{hw['cpus_usable']} usable cores, {hw['torch_threads']} torch threads"
             + (f"; GPU {hw['gpu']}" if hw.get("gpu") else "; no GPU"),
             f"- settings: {_settings_text(cfg)}; {cfg['seeds']} seed(s); {_build_text(data_build(rec))}",
             f"- wall time of the recording invocation: {rec['seconds']:.0f} s" + _stage_time_text(rec), "",
             "Accuracy (%), train / test (out of distribution) / test_iid:", "", format_table(rec), ""]
    curves = {(v, row): r["test_by_epoch"][row] for v, r in rec["results"].items()
              for row in table_rows(rec["results"]) if row in r.get("test_by_epoch", {})}
    if curves:  # is the last epoch (the table) representative of the run?
        n = max(len(c["mean"]) for c in curves.values())
        lines += ["OOD test accuracy (%) after each epoch (mean over the monitored seeds; the table reports "
                  "the last epoch):", "",
                  "| variant | trained on | seeds | " + " | ".join(str(e + 1) for e in range(n)) + " | best − last |",
                  "|---|---|---|" + "---|" * (n + 1)]
        for (v, row), c in curves.items():
            m = c["mean"]
            lines.append(f"| {v} | {row} | {', '.join(map(str, c['seeds']))} | "
                         + " | ".join([f"{a:.1f}" for a in m] + ["–"] * (n - len(m))) + f" | {max(m) - m[-1]:.1f} |")
        lines.append("")
    return lines


def _stage_time_text(rec: dict) -> str:
    """Stage compute times from the artifacts (runs recorded before they were kept have none)."""
    parts = [f"{v}: students {t['students']:.0f} s, counterfactual sets {t['counterfactuals']:.0f} s, "
             f"classifiers {t['classifiers']:.0f} s" for v, r in rec["results"].items() if (t := r.get("stage_seconds"))]
    return "; stage compute times from the artifacts (over all invocations): " + "; ".join(parts) if parts else ""


# ---- the ImageNet cost record -------------------------------------------------------------------


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
