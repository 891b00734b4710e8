"""Configs are dataclasses; YAML files and `--field value` CLI options map onto them, validated.

Each field of a config dataclass is declared with `setting(...)`: its default, its range or
choices, its unit, a help line and whether it belongs to the identity of what the config makes
(the dict hashed into a stage's manifest). `validate_config` checks every field against that
metadata with one message style, `identity` builds the hashed dict, `add_config_arguments`
shows unit and range in `--help`, and `load_presets` reads the presets shipped as YAML files
under `skdcgn/configs/<kind>/`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import torch

from .errors import SkdcgnError, first_line

C = TypeVar("C")

PRESET_KINDS = ("distill", "teacher", "run", "bench")
_CONFIGS = Path(__file__).resolve().parent / "configs"
# identity modes (`setting(identity=...)`): always hashed, never hashed, hashed at its default
# value whatever it is set to, or hashed only when it differs from its default
_IDENTITY_MODES = (True, False, "default", "changed")


def setting(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False, choices: Iterable[Any] | None = None, unit: str = "",
            help: str = "", identity: bool | str = True) -> Any:
    """A dataclass field with its metadata: the one place a config field's rules are written.

    default: the field's default (omit it for a required field). lo / hi: inclusive bounds of a
    number (`lo_open` / `hi_open` make them exclusive); for a tuple or list field they bound each
    element. choices: the allowed values (each element's, for a tuple or list). unit: what the
    number counts ("steps", "images", "px"), shown in `--help`. help: one line for `--help`.
    identity: whether the field is part of what the config makes, i.e. of the dict `identity()`
    hashes into stage manifests: True (always), False (never: where or how fast a stage ran, e.g.
    `device`, `threads`), "default" (always at its default value, so that records made before the
    field became free keep their hash) or "changed" (only when it differs from its default, so
    that records made before the field existed keep their hash).
    Returns `dataclasses.field(...)`; the rules are checked by `validate_config`.
    """
    if identity not in _IDENTITY_MODES:
        raise ValueError(f"identity must be one of {_IDENTITY_MODES}, got {identity!r}")
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": tuple(choices) if choices is not None else None, "unit": unit, "help": help,
            "identity": identity}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _range_text(meta: typing.Mapping) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def check_value(name: str, value: Any, meta: typing.Mapping) -> None:
    """Check one value against a field's metadata (`setting`); raises `SkdcgnError` in one line:
    `name: value is outside [lo, hi]`, `name: 'x' is not one of a, b` or `name: expected a number,
    got value`. A tuple or list is checked element by element."""
    if isinstance(value, (list, tuple)):
        for v in value:
            check_value(name, v, meta)
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise SkdcgnError(f"{name}: {value!r} is not one of {', '.join(str(c) for c in choices)}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SkdcgnError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        ok = False
    else:
        ok = ((lo is None or (value > lo if meta.get("lo_open") else value >= lo))
              and (hi is None or (value < hi if meta.get("hi_open") else value <= hi)))
    if not ok:
        raise SkdcgnError(f"{name}: {value!r} is outside {_range_text(meta)}")


def validate_config(cfg: Any) -> None:
    """Check every field of the config dataclass `cfg` against its `setting` metadata (range,
    choices); fields declared without metadata are not checked. Raises `SkdcgnError` (one line
    naming the field, see `check_value`). Cross-field rules stay in each class's `validate()`."""
    for f in dataclasses.fields(cfg):
        if f.metadata:
            check_value(f.name, getattr(cfg, f.name), f.metadata)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def identity(cfg: Any) -> dict:
    """What the config dataclass `cfg` makes, as the dict a stage hashes (`io.config_hash`): every
    field whose `setting(identity=...)` is True (the default for fields without metadata), the
    "default" fields at their default values and the "changed" fields only where they differ from
    their defaults; identity=False fields are left out. Values are deep copies (tuples stay tuples;
    the hash writes them as JSON lists)."""
    out: dict = {}
    for f in dataclasses.fields(cfg):
        mode = f.metadata.get("identity", True)
        value = getattr(cfg, f.name)
        if mode is True:
            out[f.name] = copy.deepcopy(value)
        elif mode == "default":
            out[f.name] = copy.deepcopy(_default_of(f))
        elif mode == "changed" and value != _default_of(f):
            out[f.name] = copy.deepcopy(value)
    return out


def config_to_dict(cfg: Any) -> dict:
    """Every field of the config dataclass `cfg` as plain YAML/JSON data (tuples as lists)."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def dump_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the config dataclass `cfg` (every field, resolved) as a YAML file, atomically
    (`io.write_bytes`); `--config` of that file gives the same config back. Returns the path;
    raises `SkdcgnError` when it cannot be written."""
    import yaml

    from .io import write_bytes

    path = Path(path)
    text = f"# {type(cfg).__name__}, every field resolved (skdcgn --dump-config)\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    write_bytes(path, text.encode())
    return path


def load_presets(kind: str, config_cls: type | None = None) -> dict[str, dict]:
    """The presets of `kind` (one of `PRESET_KINDS`: distill, teacher, run, bench), read from the
    YAML files shipped in `skdcgn/configs/<kind>/<name>.yaml`, by name (sorted).

    Each preset is a dict of field values (only those that differ from the dataclass defaults).
    With `config_cls`, each is validated through `config_from_dict` (a bad shipped file is a
    one-line `SkdcgnError` naming it) and values of tuple fields are returned as tuples, as
    `config_from_dict` would make them. Raises `SkdcgnError` for an unknown kind or a bad file.
    """
    if kind not in PRESET_KINDS:
        raise SkdcgnError(f"unknown preset kind {kind!r}; choose one of: {', '.join(PRESET_KINDS)}")
    folder = _CONFIGS / kind
    presets: dict[str, dict] = {}
    for path in sorted(folder.glob("*.yaml")):
        values = load_yaml(path)
        if config_cls is not None:
            cfg = config_from_dict(config_cls, values, str(path))
            values = {k: getattr(cfg, k) for k in values}
        presets[path.stem] = values
    if not presets:
        raise SkdcgnError(f"{folder}: no presets found (a broken installation?)")
    return presets


def preset_values(presets: dict[str, dict], name: str) -> dict:
    """A copy of preset `name` of `presets`; raises `SkdcgnError` naming the known ones."""
    if name not in presets:
        raise SkdcgnError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return dict(presets[name])


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
    missing = [f.name for f in fields.values() if f.name not in out and _default_of(f) is dataclasses.MISSING]
    if missing:
        raise SkdcgnError(f"{source}: missing config field '{missing[0]}'")
    cfg = config_cls(**out)
    if hasattr(cfg, "validate"):
        cfg.validate()
    else:
        validate_config(cfg)
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
        raise SkdcgnError(f"{path}: not a valid YAML file ({first_line(e)})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise SkdcgnError(f"{path}: expected a mapping of config fields")
    return obj


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = ()) -> None:
    """`--config FILE.yaml`, `--dump-config FILE.yaml` and one `--field value` option per
    dataclass field (except `skip`), whose help shows the field's help line, unit, range or
    choices and default (from its `setting` metadata)."""
    parser.add_argument("--config", metavar="YAML", help="config file; options given on the command line win")
    parser.add_argument("--dump-config", metavar="YAML",
                        help="write the resolved config (preset < --config < options) to this YAML file and exit "
                             "without running; --config of it gives the same config back")
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(f"{config_cls.__name__} fields")
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"dest": f"cfg_{f.name}", "default": None, "help": _field_help(f, default)}
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


def _field_help(f: dataclasses.Field, default: Any) -> str:
    meta = f.metadata
    parts = []
    if meta.get("choices") is not None:
        parts.append("one of " + ", ".join(str(c) for c in meta["choices"]))
    rng = _range_text(meta)
    if rng:
        parts.append(rng)
    if meta.get("unit"):
        parts.append(meta["unit"])
    text = meta.get("help", "")
    detail = " ".join(parts)
    if detail:
        text = f"{text} ({detail})" if text else detail
    shown = default if not isinstance(default, (list, tuple)) else " ".join(str(x) for x in default)
    text = f"{text}; " if text else ""
    return (text + f"default: {shown if shown != '' else 'none'}").replace("%", "%%")


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
