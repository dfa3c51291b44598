"""One training iteration (d_steps D updates, one G update) on static buffers.

The same code runs eagerly or, for the BCE variants on CUDA, is captured once as a CUDA graph and
replayed: the batch is gathered on the device from a device-resident permutation at a device-side
position, the noise is drawn on the device, the losses are summed in place into fixed tensors, and
the optimisers are Adam with `capturable=True` (only when a graph will be captured: `will_capture`).
Nothing in an iteration reads a value back to the host, so replaying the graph is the whole iteration:
one launch instead of hundreds. With `train.compile` the iteration runs through torch.compile'd modules
(default mode) and the graph is captured around their kernels; if that capture fails, the modules are
recompiled with `mode="reduce-overhead"` (torch's own per-module CUDA graphs) and the loop goes on without
the whole-iteration graph.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gan import losses
from gan.data import to_float

GRAPH_VARIANTS = ("dcgan", "use-gan", "cmhsa-gan", "use-cmhsa-gan")  # wgan (double backward), vae-gan: eager
GRAPH_MODES = ("auto", "on", "off")
# `cuda_graph: auto` turns graphs on only once a GPU run of `bench/bench_train.py --check-graph` has shown
# graph and eager training agree. No such run has been made yet, so auto means off (bench/README.md).
AUTO_GRAPH = False
WARMUP_ITERATIONS = 3  # eager iterations before capture (cudnn autotuning, Adam's state); they train for real
# torch warns once per optimiser when a capturable Adam steps outside a capture; the warm-up does so on purpose.
UNCAPTURED_STEP_WARNING = r".*capturable=True.*running without .* graph capture.*"


class GraphUnavailable(RuntimeError):
    """Capturing the iteration failed; the trial goes on eagerly."""


def graph_mode(value: Any) -> str:
    """train.cuda_graph as auto | on | off (YAML reads unquoted on/off as booleans)."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value not in GRAPH_MODES:
        raise ValueError(f"cuda_graph must be auto, on or off, got {value!r}")
    return value


def graph_wanted(variant: str, cuda_graph: Any) -> bool:
    """Whether train.cuda_graph asks for a whole-iteration graph for this variant (whatever the device)."""
    mode = graph_mode(cuda_graph)
    return (mode == "on" or (mode == "auto" and AUTO_GRAPH)) and variant in GRAPH_VARIANTS


def will_capture(variant: str, device: torch.device, cuda_graph: Any) -> bool:
    """Whether a trial of this variant on this device with this train.cuda_graph will capture a graph: decided
    before the optimisers are built, which need `capturable=True` exactly then (torch warns otherwise)."""
    return graph_wanted(variant, cuda_graph) and device.type == "cuda" and torch.cuda.is_available()


class DeviceBatches:
    """Epochs of the training split held on the device, normalised to [-1, 1] once, batched by indexing
    with a permutation that also lives on the device: no DataLoader, no per-step copy from the host.

    The position exists twice: `pos_t` on the device (read by a captured graph) and `pos` on the host
    (to know when an epoch ends, without a sync). The permutation is drawn on the CPU from a seeded
    generator, once per epoch, so the order is the same on every device."""

    def __init__(self, images: np.ndarray, batch_size: int, device: torch.device, seed: int):
        if len(images) < batch_size:
            raise ValueError(f"training split has {len(images)} images, fewer than batch_size={batch_size}")
        self.images = to_float(torch.from_numpy(images).to(device))
        self.n = len(images)
        self.batch_size = batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(self.n, generator=self.rng).to(device)
        self.pos = 0
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(batch_size, device=device)

    def room(self) -> int:
        """Whole batches left in this epoch."""
        return (self.n - self.pos) // self.batch_size

    def reshuffle(self) -> None:
        """A new epoch; the ragged tail of the last one is dropped. In place: a captured graph reads perm."""
        self.perm.copy_(torch.randperm(self.n, generator=self.rng))
        self.pos = 0
        self.pos_t.zero_()

    def take(self) -> Tensor:
        """The next batch, gathered on the device. The caller keeps `pos` in step when a graph replays this."""
        if self.pos + self.batch_size > self.n:
            self.reshuffle()
        idx = self.perm.index_select(0, self.pos_t + self.offsets)
        self.pos_t.add_(self.batch_size)
        self.pos += self.batch_size
        return self.images.index_select(0, idx)

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "perm": self.perm.cpu(), "pos": self.pos}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"].cpu())
        self.perm.copy_(state["perm"].to(self.perm.device))
        self.pos = int(state["pos"])
        self.pos_t.fill_(self.pos)


