"""gan.losses against independent formulations on small tensors: torch's BCELoss on sigmoids, a
gradient penalty recomputed per sample with torch.autograd.grad or known in closed form, and
torch.distributions for the VAE-GAN's KL term."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan import losses

SIZE = 8
NZ = 5


def tiny_generator(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(NZ, 3 * SIZE * SIZE), nn.Tanh(), nn.Unflatten(1, (3, SIZE, SIZE)))


def tiny_critic(seed: int = 1) -> nn.Module:
    """A non-linear image -> one logit net (no batch statistics, so each call sees only its input)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, NZ, generator=torch.Generator().manual_seed(seed))


# --- BCE, eqs 3.12-3.13 -------------------------------------------------------------------------

LOGITS_REAL = torch.tensor([[2.0], [-1.5], [0.3], [4.0]])
LOGITS_FAKE = torch.tensor([[-3.0], [0.7], [1.2], [-0.2]])


def test_d_loss_is_bce_on_sigmoids_of_real_and_fake():
    bce = nn.BCELoss()
    expected = bce(torch.sigmoid(LOGITS_REAL), torch.ones(4, 1)) + bce(torch.sigmoid(LOGITS_FAKE), torch.zeros(4, 1))
    assert losses.bce_d_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(expected.item(), rel=1e-6)


def test_g_loss_is_the_non_saturating_bce_on_fakes():
    expected = nn.BCELoss()(torch.sigmoid(LOGITS_FAKE), torch.ones(4, 1))  # -E[log D(G(z))]
    assert losses.bce_g_loss(LOGITS_FAKE).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bce_stays_exact_where_log_of_a_sigmoid_overflows():
    # A confident D: sigmoid(60) rounds to 1.0 in float32, so BCELoss would clamp -log(0) to 100.
    # -log(1 - sigmoid(x)) = x + log(1 + e^-x) and -log(sigmoid(x)) = log(1 + e^-x), in float64.
    real, fake = torch.tensor([-60.0]), torch.tensor([60.0])
    expected_d = (60 + math.log1p(math.exp(-60))) + (60 + math.log1p(math.exp(-60)))
    assert losses.bce_d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert losses.bce_g_loss(torch.tensor([-60.0])).item() == pytest.approx(60.0, rel=1e-6)


def test_dcgan_d_loss_scores_real_and_generated_images_and_leaves_g_untouched():
    G, D = tiny_generator(), tiny_critic()
    real, z = images(6, seed=2), noise(6, seed=3)
    out = losses.dcgan_d_loss(G, D, real, z)
    bce = nn.BCELoss()
    with torch.no_grad():
        expected = bce(torch.sigmoid(D(real)), torch.ones(6, 1)) + bce(torch.sigmoid(D(G(z))), torch.zeros(6, 1))
    assert out["loss_d"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss_d"].backward()
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())


def test_dcgan_g_loss_is_bce_of_d_on_fresh_fakes_labelled_real():
    G, D = tiny_generator(), tiny_critic()
    z = noise(6, seed=3)
    with torch.no_grad():
        expected = nn.BCELoss()(torch.sigmoid(D(G(z))), torch.ones(6, 1))
    assert losses.dcgan_g_loss(G, D, z)["loss_g"].item() == pytest.approx(expected.item(), rel=1e-6)


# --- WGAN-GP ------------------------------------------------------------------------------------


