import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig
from gan.data import prepare_dataset
from gan.models import build_models
from gan.training import training_loop


def tiny_config(variant: str, path=None, kimg=0.4, **train) -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(variant=variant, g_widths=(32, 16, 8, 8), d_widths=(8, 16, 16, 32), heads=2),
        data=DataConfig(path=None if path is None else str(path), synthetic_count=300),
        train=TrainConfig(kimg=kimg, batch_size=20, seed=0, **train),
        eval=EvalConfig(every_kimg=0.2, fid_samples=100, final_fid_samples=120, extractor="tiny-conv", grid_size=4),
    )


def test_short_run_on_real_faces_trains_evaluates_and_saves(anime_subset, tmp_path):
    cfg = tiny_config("use-cmhsa-gan", anime_subset)
    dataset = prepare_dataset(cfg.data)
    torch.manual_seed(cfg.train.seed)
    g_before = {k: v.clone() for k, v in build_models(cfg.model)["G"].state_dict().items()}
    reports = []
    result = training_loop(cfg, tmp_path, lambda m, c: reports.append((m, c)), dataset=dataset)

    assert result.status == "completed"
    assert [round(m["kimg"], 3) for m, _ in reports] == [0.2, 0.4]
    first, last = reports[0][0], reports[-1][0]
    for m, _ in reports:
        assert math.isfinite(m["loss_d"]) and math.isfinite(m["loss_g"]) and math.isfinite(m["fid"])
        assert m["extractor"] == "tiny-conv" and m["images_per_s"] > 0
    assert first["fid_samples"] == 100 and not first["final"]
    assert last["fid_samples"] == 120 and last["final"]

    ckpt = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
    g_after = ckpt["models"]["G"]
    assert any(not torch.equal(g_before[k], g_after[k]) for k in g_before if g_before[k].is_floating_point())
    grids = sorted((tmp_path / "grids").glob("*.png"))
    assert len(grids) == 2 and last["grid_path"] == str(grids[-1])
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["kimg"] for line in lines] == [m["kimg"] for m, _ in reports]
    assert json.loads((tmp_path / "options.json").read_text())["model"]["variant"] == "use-cmhsa-gan"


@pytest.mark.parametrize("variant", ["dcgan", "wgan", "vae-gan"])
def test_resume_from_checkpoint_gives_bit_identical_losses(variant, tmp_path):
    cfg = tiny_config(variant)
    dataset = prepare_dataset(cfg.data)
    saved = tmp_path / "saved-after-first-eval"
    straight = []

    def report(metrics, checkpoint_dir):
        straight.append(metrics)
        if len(straight) == 1:
            shutil.copytree(checkpoint_dir, saved)

    training_loop(cfg, tmp_path / "straight", report, dataset=dataset)
    resumed = []
    training_loop(cfg, tmp_path / "resumed", lambda m, c: resumed.append(m), resume_from=saved, dataset=dataset)

    assert len(straight) == 2 and len(resumed) == 1
    for key in ("kimg", "loss_d", "loss_g", "fid"):
        assert resumed[0][key] == straight[1][key], key


def test_non_finite_loss_ends_trial_as_diverged(tmp_path):
    cfg = tiny_config("dcgan", lr_d=1e30, lr_g=1e30)
    reports = []
    result = training_loop(cfg, tmp_path, lambda m, c: reports.append(m))
    assert result.status == "diverged" and result.reason == "non-finite loss"
    # It diverges in its first steps, before the first evaluation: nothing at all is reported.
    assert reports == [] and result.metrics == {} and result.best_fid is None
    assert not (tmp_path / "stats.jsonl").exists()


def test_wgan_losses_are_means_per_step_and_g_steps_count_generator_updates(tmp_path, monkeypatch):
    """loss_d is the mean over every critic step since the last report (not their sum), loss_g the mean
    over G steps; g_steps counts G updates (5 critic steps each for wgan)."""
    from gan import losses

    calls = {"d": [], "g": []}
    real_d, real_g = losses.wgan_d_loss, losses.wgan_g_loss

    def spy_d(*args, **kwargs):
        out = real_d(*args, **kwargs)
        calls["d"].append(float(out["loss_d"].detach()))
        return out

    def spy_g(*args, **kwargs):
        out = real_g(*args, **kwargs)
        calls["g"].append(float(out["loss_g"].detach()))
        return out

    monkeypatch.setattr(losses, "wgan_d_loss", spy_d)
    monkeypatch.setattr(losses, "wgan_g_loss", spy_g)
    cfg = tiny_config("wgan", kimg=0.2)
    reports = []
    training_loop(cfg, tmp_path, lambda m, c: reports.append(m))
    (metrics,) = reports
    # 0.2 kimg at batch 20 = 10 real batches = 2 G steps of 5 critic steps each
    assert len(calls["d"]) == 10 and len(calls["g"]) == 2 and metrics["g_steps"] == 2
    assert metrics["loss_d"] == pytest.approx(sum(calls["d"]) / 10, rel=1e-5)
    assert metrics["loss_g"] == pytest.approx(sum(calls["g"]) / 2, rel=1e-5)


