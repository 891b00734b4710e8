"""Configs are dataclasses; YAML files and `--field value` CLI options map onto them, validated."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import SkdcgnError

C = TypeVar("C")


def config_from_dict(config_cls: type[C], values: dict, source: str) -> C:
    """Build a config dataclass from untrusted values: known keys only, types checked."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SkdcgnError(f"{source}: unknown config field '{unknown[0]}' (known: {', '.join(fields)})")
    hints = typing.get_type_hints(config_cls)
    out = {}
    for name, value in values.items():
        want = hints[name]
        origin = typing.get_origin(want)
        ok: tuple = (want,) if origin is None else tuple(a for a in typing.get_args(want) if isinstance(a, type))
        if origin in (list, tuple):
            ok = (list, tuple)
        if float in ok and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in ok) or not isinstance(value, ok):
            raise SkdcgnError(f"{source}: field '{name}' should be {getattr(want, '__name__', want)}, got {value!r}")
        if isinstance(value, float) and value != value:
            raise SkdcgnError(f"{source}: field '{name}' is NaN")
        out[name] = tuple(value) if origin is tuple else value
    cfg = config_cls(**out)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML config file as a dict of field values (`yaml.safe_load`: plain data, never objects;
    an empty file is {}). Raises `SkdcgnError` for a missing, unreadable or non-mapping file."""
    import yaml

    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text())  # safe_load: plain data, never objects
    except FileNotFoundError:
        raise SkdcgnError(f"{path}: config file not found") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise SkdcgnError(f"{path}: not a valid YAML file ({str(e).splitlines()[0]})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise SkdcgnError(f"{path}: expected a mapping of config fields")
    return obj


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = ()) -> None:
    """`--config FILE.yaml` plus one `--field value` option per dataclass field."""
    parser.add_argument("--config", metavar="YAML", help="config file; options given on the command line win")
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(f"{config_cls.__name__} fields")
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"dest": f"cfg_{f.name}", "default": None, "help": f"default: {default if default != '' else 'none'}"}
        if t is not bool:
            kw["metavar"] = f.name.upper()
        if t is bool:
            kw["type"] = _parse_bool
        elif t in (int, float, str):
            kw["type"] = t
        elif typing.get_origin(t) in (list, tuple):
            kw["nargs"] = "*"  # `--composers` alone: the empty list
            args = typing.get_args(t)
            kw["type"] = args[0] if args and args[0] in (int, float, str) else str
        group.add_argument(f"--{f.name.replace('_', '-')}", **kw)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(config_cls: type[C], args: argparse.Namespace, base: dict | None = None,
                     override: dict | None = None) -> C:
    """Defaults < `base` (a preset) < YAML file < command-line options (< `override`, other options)."""
    values = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            values[f.name] = v
    values.update(override or {})
    return config_from_dict(config_cls, values, "config")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device a command runs on, checked to be usable by this torch build before any work.

    `auto`: CUDA when present, else the CPU. `cpu`, `cuda[:N]` (N < the number of visible GPUs),
    and `mps`/`xpu` where this torch reports them available. A `torch.device` is checked the same
    way. Raises `SkdcgnError` (one line) for an unknown name, a device this machine or torch build
    lacks, or `meta` (a device that holds no data).
    """
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = name if isinstance(name, torch.device) else torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SkdcgnError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SkdcgnError(f"device {str(name)!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SkdcgnError(f"device {str(name)!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type != "meta" and callable(available) and available():
        return dev
    raise SkdcgnError(f"device {str(name)!r} is not usable with this torch build on this machine; use auto, cpu or cuda[:N]")


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(threads: int | None, what: str = "threads") -> None:
    """Set torch's CPU threads for this process: the one check for every `--threads`.

    0 or None leaves torch's default. Otherwise 1 ≤ threads ≤ `usable_cpus()`: more threads than
    CPUs only make them wait on each other (1,024 on 2 cores ran 40× slower), and a negative or
    huge count crashes torch. Raises `SkdcgnError` (one line naming `what`).
    """
    if threads is None or (threads == 0 and not isinstance(threads, bool)):
        return
    n = usable_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= n:
        raise SkdcgnError(f"{what}: {threads!r} is not a thread count in [1, {n}] "
                          f"(this process may use {n} CPUs; 0 keeps torch's default)")
    torch.set_num_threads(threads)
