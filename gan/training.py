"""The training loop: one function runs one trial from a TrialConfig.

Everything outside the loop (Ray Tune, Parquet, CLIs) talks to it through `report`:
it is called after every evaluation with the metrics and the directory of a full
checkpoint, and the loop resumes bit-for-bit from such a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.utils

from gan.config import TrialConfig, optimiser_settings
from gan.data import PreparedDataset, prepare_dataset
from gan.metrics import Evaluator, to_uint8
from gan.models import LEGACY_QKV, build_models
from gan.precision import set_tf32
from gan.step import DeviceBatches, TrainStep, will_capture  # noqa: F401  (DeviceBatches: re-exported)

CHECKPOINT_FILE = "checkpoint.pt"
GRID_NOISE_SEED = 20_240_601  # the same grid noise for every trial, so grids compare like for like
DIVERGENCE_CHECK_STEPS = 16  # read the finite-loss flag every this many steps (one host sync)
# The generator collapsed when its samples differ from each other by less than this fraction of
# their magnitude (relative: an untrained generator's outputs are all near 0, yet still distinct).
COLLAPSE_RATIO = 1e-3

ReportFn = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class TrainResult:
    status: str  # completed | diverged
    kimg: float
    metrics: dict[str, Any]  # the last evaluation's metrics (the last good one if diverged)
    best_fid: float | None
    reason: str = ""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_training_backends(device: torch.device) -> None:
    """On CUDA: cudnn autotuning and TF32 for training's matmuls and convolutions (process-wide)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    # Through gan.precision, as gan.metrics switches TF32 off around the feature extractor: one API keeps
    # torch.get_float32_matmul_precision() readable, which Inductor's max-autotune needs.
    set_tf32(True)


@dataclass
class Trainer:
    models: dict[str, torch.nn.Module]  # G, D (and E): the originals, whose state is saved
    opt_d: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    step: TrainStep  # one iteration; trains through torch.compile'd wrappers when train.compile is on


def build_trainer(cfg: TrialConfig, device: torch.device, batches: DeviceBatches) -> Trainer:
    """A trial's models, optimisers and iteration, as the loop trains them (also timed by gan.cost)."""
    tc, mc = cfg.train, cfg.model
    opt = optimiser_settings(mc.variant, tc)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if (cuda and tc.channels_last) else torch.contiguous_format
    models = build_models(mc)
    for m in models.values():
        m.to(device=device, memory_format=memory_format)
        m.train()  # once: evaluation switches G to eval() and back
    G, D, E = models["G"], models["D"], models.get("E")
    capture = will_capture(mc.variant, device, tc.cuda_graph)
    # Fused Adam: one kernel per step instead of one per parameter. capturable keeps its step count on the
    # device so a CUDA graph can replay the update; only when one will be captured (it costs otherwise).
    adam = dict(betas=(opt["beta1"], opt["beta2"]), fused=cuda, capturable=capture)
    opt_d = torch.optim.Adam(D.parameters(), lr=opt["lr_d"], **adam)
    g_params = list(G.parameters()) + (list(E.parameters()) if E is not None else [])
    opt_g = torch.optim.Adam(g_params, lr=opt["lr_g"], **adam)
    compiled, fallback = None, None
    if tc.compile and cuda:
        # The default mode makes no CUDA graphs of its own: the whole-iteration graph is captured around the
        # compiled kernels. If that capture fails, reduce-overhead (torch's per-module graphs) takes over.
        compiled = {k: torch.compile(m) for k, m in models.items()}
        if capture:
            fallback = lambda: {k: torch.compile(m, mode="reduce-overhead") for k, m in models.items()}  # noqa: E731
    step = TrainStep(
        variant=mc.variant, models=models, opt_d=opt_d, opt_g=opt_g, batches=batches, nz=mc.nz,
        d_steps=opt["d_steps"], gp_weight=tc.gp_weight, recon_weight=tc.recon_weight, kl_weight=tc.kl_weight,
        amp=cuda and tc.amp, memory_format=memory_format, cuda_graph=tc.cuda_graph, compiled=compiled,
        compile_fallback=fallback,
    )
    return Trainer(models, opt_d, opt_g, step)


