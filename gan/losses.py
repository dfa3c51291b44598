"""Losses of each objective, as pure functions of (models, batch, noise).

All discriminators return raw logits; BCE is computed with `softplus`, which is
BCE-with-logits: the same value as eqs 3.12-3.13 applied to sigmoid(D(x)), without
the overflow of log(sigmoid) when D is confident.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bce_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Eq. 3.12: -E[log D(x)] - E[log(1 - D(G(z)))]."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def bce_g_loss(fake_logits: Tensor) -> Tensor:
    """Eq. 3.13, the non-saturating generator loss: -E[log D(G(z))]."""
    return F.softplus(-fake_logits).mean()


def dcgan_d_loss(G: nn.Module, D: nn.Module, real: Tensor, z: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        fake = G(z)
    loss = bce_d_loss(D(real), D(fake))
    return {"loss_d": loss}


def dcgan_g_loss(G: nn.Module, D: nn.Module, z: Tensor) -> dict[str, Tensor]:
    return {"loss_g": bce_g_loss(D(G(z)))}


def gradient_penalty(D: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): (||grad D(x_hat)||_2 - 1)^2 on random interpolates.

    Computed in fp32 even under autocast: a double backward through bf16 is too coarse.
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        x_hat = (alpha * real.float() + (1 - alpha) * fake.float()).requires_grad_(True)
        scores = D(x_hat)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def wgan_d_loss(G: nn.Module, D: nn.Module, real: Tensor, z: Tensor, gp_weight: float) -> dict[str, Tensor]:
    with torch.no_grad():
        fake = G(z)
    wasserstein = D(fake).mean() - D(real).mean()
    gp = gradient_penalty(D, real, fake)
    return {"loss_d": wasserstein + gp_weight * gp, "gp": gp}


def wgan_g_loss(G: nn.Module, D: nn.Module, z: Tensor) -> dict[str, Tensor]:
    return {"loss_g": -D(G(z)).mean()}


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)), summed over latent dims, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def reparameterise(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu + torch.randn_like(mu) * (0.5 * logvar).exp()


def feature_nll(recon_features: Tensor, real_features: Tensor) -> Tensor:
    """Larsen et al. 2016's learned-similarity term: -log N(Dis_l(x) | Dis_l(x~), I), dropping the
    constant, i.e. half the squared error summed over every feature of D's last hidden layer and
    averaged over the batch (a sum, like the KL term it is weighed against, not a mean over features)."""
    return 0.5 * (recon_features - real_features).pow(2).flatten(1).sum(dim=1).mean()


def _d_real_and_recon(D: nn.Module, real: Tensor, recon: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """D on real images and their reconstructions as ONE batch, so BatchNorm normalises both with the
    same statistics (their features are compared with each other)."""
    logits, features = D(torch.cat([real, recon]), return_features=True)
    n = real.shape[0]
    return logits[:n], logits[n:], features[:n], features[n:]


def vaegan_d_loss(E: nn.Module, G: nn.Module, D: nn.Module, real: Tensor, z: Tensor) -> dict[str, Tensor]:
    """Larsen et al. 2016: D tells real images from reconstructions and from prior samples."""
    with torch.no_grad():
        recon = G(reparameterise(*E(real)))
        sample = G(z)
    real_logits, recon_logits, _, _ = _d_real_and_recon(D, real, recon)
    loss = (
        F.softplus(-real_logits).mean()
        + F.softplus(recon_logits).mean()
        + F.softplus(D(sample)).mean()
    )
    return {"loss_d": loss}


def vaegan_eg_losses(
    E: nn.Module, G: nn.Module, D: nn.Module, real: Tensor, z: Tensor, recon_weight: float, kl_weight: float
) -> dict[str, Tensor]:
    """Larsen et al. 2016, eqs (8)-(10) with the non-saturating GAN loss:
    encoder loss  = kl_weight * L_prior + L_llike,
    decoder loss  = recon_weight * L_llike (the paper's gamma) + GAN loss on reconstructions and samples,
    where L_prior = KL(q(z|x) || N(0, I)) summed over latent dims and L_llike = `feature_nll`.
    The caller back-propagates loss_e into E only and loss_g into G only; D is trained by its own loss."""
    mu, logvar = E(real)
    recon = G(reparameterise(mu, logvar))
    _, recon_logits, real_features, recon_features = _d_real_and_recon(D, real, recon)
    sample_logits = D(G(z))
    reconstruction = feature_nll(recon_features, real_features.detach())
    kl = kl_to_standard_normal(mu, logvar)
    loss_e = kl_weight * kl + reconstruction
    loss_g = recon_weight * reconstruction + bce_g_loss(recon_logits) + bce_g_loss(sample_logits)
    return {"loss_e": loss_e, "loss_g": loss_g, "kl": kl, "recon": reconstruction}
