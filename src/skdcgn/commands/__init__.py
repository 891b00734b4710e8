"""CLI subcommands: thin argument parsing over the library; no logic of their own."""
from __future__ import annotations

import argparse
from typing import Any


def write_dumped_config(args: argparse.Namespace, cfg: Any) -> bool:
    """For commands built with `config.add_config_arguments`: with `--dump-config FILE`, write the
    resolved config dataclass `cfg` there (`config.dump_config`), say so and return True (the
    command then exits 0 without running); False without `--dump-config`. Raises `SkdcgnError`
    when the file cannot be written."""
    from ..config import dump_config

    path = getattr(args, "dump_config", None)
    if not path:
        return False
    print(f"wrote {dump_config(cfg, path)}")
    return True