def training_loop(
    cfg: TrialConfig,
    run_dir: str | os.PathLike,
    report: ReportFn | None = None,
    resume_from: str | os.PathLike | None = None,
    dataset: PreparedDataset | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train cfg's model for cfg.train.kimg thousand real images, evaluating every
    cfg.eval.every_kimg. `resume_from` is a checkpoint directory (or file) written by an
    earlier call. Each evaluation's checkpoint replaces the one in `checkpoint_dir` (default
    run_dir/checkpoint). Returns the final status; a diverged trial ends with status 'diverged'."""
    run_dir = Path(run_dir)
    (run_dir / "grids").mkdir(parents=True, exist_ok=True)
    (run_dir / "options.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tc, ec, mc = cfg.train, cfg.eval, cfg.model
    d_steps = optimiser_settings(mc.variant, tc)["d_steps"]

    device = pick_device(tc.device)
    cuda = device.type == "cuda"
    torch.manual_seed(tc.seed)
    set_training_backends(device)
    amp = cuda and tc.amp  # bf16 autocast of the evaluation's sampling too

    dataset = dataset if dataset is not None else prepare_dataset(cfg.data)
    batches = DeviceBatches(dataset.split("train"), tc.batch_size, device, seed=tc.seed)
    evaluator = Evaluator(
        dataset.split(ec.fid_split),
        dataset_key=dataset.key,
        split=ec.fid_split,
        extractor=ec.extractor,
        weights_path=ec.weights_path,
        device=device,
        kid=ec.kid,
        cache_dir=cfg.data.cache_dir,  # the FID statistics live beside the data cache the sweep chose
    )

    trainer = build_trainer(cfg, device, batches)
    models, opt_d, opt_g, train_step = trainer.models, trainer.opt_d, trainer.opt_g, trainer.step
    G = models["G"]

    grid_z = torch.randn(ec.grid_size**2, mc.nz, generator=torch.Generator().manual_seed(GRID_NOISE_SEED)).to(device)
    state = {"images_shown": 0, "step": 0, "wall_s": 0.0, "evals": 0, "best_fid": None, "last_metrics": {}}
    if resume_from is not None:
        # In place, before the first iteration: a CUDA graph is captured only after warm-up iterations,
        # so on the state it goes on from.
        _load_checkpoint(Path(resume_from), models, opt_d, opt_g, batches, state, device)

    budget = int(round(tc.kimg * 1000))
    every = int(round(ec.every_kimg * 1000))
    next_eval = min(budget, (state["images_shown"] // every + 1) * every)
    images_per_iteration = d_steps * tc.batch_size
    t_train = time.perf_counter()
    train_seconds = 0.0
    images_since_report = 0
    t_wall0 = time.perf_counter() - state["wall_s"]

    while state["images_shown"] < budget:
        train_step()
        state["images_shown"] += images_per_iteration
        images_since_report += images_per_iteration
        state["step"] += 1

        if state["step"] % DIVERGENCE_CHECK_STEPS == 0 and not train_step.all_finite():
            return _diverged(state, "non-finite loss")
        if state["images_shown"] < next_eval:
            continue

        # ---- evaluation: read losses (one host sync), FID, grid, checkpoint, report
        if not train_step.all_finite():
            return _diverged(state, "non-finite loss")
        if cuda:
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t_train
        kimg = state["images_shown"] / 1000
        final = state["images_shown"] >= budget
        G.eval()
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            grid = G(grid_z).float()
        if grid.std(dim=0).mean().item() <= COLLAPSE_RATIO * grid.abs().mean().item():
            return _diverged(state, "generator collapsed: every sample is the same image")
        grid_path = run_dir / "grids" / f"grid-kimg{kimg:09.3f}.png"
        torchvision.utils.save_image((grid + 1) / 2, grid_path, nrow=ec.grid_size)
        eval_gen = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + state["evals"])

        def sample(n: int, eval_gen: torch.Generator = eval_gen) -> torch.Tensor:
            z = torch.randn(n, mc.nz, device=device, generator=eval_gen)
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                return to_uint8(G(z).float())

        n_samples = ec.final_fid_samples if final else ec.fid_samples
        scores = evaluator.evaluate(sample, n_samples, kid=ec.kid)  # extraction itself runs without TF32
        metrics: dict[str, Any] = {
            "kimg": kimg,
            **scores,
            "g_steps": state["step"],  # generator updates: wgan makes d_steps times fewer per kimg
            **train_step.take_losses(),
            "images_per_s": images_since_report / max(train_seconds, 1e-9),
            "wall_s": time.perf_counter() - t_wall0,
            "final": final,
            "cuda_graph": train_step.uses_graph,
            **({"cuda_graph_note": train_step.graph_note} if train_step.graph_note else {}),
        }
        if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
            return _diverged(state, "non-finite metric")
        state["evals"] += 1
        state["wall_s"] = metrics["wall_s"]
        if state["best_fid"] is None or metrics["fid"] < state["best_fid"]:
            state["best_fid"] = metrics["fid"]
        metrics["best_fid"] = state["best_fid"]
        metrics["grid_path"] = str(grid_path)
        state["last_metrics"] = metrics
        with open(run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        ckpt_dir = _save_checkpoint(Path(checkpoint_dir or run_dir / "checkpoint"), cfg, models, opt_d, opt_g,
                                    batches, state)
        if report is not None:
            report(metrics, str(ckpt_dir))
        G.train()
        images_since_report = 0
        train_seconds = 0.0
        next_eval = min(budget, next_eval + every)
        t_train = time.perf_counter()

    return TrainResult("completed", state["images_shown"] / 1000, state["last_metrics"], state["best_fid"])




def _diverged(state: dict[str, Any], reason: str) -> TrainResult:
    """End the trial with its last good metrics; garbage numbers are never reported."""
    return TrainResult("diverged", state["images_shown"] / 1000, state["last_metrics"], state["best_fid"], reason)


def _save_checkpoint(final: Path, cfg, models, opt_d, opt_g, batches, state) -> Path:
    """Write the full state to the directory `final` atomically (temp dir beside it, then rename)."""
    payload = {
        "models": {name: m.state_dict() for name, m in models.items()},
        "opt_d": opt_d.state_dict(),
        "opt_g": opt_g.state_dict(),
        "batches": batches.state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "state": json.dumps(state),
        "config": json.dumps(cfg.to_dict()),
    }
    tmp = final.parent / f".{final.name}-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(payload, tmp / CHECKPOINT_FILE)
    old = final.parent / f".{final.name}-{os.getpid()}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, models, opt_d, opt_g, batches, state, device) -> None:
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    payload = torch.load(file, map_location=device, weights_only=True)  # never unpickles code
    legacy = any(key.endswith(f".{LEGACY_QKV[0]}.weight") for key in payload["models"]["G"])
    for name, m in models.items():
        m.load_state_dict(payload["models"][name])  # CMHSA fuses a legacy layout's q/k/v itself
    opt_d.load_state_dict(payload["opt_d"])
    opt_g_state = payload["opt_g"]
    if legacy:
        g_names = [f"{name}.{key}" for name in ("G", "E") if name in models
                   for key, _ in models[name].named_parameters()]
        opt_g_state = fuse_legacy_qkv_adam_state(opt_g_state, g_names)
    opt_g.load_state_dict(opt_g_state)
    batches.load_state(payload["batches"])
    torch.set_rng_state(payload["torch_rng"].cpu())
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in payload["cuda_rng"]])
    state.update(json.loads(payload["state"]))


def fuse_legacy_qkv_adam_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An Adam state_dict saved when CMHSA had separate query/key/value convolutions, for the fused `qkv`
    layout: `names` are the optimiser's parameters in order (current layout); each qkv weight (bias) gets
    the legacy query, key and value moments stacked in that order, as `fuse_legacy_qkv` stacks the weights."""
    legacy_names: list[str] = []
    for name in names:  # legacy order: query.weight, query.bias, key.weight, ..., where qkv.weight, qkv.bias are
        if name.endswith(".qkv.weight"):
            stem = name[: -len("qkv.weight")]
            legacy_names += [f"{stem}{part}.{kind}" for part in LEGACY_QKV for kind in ("weight", "bias")]
        elif not name.endswith(".qkv.bias"):
            legacy_names.append(name)
    (group,) = state["param_groups"]  # build_trainer's optimisers have one group
    if len(group["params"]) != len(legacy_names):
        raise ValueError(f"optimiser state has {len(group['params'])} parameters; the legacy CMHSA layout of this "
                         f"model has {len(legacy_names)}")
    legacy_state = {legacy_names[i]: state["state"][index] for i, index in enumerate(group["params"])
                    if index in state["state"]}
    fused: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        if name.endswith((".qkv.weight", ".qkv.bias")):
            stem, kind = name.rsplit(".qkv.", 1)
            parts = [legacy_state.get(f"{stem}.{part}.{kind}") for part in LEGACY_QKV]
            if all(parts):
                fused[index] = {"step": parts[0]["step"],
                                **{k: torch.cat([p[k] for p in parts]) for k in ("exp_avg", "exp_avg_sq")}}
        elif name in legacy_state:
            fused[index] = legacy_state[name]
    return {"state": fused, "param_groups": [{**group, "params": list(range(len(names)))}]}


def load_trial_config(checkpoint: str | os.PathLike) -> TrialConfig:
    """The config a checkpoint was trained with (for sampling scripts and reports)."""
    path = Path(checkpoint)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    payload = torch.load(file, map_location="cpu", weights_only=True)
    return TrialConfig.from_dict(json.loads(payload["config"]))