def linear_critic(seed: int = 4) -> nn.Module:
    """D(x) = w.x + b: its input gradient is w everywhere, so the penalty is (||w|| - 1)^2 in closed form."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 1))


def test_gradient_penalty_of_a_linear_critic_is_known_in_closed_form():
    D = linear_critic()
    w = D[1].weight.detach()
    expected = (w.norm() - 1) ** 2
    penalty = losses.gradient_penalty(D, images(5, seed=0), images(5, seed=1))
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_penalty_matches_a_per_sample_autograd_computation():
    D = tiny_critic()
    real, fake = images(5, seed=0), images(5, seed=1)
    torch.manual_seed(7)
    penalty = losses.gradient_penalty(D, real, fake)
    torch.manual_seed(7)  # the same interpolation weights, drawn the same way
    alpha = torch.rand(5, 1, 1, 1)
    expected = []
    for i in range(5):  # one image at a time: no batch-sum shortcut
        x_hat = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x_hat).squeeze(), x_hat)
        expected.append((grad.norm() - 1) ** 2)
    assert penalty.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_gradient_penalty_is_fp32_under_bf16_autocast():
    D = tiny_critic()
    real, fake = images(5, seed=0), images(5, seed=1)
    torch.manual_seed(7)
    exact = losses.gradient_penalty(D, real, fake)
    torch.manual_seed(7)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = losses.gradient_penalty(D, real, fake)
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(exact.item(), rel=1e-6)


def test_wgan_d_loss_value_and_its_gradient_include_the_penalty():
    """With a linear critic: loss = mean(w.fake) - mean(w.real) + 10 (||w|| - 1)^2, and its gradient
    in w is mean(fake - real) + 20 (||w|| - 1) w / ||w||: the penalty is differentiated (double backward)."""
    G, D = tiny_generator(), linear_critic()
    real, z = images(6, seed=2), noise(6, seed=3)
    with torch.no_grad():
        fake = G(z)
    w = D[1].weight.detach().flatten()
    wasserstein = (fake.flatten(1) @ w).mean() - (real.flatten(1) @ w).mean()
    penalty = (w.norm() - 1) ** 2
    out = losses.wgan_d_loss(G, D, real, z, gp_weight=10.0)
    assert out["gp"].item() == pytest.approx(penalty.item(), rel=1e-5)
    assert out["loss_d"].item() == pytest.approx((wasserstein + 10 * penalty).item(), rel=1e-5, abs=1e-6)
    out["loss_d"].backward()
    expected_grad = (fake - real).flatten(1).mean(0) + 20 * (w.norm() - 1) * w / w.norm()
    torch.testing.assert_close(D[1].weight.grad.flatten(), expected_grad, rtol=1e-4, atol=1e-6)
    assert D[1].bias.grad.abs().item() < 1e-6  # the bias cancels in the difference and has no input gradient
    assert all(p.grad is None for p in G.parameters())


def test_wgan_g_loss_is_minus_the_mean_critic_score_of_fakes():
    G, D = tiny_generator(), tiny_critic()
    z = noise(6, seed=3)
    with torch.no_grad():
        expected = -D(G(z)).mean()
    assert losses.wgan_g_loss(G, D, z)["loss_g"].item() == pytest.approx(expected.item(), rel=1e-6)


# --- VAE-GAN (Larsen et al. 2016) -----------------------------------------------------------------

VAE_MODEL = dict(variant="vae-gan", nz=6, g_widths=(16, 8), d_widths=(8, 16), image_size=16)


def vaegan_models(seed: int = 0) -> dict[str, nn.Module]:
    from gan.config import ModelConfig
    from gan.models import build_models

    torch.manual_seed(seed)
    return build_models(ModelConfig(**VAE_MODEL))


def test_kl_term_equals_torch_distributions():
    mu = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.1, -0.3]])
    logvar = torch.tensor([[0.0, -2.0, 1.0], [0.3, 0.0, -0.5]])
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(q, prior).sum(dim=1).mean()  # summed over dims, batch mean
    assert losses.kl_to_standard_normal(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-6)


def test_vaegan_d_loss_is_bce_real_versus_reconstructions_and_prior_samples():
    m = vaegan_models()
    E, G, D = (m[k].eval() for k in "EGD")  # eval: BatchNorm's running statistics, so batching cannot matter
    real = images(4, seed=0).repeat_interleave(2, 2).repeat_interleave(2, 3)  # 16x16
    z = torch.randn(4, VAE_MODEL["nz"], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    loss = losses.vaegan_d_loss(E, G, D, real, z)["loss_d"]
    torch.manual_seed(5)  # the same reparameterisation noise
    with torch.no_grad():
        mu, logvar = E(real)
        recon = G(mu + torch.randn_like(mu) * (0.5 * logvar).exp())
        bce, ones, zeros = nn.BCELoss(), torch.ones(4), torch.zeros(4)
        expected = (bce(torch.sigmoid(D(real)), ones) + bce(torch.sigmoid(D(recon)), zeros)
                    + bce(torch.sigmoid(D(G(z))), zeros))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_feature_reconstruction_is_half_the_squared_error_summed_over_features():
    recon, real = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expected = nn.functional.mse_loss(recon, real, reduction="sum") / 2 / 3  # per image, summed over features
    assert losses.feature_nll(recon, real).item() == pytest.approx(expected.item(), rel=1e-6)


def one_step_of_training_loop(tmp_path, monkeypatch, *, keep: set[str]) -> dict[str, bool]:
    """Run training_loop for one D step and one E/G step, with every loss not in `keep` multiplied by 0
    (its gradients are then exactly 0, and Adam moves no parameter with a zero gradient). Returns, for
    each network, whether any of its parameters changed."""
    import gan.training
    from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig

    before: dict[str, dict[str, torch.Tensor]] = {}
    trained: dict[str, nn.Module] = {}
    build = gan.training.build_models

    def recording_build(cfg):
        trained.update(build(cfg))
        before.update({k: {n: p.detach().clone() for n, p in m.named_parameters()} for k, m in trained.items()})
        return trained

    def zeroing(loss_fn):
        def wrapped(*args, **kwargs):
            out = loss_fn(*args, **kwargs)
            return {k: v if k in keep or not k.startswith("loss_") else v * 0 for k, v in out.items()}
        return wrapped

    monkeypatch.setattr(gan.training, "build_models", recording_build)
    monkeypatch.setattr(losses, "vaegan_d_loss", zeroing(losses.vaegan_d_loss))
    monkeypatch.setattr(losses, "vaegan_eg_losses", zeroing(losses.vaegan_eg_losses))
    batch = 20
    cfg = TrialConfig(
        model=ModelConfig(**VAE_MODEL),
        data=DataConfig(image_size=16, synthetic_count=300),
        train=TrainConfig(kimg=batch / 1000, batch_size=batch, device="cpu"),
        eval=EvalConfig(every_kimg=batch / 1000, fid_samples=10, final_fid_samples=10, extractor="tiny-conv",
                        grid_size=2),
    )
    result = gan.training.training_loop(cfg, tmp_path / "-".join(sorted(keep)))
    assert result.status == "completed" and result.kimg == batch / 1000  # exactly one step
    return {k: any(not torch.equal(p, before[k][n]) for n, p in m.named_parameters()) for k, m in trained.items()}


@pytest.mark.parametrize("keep, moved", [
    ({"loss_e"}, {"E": True, "G": False, "D": False}),  # the encoder loss reaches E only
    ({"loss_g"}, {"E": False, "G": True, "D": False}),  # the decoder loss reaches G only
    ({"loss_d"}, {"E": False, "G": False, "D": True}),  # D's step leaves E and G untouched
])
def test_each_vaegan_loss_trains_only_its_own_network(keep, moved, tmp_path, monkeypatch):
    assert one_step_of_training_loop(tmp_path, monkeypatch, keep=keep) == moved