def test_each_variant_trains_with_its_own_papers_optimiser(tmp_path, monkeypatch):
    seen = []
    real_adam = torch.optim.Adam

    def spy(params, lr, betas, **kwargs):
        seen.append((lr, betas))
        return real_adam(params, lr=lr, betas=betas, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    for variant in ("wgan", "dcgan"):
        training_loop(tiny_config(variant, kimg=0.2), tmp_path / variant)
    assert seen == [(1e-4, (0.0, 0.9)), (1e-4, (0.0, 0.9)), (4e-4, (0.5, 0.999)), (1e-4, (0.5, 0.999))]


def test_fid_statistics_are_cached_under_data_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path / "env-cache"))
    cfg = tiny_config("dcgan", kimg=0.2)
    cfg.data.cache_dir = str(tmp_path / "sweep-cache")
    training_loop(cfg, tmp_path / "run")
    assert list((tmp_path / "sweep-cache" / "fid-stats").glob("*.npz"))
    assert not (tmp_path / "env-cache" / "fid-stats").exists()


def test_matmul_precision_stays_readable_after_training_backends_and_an_evaluation(tmp_path):
    """Inductor's max-autotune calls torch.get_float32_matmul_precision(), which raises once TF32 was switched on
    through the per-backend fp32_precision attributes alone: training and evaluation use one API."""
    from gan.metrics import Evaluator
    from gan.precision import precision_state, restore_precision
    from gan.training import set_training_backends

    saved, benchmark = precision_state(), torch.backends.cudnn.benchmark
    try:
        set_training_backends(torch.device("cuda"))  # only sets flags: no CUDA call, so it runs on a CPU too
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        images = np.random.default_rng(0).integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
        evaluator = Evaluator(images, dataset_key="tf32", split="train", extractor="tiny-conv", cache_dir=str(tmp_path))
        evaluator.evaluate(lambda n: torch.from_numpy(images[:n]), 20)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = benchmark
        restore_precision(saved)
    assert torch.get_float32_matmul_precision() == saved[0]


def legacy_checkpoint(new: Path, old: Path) -> None:
    """Rewrite a checkpoint as training_loop wrote it before CMHSA's q, k and v became one `qkv` convolution:
    separate query/key/value weights in G, and opt_g's Adam state for those separate parameters."""
    payload = torch.load(new / "checkpoint.pt", weights_only=True)
    g_state, opt_state = payload["models"]["G"], payload["opt_g"]
    g_names = list(g_state)  # parameters first, in named_parameters() order, then buffers; filter below
    param_names = [k for k in g_names if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    (group,) = opt_state["param_groups"]
    state_by_name = {param_names[i]: opt_state["state"][idx] for i, idx in enumerate(group["params"])}
    legacy_g, legacy_names = {}, []
    for key, tensor in g_state.items():
        if ".qkv." not in key:
            legacy_g[key] = tensor
            continue
        stem, _, kind = key.rpartition("qkv.")
        for part, chunk in zip(("query", "key", "value"), tensor.chunk(3), strict=True):
            legacy_g[f"{stem}{part}.{kind}"] = chunk.clone()
    for name in param_names:  # legacy parameter order: query.weight, query.bias, key.weight, ...
        if name.endswith("qkv.weight"):
            stem = name[: -len("qkv.weight")]
            legacy_names += [f"{stem}{part}.{kind}" for part in ("query", "key", "value")
                             for kind in ("weight", "bias")]
        elif not name.endswith("qkv.bias"):
            legacy_names.append(name)
    legacy_state = {}
    for index, name in enumerate(legacy_names):
        stem, _, rest = name.rpartition(".")
        stem, _, part = stem.rpartition(".")
        if part in ("query", "key", "value"):
            fused = state_by_name[f"{stem}.qkv.{rest}"]
            i = ("query", "key", "value").index(part)
            legacy_state[index] = {"step": fused["step"].clone(),
                                   **{k: fused[k].chunk(3)[i].clone() for k in ("exp_avg", "exp_avg_sq")}}
        else:
            legacy_state[index] = state_by_name[name]
    payload["models"]["G"] = legacy_g
    payload["opt_g"] = {"state": legacy_state, "param_groups": [{**group, "params": list(range(len(legacy_names)))}]}
    old.mkdir()
    torch.save(payload, old / "checkpoint.pt")


def test_a_checkpoint_of_the_old_cmhsa_layout_resumes_bit_for_bit(tmp_path):
    cfg = tiny_config("use-cmhsa-gan")
    dataset = prepare_dataset(cfg.data)
    saved = tmp_path / "saved-after-first-eval"
    straight = []

    def report(metrics, checkpoint_dir):
        straight.append(metrics)
        if len(straight) == 1:
            shutil.copytree(checkpoint_dir, saved)

    training_loop(cfg, tmp_path / "straight", report, dataset=dataset)
    legacy_checkpoint(saved, tmp_path / "legacy")
    assert any(".query.weight" in k for k in torch.load(tmp_path / "legacy" / "checkpoint.pt")["models"]["G"])
    resumed = []
    training_loop(cfg, tmp_path / "resumed", lambda m, c: resumed.append(m), resume_from=tmp_path / "legacy",
                  dataset=dataset)
    for key in ("kimg", "loss_d", "loss_g", "fid"):
        assert resumed[0][key] == straight[1][key], key