class TrainStep:
    """Call it once per iteration. Loss sums and the all-finite flag accumulate on the device until
    `take_losses()` reads them (once per evaluation: the only host sync of training)."""

    def __init__(self, *, variant: str, models: dict[str, nn.Module], opt_d: torch.optim.Optimizer,
                 opt_g: torch.optim.Optimizer, batches: DeviceBatches, nz: int, d_steps: int,
                 gp_weight: float = 10.0, recon_weight: float = 1.0, kl_weight: float = 1.0,
                 amp: bool = False, memory_format: torch.memory_format = torch.contiguous_format,
                 cuda_graph: str = "off", compiled: dict[str, nn.Module] | None = None,
                 compile_fallback: Callable[[], dict[str, nn.Module]] | None = None):
        self.variant = variant
        self.G, self.D, self.E = models["G"], models["D"], models.get("E")
        nets = compiled or models  # training runs through (optionally) torch.compile'd wrappers
        self.Gc, self.Dc, self.Ec = nets["G"], nets["D"], nets.get("E")
        self.g_params = list(self.G.parameters())
        self.e_params = list(self.E.parameters()) if self.E is not None else []
        self.opt_d, self.opt_g = opt_d, opt_g
        self.batches = batches
        self.nz, self.d_steps = nz, d_steps
        self.gp_weight, self.recon_weight, self.kl_weight = gp_weight, recon_weight, kl_weight
        self.device = batches.images.device
        self.amp, self.memory_format = amp, memory_format
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)
        mode = graph_mode(cuda_graph)
        self.want_graph = graph_wanted(variant, mode)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_note = ""  # why the graph is not in use, when it was asked for
        self.iterations = 0
        self._per_replay: dict[str, int] = {}
        self._side = None
        # Builds torch.compile(mode="reduce-overhead") wrappers, used if capturing the compiled modules fails.
        self._compile_fallback = compile_fallback
        self._mark_cudagraph_steps = False  # reduce-overhead wants each iteration marked as a new step
        if mode == "on" and variant not in GRAPH_VARIANTS:
            self.graph_note = f"cuda_graph: {variant} trains eagerly (graphs cover the BCE variants)"

    # ---- one iteration ---------------------------------------------------------------------------
    def __call__(self) -> None:
        if self.graph is None and self.want_graph and self.iterations >= WARMUP_ITERATIONS:
            self._try_capture()
        if self.graph is not None:
            if self.batches.room() == 0:
                self.batches.reshuffle()  # what the first take() would do, done outside the graph
            if self.batches.room() >= self.d_steps:
                self.graph.replay()
                self.batches.pos += self.d_steps * self.batches.batch_size
                for k, n in self._per_replay.items():
                    self.counts[k] += n
            else:  # an epoch ends inside this iteration (d_steps > 1): reshuffle between its batches
                self._uncaptured_iteration()
        elif self.want_graph and self.device.type == "cuda":
            self._warmup_iteration()
        else:
            self._iterate()
        self.iterations += 1

    def _iterate(self) -> None:
        if self._mark_cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()  # the previous iteration's outputs may be overwritten
        amp = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp,
                   cache_enabled=False if self.want_graph else None)
        Gc, Dc, Ec = self.Gc, self.Dc, self.Ec
        real = None
        for _ in range(self.d_steps):
            real = self.batches.take().contiguous(memory_format=self.memory_format)
            z = torch.randn(len(real), self.nz, device=self.device)
            with torch.autocast(**amp):
                if self.variant == "wgan":
                    out = losses.wgan_d_loss(Gc, Dc, real, z, self.gp_weight)
                elif self.variant == "vae-gan":
                    out = losses.vaegan_d_loss(Ec, Gc, Dc, real, z)
                else:
                    out = losses.dcgan_d_loss(Gc, Dc, real, z)
            self.opt_d.zero_grad(set_to_none=True)
            out["loss_d"].backward(inputs=list(self.D.parameters()))
            self.opt_d.step()
            self._accumulate(out)

        z = torch.randn(self.batches.batch_size, self.nz, device=self.device)
        with torch.autocast(**amp):
            if self.variant == "wgan":
                out = losses.wgan_g_loss(Gc, Dc, z)
            elif self.variant == "vae-gan":
                out = losses.vaegan_eg_losses(Ec, Gc, Dc, real, z, self.recon_weight, self.kl_weight)
            else:
                out = losses.dcgan_g_loss(Gc, Dc, z)
        self.opt_g.zero_grad(set_to_none=True)
        if self.E is not None:  # each loss trains only its own network (Larsen et al. 2016)
            out["loss_e"].backward(inputs=self.e_params, retain_graph=True)
        out["loss_g"].backward(inputs=self.g_params)  # G's parameters only: D's gradients would be thrown away
        self.opt_g.step()
        self._accumulate(out)

    def _accumulate(self, out: dict[str, Tensor]) -> None:
        for k, v in out.items():
            v = v.detach().float()
            if k not in self.sums:
                self.sums[k] = torch.zeros((), device=self.device)
                self.counts[k] = 0
            self.sums[k].add_(v)
            self.finite.logical_and_(torch.isfinite(v))
            self.counts[k] += 1

    # ---- CUDA graph ------------------------------------------------------------------------------
    def _warmup_iteration(self) -> None:
        """Eager, on a side stream (as torch's whole-network capture recipe asks), before capture."""
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            self._uncaptured_iteration()
        torch.cuda.current_stream(self.device).wait_stream(self._side)

    def _uncaptured_iteration(self) -> None:
        """An eager iteration of a trial that captures: its capturable Adam steps outside a capture on purpose."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=UNCAPTURED_STEP_WARNING, category=UserWarning)
            self._iterate()

    def _try_capture(self) -> None:
        if self.batches.room() < self.d_steps:
            return  # capture where no reshuffle falls inside the captured iteration; try next time
        try:
            self.graph = self._capture()
        except Exception as exc:  # never a crash: the trial says so once and trains without the graph
            self.graph = None
            self.want_graph = False
            self._stop_capturable_steps()
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if self._compile_fallback is not None:
                compiled = self._compile_fallback()
                self.Gc, self.Dc, self.Ec = compiled["G"], compiled["D"], compiled.get("E")
                self._mark_cudagraph_steps = True
                self.graph_note = (f"cuda_graph: capture failed ({reason}); torch.compile "
                                   "mode=reduce-overhead (its own CUDA graphs) instead")
            else:
                self.graph_note = f"cuda_graph: capture failed ({reason}); training eagerly"
            print(f"warning: {self.graph_note}", file=sys.stderr, flush=True)

    def _stop_capturable_steps(self) -> None:
        """No graph will be captured: capturable only slows the update down now. Fused Adam keeps its step
        count on the device either way, so switching the flag off mid-training changes no arithmetic."""
        for opt in (self.opt_d, self.opt_g):
            for group in opt.param_groups:
                if group.get("fused"):
                    group["capturable"] = False

    def _capture(self):
        graph, recording = self._new_graph()
        pos, counts = self.batches.pos, dict(self.counts)
        try:
            # Capture records kernels without running them: the host-side bookkeeping that _iterate does
            # (batch position, loss counts) is put back afterwards and advanced by each replay instead.
            with recording:
                self._iterate()
        finally:
            self._per_replay = {k: self.counts[k] - counts.get(k, 0) for k in self.counts}
            self.batches.pos, self.counts = pos, {k: counts.get(k, 0) for k in self.counts}
        return graph

    def _new_graph(self):
        """A CUDA graph and the context that records into it (tests stand in a CPU emulation)."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise GraphUnavailable("CUDA graphs need a CUDA device")
        for opt in (self.opt_d, self.opt_g):
            if not all(group.get("capturable", False) for group in opt.param_groups):
                raise GraphUnavailable("the optimisers were not built with capturable=True")
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        return graph, torch.cuda.graph(graph)

    # ---- reading out -----------------------------------------------------------------------------
    def all_finite(self) -> bool:
        return bool(self.finite)  # one host sync

    def take_losses(self) -> dict[str, float]:
        """Each logged loss's mean since the last call (D's terms per critic step, G's per G step); resets."""
        means = {k: (s / self.counts[k]).item() for k, s in self.sums.items() if self.counts.get(k)}
        for s in self.sums.values():
            s.zero_()  # in place: a captured graph adds into these tensors
        self.counts = {k: 0 for k in self.counts}
        return means

    @property
    def uses_graph(self) -> bool:
        return self.graph is not None
