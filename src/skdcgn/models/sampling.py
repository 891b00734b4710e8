"""Composites in bulk at a fixed batch size, with the CGN's forward compiled or captured once.

A CGN-MNIST composite is three small generators and a composition: at small and medium batches a
GPU spends its time launching kernels, not computing (issue #22 measured the students at 0.24× to
0.90× the teacher's composites/s on a GPU below batch 8,192 for this reason). `CGNSampler` takes
that overhead out: it runs the three mechanisms, the texture shift and the composition as one
function of fixed-size inputs, either

- "eager": the PyTorch modules as they are (exactly `CGN.sample`: same draws, same operations,
  at the call's own batch size; bitwise equal on the CPU),
- "compile": that function through `torch.compile` (Inductor; the CPU too, with a C++ compiler),
  one compilation for the sampler's batch size (tens of seconds; every compiled sampler of a
  process counts towards torch._dynamo's recompile limit, 8 by default, beyond which torch runs
  the forward eagerly),
- "graph": that function captured once in a CUDA graph (`torch.cuda.CUDAGraph`, after warm-up
  calls on a side stream) and replayed per call: inputs are copied into static buffers, the
  graph is replayed, the outputs are cloned out of the graph's static outputs,
- "auto": "graph" on a CUDA device, "eager" anywhere else.

Randomness is unchanged by the mode: every call draws its noise (and texture-shift offsets) from
the caller's CPU `torch.Generator`, exactly as `CGN.sample` / `CGN.run_mechanism` /
`compose.random_shift` do (per mechanism, in the order shape, foreground, background: the noise
u, then for a `shifted_texture` mechanism all row offsets, then all column offsets), and only
then runs the forward. So the same generator state gives the same composites in every mode:
bitwise in "eager", within float tolerance in "compile" and "graph" (other kernels, and a batch
padded to the captured size).

Fixed batch: a sampler of `batch_size` B runs "compile" and "graph" on exactly B composites.
A call with fewer is padded (zero noise, class 0, offset 0) and its outputs sliced: the padded
rows are computed and thrown away, the real rows are unaffected (every mechanism is per-sample
in eval mode). A call with more is drawn whole first, then run in chunks of B. "eager" runs the
call's own size unless `fixed_batch=True`.

If the capture or the compilation fails (an operation a CUDA graph cannot hold, no compiler),
the sampler logs one warning and runs eagerly; `mode` then says "eager" and `requested` what
was asked for.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..compose import circular_shift, compose, shift_offsets
from ..errors import SkdcgnError
from .cgn import CGN, MECHANISMS, CGNSample

logger = logging.getLogger(__name__)

SAMPLER_MODES = ("auto", "eager", "compile", "graph")
GRAPH_WARMUP = 3  # forward calls on a side stream before a CUDA graph is captured (cuDNN autotuning, allocator)


def resolve_sampler_mode(mode: str, device: torch.device | str) -> str:
    """The mode a sampler runs in on `device`: "auto" → "graph" on CUDA, "eager" elsewhere; the
    others as given. Raises `SkdcgnError` (one line) for an unknown mode, or "graph" off CUDA."""
    device = torch.device(device)
    if mode not in SAMPLER_MODES:
        raise SkdcgnError(f"sampler: {mode!r} is not one of {', '.join(SAMPLER_MODES)}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise SkdcgnError(f"sampler: 'graph' (a CUDA graph) needs a CUDA device, the CGN is on {device}; "
                          "use auto, eager or compile")
    return mode


class CGNSampler:
    """Composites of a `CGN` (teacher, students or a hybrid) at a fixed batch size, its forward
    compiled or captured once (see the module doc for the modes and the padding).

    cgn: put in eval mode (batch norms use their running statistics, so every row is computed
    independently of the others); it stays on its device; its weights are read at every call in
    "eager" and "compile", and captured by reference in "graph" (an in-place weight update shows,
    a `.to()` to another device does not: build a new sampler).
    batch_size: composites per forward, in [1, 1,048,576]: the size compiled or captured.
    mode: one of `SAMPLER_MODES`.
    per_shape: composites per mask in [1, 10,000]; `batch_size` must be a multiple of it. With 1 the
    sampler is `CGN.sample`; with k each mask is composed with k foreground/background pairs (the
    recipe of `skdcgn.counterfactuals.sample_counterfactuals`), and `run` takes
    batch_size / k shape classes and batch_size texture classes.
    fixed_batch: run every call at exactly `batch_size` rows (padded or chunked); None: True in
    "compile" and "graph" (their forward has one shape), False in "eager".

    Raises `SkdcgnError` for a bad setting, "graph" off CUDA, or a CGN that is not a `CGN`.
    """

    def __init__(self, cgn: CGN, batch_size: int, mode: str = "auto", per_shape: int = 1,
                 fixed_batch: bool | None = None) -> None:
        if not isinstance(cgn, CGN):
            raise SkdcgnError(f"sampler: expected a CGN, got {type(cgn).__name__}")
        for name, value, hi in (("batch_size", batch_size, 2**20), ("per_shape", per_shape, 10_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise SkdcgnError(f"sampler: {name} must be an integer in [1, {hi}], got {value!r}")
        if batch_size % per_shape:
            raise SkdcgnError(f"sampler: batch_size {batch_size} is not a multiple of per_shape {per_shape}")
        self.cgn = cgn.eval()
        self.device = cgn.device
        self.requested = mode
        self.mode = resolve_sampler_mode(mode, self.device)
        self.batch_size, self.per_shape = batch_size, per_shape
        self.n_shapes = batch_size // per_shape
        self.fixed_batch = self.mode != "eager" if fixed_batch is None else bool(fixed_batch)
        if self.mode == "graph" and not self.fixed_batch:
            raise SkdcgnError("sampler: a CUDA graph replays one batch size; 'graph' needs fixed_batch")
        mechs = cgn.mechanisms()
        self.latent_dim = {name: int(m.config.latent_dim) for name, m in mechs.items()}
        self.shifted = {name: bool(getattr(m.config, "shifted_texture", False)) for name, m in mechs.items()}
        with torch.no_grad():  # one row of zeros: each mechanism's output shape [C, H, W]
            self.out_shape = {name: tuple(m(torch.zeros(1, self.latent_dim[name], device=self.device),
                                            torch.zeros(1, dtype=torch.long, device=self.device)).shape[1:])
                              for name, m in mechs.items()}
        self._fn = self._forward
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: dict[str, Tensor] = {}
        self._static_out: tuple[Tensor, ...] = ()
        if self.mode == "compile":
            self._compile()
        elif self.mode == "graph":
            self._capture()

    # ---- draws ----------------------------------------------------------------------------------

    def draw(self, name: str, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """What `CGN.run_mechanism(name, y, generator)` draws for `n` rows, in its order, on the CPU:
        {"u": float32 [n, latent_dim] standard normal} and, for a `shifted_texture` mechanism,
        {"dy", "dx": int64 [n], pixels in [0, H) and [0, W)} (`compose.shift_offsets`)."""
        out = {"u": torch.randn(n, self.latent_dim[name], generator=generator)}
        if self.shifted[name]:
            _, h, w = self.out_shape[name]
            out["dy"], out["dx"] = shift_offsets(n, h, w, generator)
        return out

    # ---- the forward ----------------------------------------------------------------------------

    def _forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The three mechanisms, their shifts and x = m·f + (1 − m)·b on device tensors: inputs
        "<mechanism>.u" [n, latent], "<mechanism>.y" [n] and, where shifted, "<mechanism>.dy/.dx";
        the shape's rows are n / per_shape."""
        outs = []
        for name, mech in self.cgn.mechanisms().items():
            out = mech(inputs[f"{name}.u"], inputs[f"{name}.y"])
            if self.shifted[name]:
                out = circular_shift(out, inputs[f"{name}.dy"], inputs[f"{name}.dx"])
            outs.append(out)
        mask, fg, bg = outs
        # each mask per_shape times in a row (repeat_interleave's values; expand + reshape never syncs the host)
        m = mask if self.per_shape == 1 else \
            mask[:, None].expand(-1, self.per_shape, -1, -1, -1).reshape(fg.shape[0], *mask.shape[1:])
        return mask, fg, bg, compose(m, fg, bg)

    def _static_inputs(self) -> dict[str, Tensor]:
        """Zero inputs of the fixed size on the device: the padding values and the graph's buffers."""
        out = {}
        for name in MECHANISMS:
            n = self.n_shapes if name == "shape" else self.batch_size
            out[f"{name}.u"] = torch.zeros(n, self.latent_dim[name], device=self.device)
            out[f"{name}.y"] = torch.zeros(n, dtype=torch.long, device=self.device)
            if self.shifted[name]:
                out[f"{name}.dy"] = torch.zeros(n, dtype=torch.long, device=self.device)
                out[f"{name}.dx"] = torch.zeros(n, dtype=torch.long, device=self.device)
        return out

    def _fall_back(self, what: str, err: BaseException) -> None:
        logger.warning(f"sampler: {what} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                       "running eagerly")
        self.mode, self._fn, self._graph, self._static_in, self._static_out = "eager", self._forward, None, {}, ()

    @torch.no_grad()
    def _compile(self) -> None:
        """torch.compile the forward for the fixed shapes, compiled now by one call (Inductor)."""
        try:
            fn = torch.compile(self._forward, dynamic=False)
            fn(self._static_inputs())
            self._fn = fn
        except Exception as err:  # noqa: BLE001  (any compiler failure: run eagerly, once warned)
            self._fall_back("torch.compile", err)

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm up on a side stream, then capture the forward in a CUDA graph on static buffers."""
        try:
            with torch.cuda.device(self.device):
                static = self._static_inputs()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(GRAPH_WARMUP):
                        self._forward(static)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = self._forward(static)
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001  (an op a graph cannot hold, an old driver: run eagerly, once warned)
            self._fall_back("CUDA graph capture", err)
            return
        self._graph, self._static_in, self._static_out = graph, static, outputs

        def replay(inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
            for key, buf in self._static_in.items():
                buf.copy_(inputs[key])
            self._graph.replay()  # type: ignore[union-attr]
            return self._static_out
        self._fn = replay

    # ---- calls ----------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, y_shape: Tensor, y_fg: Tensor, y_bg: Tensor, noise: dict[str, dict[str, Tensor]]) -> CGNSample:
        """Mask, foreground, background and composite for given classes and draws (`draw`).

        y_shape: int64 [S]; y_fg, y_bg: int64 [S · per_shape], classes in [0, n_classes);
        noise: {"shape", "foreground", "background"} → what `draw` returned for S, S · per_shape,
        S · per_shape rows. Returns a `CGNSample` on the CGN's device whose `mask` has S rows and the
        rest S · per_shape (the composite uses each mask per_shape times); the tensors are the
        caller's own (cloned out of a graph's static outputs). Raises `SkdcgnError` for
        mismatched lengths.
        """
        s = len(y_shape)
        n = s * self.per_shape
        rows = {"shape": s, "foreground": n, "background": n}
        ys = {"shape": y_shape, "foreground": y_fg, "background": y_bg}
        for name in MECHANISMS:
            if len(ys[name]) != rows[name] or len(noise[name]["u"]) != rows[name]:
                raise SkdcgnError(f"sampler: {name} needs {rows[name]} classes and draws "
                                  f"(per_shape {self.per_shape}), got {len(ys[name])} and {len(noise[name]['u'])}")
        inputs = {}
        for name in MECHANISMS:
            inputs[f"{name}.y"] = torch.as_tensor(ys[name], dtype=torch.long)
            for key, t in noise[name].items():
                inputs[f"{name}.{key}"] = t
        if not self.fixed_batch:
            return CGNSample(*self._fn({k: v.to(self.device) for k, v in inputs.items()}))
        parts = [self._run_fixed(inputs, start, min(self.n_shapes, s - start))
                 for start in range(0, max(s, 1), self.n_shapes)]  # no rows: one padded call, sliced to none
        if len(parts) == 1:
            return parts[0]
        return CGNSample(*(torch.cat(ts) for ts in zip(*parts)))

    def _run_fixed(self, inputs: dict[str, Tensor], start: int, count: int) -> CGNSample:
        """Shapes [start, start + count) (count ≤ n_shapes) at the fixed size: padded, run, sliced, cloned."""
        k = self.per_shape
        fixed = {}
        for key, t in inputs.items():
            lo, hi = (start, start + count) if key.startswith("shape.") else (start * k, (start + count) * k)
            part = t[lo:hi].to(self.device)
            if count < self.n_shapes:
                size = self.n_shapes if key.startswith("shape.") else self.batch_size
                part = torch.cat([part, part.new_zeros((size - len(part),) + tuple(part.shape[1:]))])
            fixed[key] = part
        mask, fg, bg, x = self._fn(fixed)
        return CGNSample(mask[:count].clone(), fg[:count * k].clone(), bg[:count * k].clone(), x[:count * k].clone())

    def sample(self, y_shape: Tensor, y_fg: Tensor | None = None, y_bg: Tensor | None = None,
               generator: torch.Generator | None = None) -> CGNSample:
        """`CGN.sample` through this sampler (per_shape 1 only): the same arguments, the same draws
        from `generator` in the same order, a `CGNSample` of N composites [N, 3, H, W] in [-1, 1]
        (mask [N, 1, H, W] in [0, 1]) on the CGN's device; any N (padded or chunked to
        `batch_size` in a fixed-batch mode). Raises `SkdcgnError` for bad class indices or a
        sampler made with per_shape > 1."""
        if self.per_shape != 1:
            raise SkdcgnError(f"sampler: sample() composes one texture pair per mask; this one has per_shape "
                              f"{self.per_shape} (use run())")
        y_shape, y_fg, y_bg = self.cgn.classes(y_shape, y_fg, y_bg)
        n = len(y_shape)
        noise = {name: self.draw(name, n, generator) for name in MECHANISMS}
        return self.run(y_shape, y_fg, y_bg, noise)

    def __repr__(self) -> str:
        return (f"CGNSampler(mode={self.mode!r}, requested={self.requested!r}, batch_size={self.batch_size}, "
                f"per_shape={self.per_shape}, device={self.device})")
