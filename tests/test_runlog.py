"""The one metrics writer (skdcgn.runlog): CSV and JSONL rewritten atomically, read back for a
resume, and TensorBoard event files with --tensorboard."""
from __future__ import annotations

import json
import math

import pytest

from skdcgn.errors import SkdcgnError
from skdcgn.runlog import MetricsLog, enable_tensorboard


def test_rows_go_to_csv_and_jsonl_and_read_back(tmp_path):
    log = MetricsLog(tmp_path / "losses.csv", ("step", "loss", "seconds"))
    rows = [{"step": 1, "loss": 0.123456789, "seconds": 0.5}, {"step": 2, "loss": float("nan"), "seconds": 1.0,
                                                               "test_accuracy": 0.25}]
    log.write(rows)
    assert (tmp_path / "losses.csv").read_text() == ("step,loss,seconds,test_accuracy\n"
                                                     "1,0.123457,0.5,\n2,nan,1,0.25\n")
    lines = [json.loads(x) for x in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "loss": 0.123456789, "seconds": 0.5} and lines[1]["loss"] is None
    back = log.read()  # from the JSONL: unrounded, as a resumed run needs them
    assert back[0] == {"step": 1, "loss": 0.123456789, "seconds": 0.5} and math.isnan(back[1]["loss"])
    (tmp_path / "losses.jsonl").unlink()  # a log of an older version: the CSV
    assert log.read()[0] == {"step": 1, "loss": 0.123457, "seconds": 0.5}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_torn_last_line_is_dropped_and_a_foreign_file_refused(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n3")  # an older version killed while appending
    assert MetricsLog(path, ("step", "loss")).read() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SkdcgnError, match="not a metrics table"):
        MetricsLog(path, ("step", "loss")).read()
    path.with_suffix(".jsonl").write_text('{"step": 1}\n[2]\n')
    with pytest.raises(SkdcgnError, match="not a metrics log"):
        MetricsLog(path, ("step", "loss")).read()


def test_tensorboard_events_are_written_and_a_resume_purges_what_follows_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    enable_tensorboard(True)
    try:
        log = MetricsLog(tmp_path / "losses.csv", ("step", "loss"))
        log.write([{"step": 1, "loss": 1.0}])
        log.write([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}])
        log.close()
        resumed = MetricsLog(tmp_path / "losses.csv", ("step", "loss"), resumed_at=2)  # killed after step 2's checkpoint
        resumed.write([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.3}])
        resumed.close()
    finally:
        enable_tensorboard(False)
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "losses"))
    acc.Reload()
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.3)]
