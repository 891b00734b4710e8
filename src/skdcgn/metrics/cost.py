"""What a generator costs: parameters, MACs per image, images/s, peak memory; teacher and
student side by side, measured in one run (interleaved, so a busy machine slows both alike).

- MACs come from torch's own FLOP counter (`torch.utils.flop_counter.FlopCounterMode`), which
  counts matmuls and convolutions (2 FLOPs per multiply-accumulate): MACs = FLOPs / 2. Element-wise
  work (norms, activations, the composition) is not counted, as is customary.
- Throughput: after warm-up calls, each repeat times enough calls to last `min_seconds`; the
  median over repeats is reported. `torch.set_num_threads` is respected (it is recorded).
- Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over one call, minus what was allocated
  before it. On the CPU no per-call figure is reliable (tracemalloc does not see torch's
  allocator, and ru_maxrss is a process-lifetime high-water mark), so it is reported as None.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import resolve_device
from ..models.pretrained import count_params  # noqa: F401  (one counter; re-exported for the cost API)

logger = logging.getLogger(__name__)

UNITS = ("shape", "foreground", "background", "composite")


@torch.no_grad()
def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of one call of `fn`, by torch's FLOP counter (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _time_once(fn: Callable[[], object], device: torch.device, min_seconds: float) -> float:
    """Seconds per call, averaged over as many calls as fill `min_seconds` (at least one)."""
    calls, start = 0, time.perf_counter()
    _sync(device)
    while True:
        fn()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


@torch.no_grad()
def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


@torch.no_grad()
def throughput(fns: dict[str, Callable[[], object]], batch: int, device: torch.device,
               warmup: int = 2, repeats: int = 5, min_seconds: float = 0.05) -> dict[str, float]:
    """Images/s of each function (one batch per call), timed interleaved: the repeats of the
    different functions alternate, then the median seconds per call of each is used."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_time_once(fn, device, min_seconds))
    return {k: batch / statistics.median(v) for k, v in times.items()}


def unit_fn(cgn, unit: str, batch: int, device: torch.device, seed: int = 0) -> Callable[[], object]:
    """A call that produces one batch of `unit` (a mechanism's output, or composites) of `cgn`.

    Mechanisms are called directly with fixed inputs (noise and labels prepared once); composites
    go through `CGN.sample`, noise drawing and texture shift included, as a user would call it.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, cgn.n_classes, (batch,), generator=g)
    if unit == "composite":
        def run():
            return cgn.sample(y, generator=g)
        return run
    mech = cgn.mechanisms()[unit]
    u = torch.randn(batch, mech.config.latent_dim, generator=g).to(device)
    yd = y.to(device)

    def run_mech():
        return mech(u, yd)
    return run_mech


def unit_params(cgn, unit: str) -> int:
    """Parameter count of one unit of `cgn`: a mechanism's ("shape", "foreground", "background"), or
    the whole CGN's for "composite".
    """
    return count_params(cgn) if unit == "composite" else count_params(cgn.mechanisms()[unit])


@torch.no_grad()
def cost_table(models: dict[str, object], device: torch.device | str = "cpu",
               batch_sizes: Sequence[int] = (1, 64, 256), units: Sequence[str] = UNITS,
               warmup: int = 2, repeats: int = 5, min_seconds: float = 0.05, mac_batch: int = 8) -> dict:
    """Cost of each unit of each CGN in `models` (e.g. {"teacher": t, "student": s}).

    Returns {"rows": [{unit, model, params, macs_per_image, images_per_s: {batch: v},
    peak_memory_bytes: {batch: v or None}}], "ratios": [{unit, params, macs, speed: {batch}}]
    (ratios = first model / second model for params and MACs, second / first for speed), and the
    settings}. Models are put in eval mode on `device`.
    """
    device = resolve_device(device)
    for m in models.values():
        m.to(device).eval()  # type: ignore[attr-defined]
    rows = []
    for unit in units:
        per_model = {}
        for name, cgn in models.items():
            macs = count_macs(unit_fn(cgn, unit, mac_batch, device)) / mac_batch
            per_model[name] = {"unit": unit, "model": name, "params": unit_params(cgn, unit),
                               "macs_per_image": int(round(macs)), "images_per_s": {}, "peak_memory_bytes": {}}
        for b in batch_sizes:
            fns = {name: unit_fn(cgn, unit, b, device) for name, cgn in models.items()}
            speeds = throughput(fns, b, device, warmup, repeats, min_seconds)
            for name in models:
                per_model[name]["images_per_s"][b] = speeds[name]
                per_model[name]["peak_memory_bytes"][b] = peak_memory(fns[name], device)
            logger.info(f"cost {unit} batch {b}: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in speeds.items()))
        rows.extend(per_model.values())
    ratios = []
    names = list(models)
    if len(names) == 2:
        a, s = names
        for unit in units:
            ra = next(r for r in rows if r["unit"] == unit and r["model"] == a)
            rs = next(r for r in rows if r["unit"] == unit and r["model"] == s)
            ratios.append({
                "unit": unit,
                "params": ra["params"] / max(rs["params"], 1),
                "macs": ra["macs_per_image"] / max(rs["macs_per_image"], 1),
                "speed": {b: rs["images_per_s"][b] / ra["images_per_s"][b] for b in batch_sizes},
            })
    return {"rows": rows, "ratios": ratios, "device": str(device), "batch_sizes": list(batch_sizes),
            "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "min_seconds": min_seconds}
