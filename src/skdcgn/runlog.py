"""The one metrics writer of every training loop: rows of numbers as CSV and JSONL, optionally
TensorBoard.

A trainer keeps its rows (one per logged step or epoch) and hands them over; `MetricsLog.write`
rewrites `<name>.csv` and `<name>.jsonl` atomically (`io.write_bytes`), so a process killed at any
moment leaves the previous complete files, never a torn last line, and a resumed run that trims
its rows back to its checkpoint writes exactly the files of an uninterrupted run. Rewriting is
cheap at these sizes (a full-length teacher run logs ~500 rows).

CSV: a header, then one line per row; ints as they are, floats with 6 significant digits, a value
a row lacks as an empty field. JSONL: one JSON object per row with the unrounded values (NaN as
null).

TensorBoard (`skdcgn --tensorboard …`, needs `pip install 'skdcgn[tensorboard]'`): each log also
writes event files to a `tensorboard/<name>/` folder beside it, one scalar per field against
`step_field`; a resumed run purges the events after its checkpoint's step.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from .errors import SkdcgnError
from .io import write_bytes

_TENSORBOARD = {"on": False}


def enable_tensorboard(on: bool = True) -> None:
    """Make every `MetricsLog` created from now on also write TensorBoard event files. Raises
    `SkdcgnError` when the `tensorboard` package is missing."""
    if on:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise SkdcgnError("--tensorboard needs the tensorboard package: pip install 'skdcgn[tensorboard]'") from None
    _TENSORBOARD["on"] = on


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLog:
    """Rows of one run's metrics at `path` (a `.csv`; the `.jsonl` twin beside it).

    `fields`: the columns, in order (a row may lack some; keys beyond them are appended, sorted,
    e.g. monitored accuracies). `step_field`: the x axis of TensorBoard (e.g. "step", "epoch").
    `resumed_at`: the step (in `step_field` units) a resumed run continues from; TensorBoard
    events after it, from the interrupted process, are purged.
    """

    def __init__(self, path: str | Path, fields: Sequence[str], step_field: str | None = None,
                 resumed_at: int = 0) -> None:
        self.path = Path(path)
        self.fields = tuple(fields)
        self.step_field = step_field or self.fields[0]
        self.resumed_at = int(resumed_at)
        self._tb = None
        self._tb_last = self.resumed_at

    def read(self) -> list[dict[str, float | int | str]]:
        """The rows written so far, from the JSONL (unrounded: a resumed run then rewrites exactly
        the files of an uninterrupted one), else from the CSV (numbers parsed); [] without either.
        Raises `SkdcgnError` for a file that is not this log's table."""
        jsonl = self.path.with_suffix(".jsonl")
        if jsonl.is_file():
            try:
                rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
                if not all(isinstance(r, dict) for r in rows):
                    raise ValueError("a line is not an object")
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise SkdcgnError(f"{jsonl}: not a metrics log ({type(e).__name__}: {str(e)[:100]})") from None
            return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]
        return read_table(self.path) if self.path.is_file() else []

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rewrite the CSV and JSONL with `rows` (atomically), and send rows newer than the last
        sent to TensorBoard when enabled."""
        fields = (*self.fields, *sorted({k for r in rows for k in r} - set(self.fields)))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(fields)
        w.writerows([_cell(r.get(k)) for k in fields] for r in rows)
        write_bytes(self.path, buf.getvalue().encode())
        lines = "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}, sort_keys=True) + "\n" for r in rows)
        write_bytes(self.path.with_suffix(".jsonl"), lines.encode())
        if _TENSORBOARD["on"]:
            self._to_tensorboard(rows)

    def _to_tensorboard(self, rows: Sequence[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._tb is None:  # a resumed run writes the steps after its checkpoint again: old events go
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard" / self.path.stem),
                                     purge_step=self.resumed_at + 1 if self.resumed_at else None)
        for r in rows:
            step = int(r[self.step_field])
            if step <= self._tb_last:
                continue
            for k, v in r.items():
                if k != self.step_field and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb_last = step
        self._tb.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if any (the CSV and JSONL need no closing)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_table(path: str | Path) -> list[dict[str, float | int | str]]:
    """The rows of a metrics CSV (a header, then one line per row), numbers parsed (int, else
    float, else the text as it is), empty fields left out; a torn last line (a file appended to
    by an older version when it was killed) is dropped. The one reader of the trainers' tables
    (resume, the run report's figures). Raises `SkdcgnError` naming the file when it is missing or
    not a CSV table."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: _number(v) for k, v in r.items() if v != ""} for r in rows
                if None not in r and None not in r.values()]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise SkdcgnError(f"{path}: not a metrics table ({type(e).__name__}: {str(e)[:100]})") from None


def _number(text: str) -> float | int | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
