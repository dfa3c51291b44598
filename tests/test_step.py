"""gan.step: the graph-ready iteration, checked against an independent textbook loop on CPU.

CUDA graphs need a GPU; here the graph's semantics (recording runs nothing, each replay runs the
recorded iteration and leaves the host's bookkeeping alone) are emulated on the CPU, so the host-side
logic around replays (epoch ends, loss counts, batch position) is tested without one.
"""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from test_training import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from gan import losses
from gan.config import TrialConfig, optimiser_settings
from gan.data import prepare_dataset, to_float
from gan.models import build_models
from gan.step import (
    AUTO_GRAPH,
    GRAPH_VARIANTS,
    WARMUP_ITERATIONS,
    DeviceBatches,
    TrainStep,
    graph_mode,
    will_capture,
)
from gan.training import build_trainer, training_loop

N_IMAGES = 100  # with batch 16: 6 batches an epoch and a ragged tail of 4, so epochs end mid-run


def images(n=N_IMAGES, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 64, 64), dtype=np.uint8)


def textbook_iterations(cfg: TrialConfig, data: np.ndarray, iterations: int):
    """The loop as it was written before gan.step (and as tutorials write it): a CPU permutation copied
    per batch, each batch normalised when drawn, full backward passes, one Adam per network."""
    tc, mc = cfg.train, cfg.model
    opt = optimiser_settings(mc.variant, tc)
    torch.manual_seed(tc.seed)
    models = build_models(mc)
    G, D, E = models["G"], models["D"], models.get("E")
    opt_d = torch.optim.Adam(D.parameters(), lr=opt["lr_d"], betas=(opt["beta1"], opt["beta2"]))
    g_params = list(G.parameters()) + (list(E.parameters()) if E is not None else [])
    opt_g = torch.optim.Adam(g_params, lr=opt["lr_g"], betas=(opt["beta1"], opt["beta2"]))
    source = torch.from_numpy(data)
    rng = torch.Generator().manual_seed(tc.seed)
    perm, pos, b = torch.randperm(len(data), generator=rng), 0, tc.batch_size
    sums: dict[str, float] = {}
    for _ in range(iterations):
        for m in models.values():
            m.train()
        for _ in range(opt["d_steps"]):
            if pos + b > len(perm):
                perm, pos = torch.randperm(len(perm), generator=rng), 0
            real = to_float(source[perm[pos:pos + b]])
            pos += b
            z = torch.randn(b, mc.nz)
            if mc.variant == "wgan":
                out = losses.wgan_d_loss(G, D, real, z, tc.gp_weight)
            elif mc.variant == "vae-gan":
                out = losses.vaegan_d_loss(E, G, D, real, z)
            else:
                out = losses.dcgan_d_loss(G, D, real, z)
            opt_d.zero_grad()
            out["loss_d"].backward()
            opt_d.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        z = torch.randn(b, mc.nz)
        if mc.variant == "wgan":
            out = losses.wgan_g_loss(G, D, z)
        elif mc.variant == "vae-gan":
            out = losses.vaegan_eg_losses(E, G, D, real, z, tc.recon_weight, tc.kl_weight)
        else:
            out = losses.dcgan_g_loss(G, D, z)
        opt_g.zero_grad()
        if E is not None:
            out["loss_e"].backward(inputs=list(E.parameters()), retain_graph=True)
            out["loss_g"].backward(inputs=list(G.parameters()))
        else:
            out["loss_g"].backward()
        opt_g.step()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return models, sums


def graph_ready_step(cfg: TrialConfig, data: np.ndarray, cuda_graph="off", **step_args) -> tuple[TrainStep, dict]:
    tc, mc = cfg.train, cfg.model
    opt = optimiser_settings(mc.variant, tc)
    torch.manual_seed(tc.seed)
    models = build_models(mc)
    for m in models.values():
        m.train()
    betas = (opt["beta1"], opt["beta2"])
    opt_d = torch.optim.Adam(models["D"].parameters(), lr=opt["lr_d"], betas=betas)
    g_params = list(models["G"].parameters()) + (list(models["E"].parameters()) if "E" in models else [])
    opt_g = torch.optim.Adam(g_params, lr=opt["lr_g"], betas=betas)
    batches = DeviceBatches(data, tc.batch_size, torch.device("cpu"), seed=tc.seed)
    step = TrainStep(variant=mc.variant, models=models, opt_d=opt_d, opt_g=opt_g, batches=batches, nz=mc.nz,
                     d_steps=opt["d_steps"], gp_weight=tc.gp_weight, recon_weight=tc.recon_weight,
                     kl_weight=tc.kl_weight, cuda_graph=cuda_graph, **step_args)
    return step, models


def same_parameters(a: dict, b: dict) -> None:
    for name in a:
        for (key, x), (_, y) in zip(a[name].state_dict().items(), b[name].state_dict().items(), strict=True):
            assert torch.equal(x, y), f"{name}.{key}"


@pytest.mark.parametrize("variant, iterations", [("dcgan", 14), ("use-cmhsa-gan", 8), ("wgan", 4), ("vae-gan", 8)])
def test_graph_ready_step_run_eagerly_equals_the_textbook_loop(variant, iterations):
    """Same parameters (bit for bit) and the same mean losses after epochs that end mid-run (wgan: mid-iteration)."""
    cfg = tiny_config(variant)
    cfg.train.batch_size = 16
    data = images()
    want_models, want_sums = textbook_iterations(cfg, data, iterations)
    step, models = graph_ready_step(cfg, data)
    for _ in range(iterations):
        step()
    same_parameters(want_models, models)
    d_steps = optimiser_settings(variant, cfg.train)["d_steps"]
    means = step.take_losses()
    assert set(means) == set(want_sums)
    for k, total in want_sums.items():
        n = iterations * (d_steps if k in ("loss_d", "gp") else 1)
        assert means[k] == pytest.approx(total / n, rel=1e-5), k
    assert step.all_finite() and not step.uses_graph


class EmulatedGraph:
    """What a CUDA graph does, on the CPU: recording runs nothing (every tensor the iteration would change
    is put back), and each replay runs the recorded iteration on the device only (the host's batch position
    and loss counts are left for the caller to advance)."""

    def __init__(self, step: TrainStep):
        self.step = step
        self.replays = 0

    def _tensors(self):
        s = self.step
        return [s.batches.pos_t, s.finite, *s.sums.values()]

    def __enter__(self):
        s = self.step
        self.saved = (
            {n: copy.deepcopy(m.state_dict()) for n, m in (("G", s.G), ("D", s.D), ("E", s.E)) if m is not None},
            copy.deepcopy(s.opt_d.state_dict()), copy.deepcopy(s.opt_g.state_dict()),
            [t.clone() for t in self._tensors()], torch.get_rng_state(),
        )
        return self

    def __exit__(self, *exc):
        s = self.step
        models, opt_d, opt_g, tensors, rng = self.saved
        for n, sd in models.items():
            getattr(s, n).load_state_dict(sd)
        s.opt_d.load_state_dict(opt_d)
        s.opt_g.load_state_dict(opt_g)
        for t, v in zip(self._tensors(), tensors, strict=True):
            t.copy_(v)
        torch.set_rng_state(rng)
        return False

    def replay(self):
        s = self.step
        pos, counts = s.batches.pos, dict(s.counts)
        assert s.batches.room() >= s.d_steps, "a replay must never cross an epoch end"
        s._iterate()
        s.batches.pos, s.counts = pos, counts
        self.replays += 1


@pytest.mark.parametrize("d_steps", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_replayed_iterations_equal_eager_ones(monkeypatch, d_steps):
    """The host-side logic around replays (reshuffle before a replay, an eager iteration where an epoch ends
    inside it, loss counts, batch position) gives exactly the eager run."""
    cfg = tiny_config("dcgan", d_steps=d_steps)
    cfg.train.batch_size = 16
    data = images(7 * 16 + 8)  # 7 batches an epoch: with d_steps 2, every other epoch ends inside an iteration
    eager, eager_models = graph_ready_step(cfg, data, cuda_graph="off")
    positions = []
    for _ in range(20):  # one run after the other: both draw their noise from torch's global generator
        eager()
        positions.append(eager.batches.pos)
    monkeypatch.setattr(TrainStep, "_new_graph", lambda self: (lambda g: (g, g))(EmulatedGraph(self)))
    graphed, graphed_models = graph_ready_step(cfg, data, cuda_graph="on")
    for i in range(20):
        graphed()
        assert graphed.batches.pos == positions[i], i
    assert graphed.uses_graph and graphed.graph.replays >= 14
    same_parameters(eager_models, graphed_models)
    assert graphed.take_losses() == eager.take_losses()
    assert graphed.counts == eager.counts


def run_trial(tmp_path, name, **train):
    cfg = tiny_config("dcgan", kimg=0.4, **train)
    dataset = prepare_dataset(cfg.data)
    reports = []
    result = training_loop(cfg, tmp_path / name, lambda m, c: reports.append(m), dataset=dataset)
    return result, reports


@pytest.mark.slow
def test_capture_failure_is_one_line_and_training_goes_on_eagerly(tmp_path, monkeypatch, capsys):
    _, eager = run_trial(tmp_path, "eager", cuda_graph="off")
    capsys.readouterr()

    # On this CPU, asking for a graph fails to capture (no CUDA) ...
    result, on_cpu = run_trial(tmp_path, "on-cpu", cuda_graph="on")
    assert result.status == "completed"
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: cuda_graph: capture failed (GraphUnavailable: CUDA graphs need a CUDA device); training eagerly"]

    # ... and so does any other failure of the capture itself.
    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(TrainStep, "_new_graph", broken)
    result, forced = run_trial(tmp_path, "forced", cuda_graph=True)  # YAML's unquoted `on`
    assert result.status == "completed"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: cuda_graph: capture failed (RuntimeError: operation not permitted when stream is "
                   "capturing); training eagerly"]
    for reports in (on_cpu, forced):
        assert [r["loss_d"] for r in reports] == [r["loss_d"] for r in eager]
        assert [r["fid"] for r in reports] == [r["fid"] for r in eager]
        assert all(r["cuda_graph"] is False and "capture failed" in r["cuda_graph_note"] for r in reports)
    stats = [json.loads(line) for line in (tmp_path / "forced" / "stats.jsonl").read_text().splitlines()]
    assert all("capture failed" in s["cuda_graph_note"] for s in stats)
    assert "cuda_graph_note" not in eager[0]


def test_variants_without_graphs_say_so_and_auto_means_off_until_measured():
    cfg = tiny_config("wgan")
    step, _ = graph_ready_step(cfg, images(), cuda_graph="on")
    assert not step.want_graph and "trains eagerly" in step.graph_note
    step, _ = graph_ready_step(tiny_config("dcgan"), images(), cuda_graph="auto")
    assert not step.want_graph and step.graph_note == ""
    assert [graph_mode(v) for v in ("auto", "on", "off", True, False)] == ["auto", "on", "off", "on", "off"]
    with pytest.raises(ValueError):
        graph_mode("sometimes")


# ---- what a GPU run needs, checked on the CPU ------------------------------------------------------------


class HostSyncRecorder(TorchDispatchMode):
    """Records every aten op that reads a tensor's value back to the host (a device sync on CUDA)."""

    SYNCING = ("_local_scalar_dense", "item", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_host_syncs():
    with HostSyncRecorder() as recorder:
        t = torch.ones(2)
        t.sum().item()
        bool(t.any())
    assert recorder.syncs and set(recorder.syncs) <= set(HostSyncRecorder.SYNCING)


@pytest.mark.parametrize("variant, amp, memory_format", [
    *((v, False, torch.contiguous_format) for v in GRAPH_VARIANTS),
    ("use-cmhsa-gan", True, torch.channels_last),  # bf16 autocast and channels_last take other code paths
], ids=[*GRAPH_VARIANTS, "use-cmhsa-gan-bf16-channels-last"])
def test_an_iteration_never_reads_a_value_back_to_the_host(variant, amp, memory_format):
    """A captured graph cannot contain a host sync, and an eager iteration with one stalls the GPU: nothing in
    `_iterate` may read a tensor's value, in any graph variant. Fused Adam, as training uses on CUDA (on CPU the
    default Adam reads its step count with .item())."""
    cfg = tiny_config(variant)
    cfg.model.attn_dropout = 0.1  # attention dropout on: its mask is drawn on the device too
    opt = optimiser_settings(variant, cfg.train)
    torch.manual_seed(0)
    models = build_models(cfg.model)
    for m in models.values():
        m.to(memory_format=memory_format).train()
    adam = dict(betas=(opt["beta1"], opt["beta2"]), fused=True)
    opt_d = torch.optim.Adam(models["D"].parameters(), lr=opt["lr_d"], **adam)
    opt_g = torch.optim.Adam(models["G"].parameters(), lr=opt["lr_g"], **adam)
    batches = DeviceBatches(images(), cfg.train.batch_size, torch.device("cpu"), seed=0)
    step = TrainStep(variant=variant, models=models, opt_d=opt_d, opt_g=opt_g, batches=batches, nz=cfg.model.nz,
                     d_steps=opt["d_steps"], cuda_graph="on", amp=amp, memory_format=memory_format)
    with HostSyncRecorder() as recorder:
        step._iterate()  # the first: Adam's state is created here
        step._iterate()
    assert recorder.syncs == []
    assert step.all_finite()


def test_will_capture_only_for_graph_variants_on_cuda_with_the_graph_asked_for(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert will_capture("dcgan", cuda, "on") and will_capture("use-cmhsa-gan", cuda, True)
    assert not will_capture("dcgan", cuda, "off") and not will_capture("dcgan", cpu, "on")
    assert not will_capture("wgan", cuda, "on") and not will_capture("vae-gan", cuda, "on")
    assert will_capture("dcgan", cuda, "auto") == AUTO_GRAPH  # auto = off until a GPU check agreed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not will_capture("dcgan", cuda, "on")


@pytest.mark.parametrize("cuda_graph", ["on", "off", "auto"])
def test_optimisers_are_capturable_exactly_when_a_graph_will_be_captured(monkeypatch, cuda_graph):
    seen = []
    real_adam = torch.optim.Adam

    def spy(params, **kwargs):
        seen.append(kwargs["capturable"])
        return real_adam(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    cfg = tiny_config("dcgan", cuda_graph=cuda_graph, device="cpu")
    batches = DeviceBatches(images(), cfg.train.batch_size, torch.device("cpu"), seed=0)
    trainer = build_trainer(cfg, torch.device("cpu"), batches)
    assert seen == [False, False]  # a CPU never captures
    assert trainer.step.want_graph == (cuda_graph == "on")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("cuda_graph", ["on", "off"])
def test_cuda_warm_up_and_capture_raise_no_warnings(cuda_graph):
    cfg = tiny_config("use-cmhsa-gan", cuda_graph=cuda_graph, device="cuda")
    batches = DeviceBatches(images(), cfg.train.batch_size, torch.device("cuda"), seed=0)
    trainer = build_trainer(cfg, torch.device("cuda"), batches)
    capturable = [g["capturable"] for opt in (trainer.opt_d, trainer.opt_g) for g in opt.param_groups]
    assert capturable == [cuda_graph == "on"] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(WARMUP_ITERATIONS + 3):
            trainer.step()
        torch.cuda.synchronize()
    assert [str(w.message) for w in caught] == []
    assert trainer.step.uses_graph == (cuda_graph == "on"), trainer.step.graph_note


def test_a_failed_capture_of_compiled_modules_falls_back_to_reduce_overhead(monkeypatch, capsys):
    """train.compile with a graph: the compiled (default-mode) modules are captured; if that fails, the trial
    recompiles with mode="reduce-overhead" (built by the fallback), marks each iteration as a cudagraph step,
    and stops asking Adam for capturable steps."""
    cfg = tiny_config("dcgan")
    cfg.train.batch_size = 16
    built, marks = [], []

    def fallback():
        built.append(True)
        return {"G": wrapped["G"], "D": wrapped["D"]}  # stand-ins for torch.compile(mode="reduce-overhead")

    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(TrainStep, "_new_graph", broken)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    step, models = graph_ready_step(cfg, images(), cuda_graph="on", compile_fallback=fallback)
    wrapped = {k: torch.nn.Sequential(m) for k, m in models.items()}  # same parameters, another module
    for _ in range(WARMUP_ITERATIONS + 3):
        step()
    assert built == [True] and step.Gc is wrapped["G"] and step.Dc is wrapped["D"]
    assert len(marks) == 3  # the iterations after the failed capture
    assert "capture failed (RuntimeError" in step.graph_note and "reduce-overhead" in step.graph_note
    assert capsys.readouterr().err.count("warning: cuda_graph: capture failed") == 1
    assert not step.uses_graph and step.all_finite()
