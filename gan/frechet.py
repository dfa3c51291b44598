"""The Fréchet distance between Gaussians fitted to features, in float64 on the features' own device.

torch-fidelity computes it in numpy on the CPU: `eigvals(sigma1 @ sigma2)`, a general (non-symmetric)
eigenproblem, seconds for Inception's 2048 x 2048 covariances. Here the same number comes from a symmetric
one: with S the real statistics' covariance and R its square root, R S_g R is symmetric positive
semi-definite and has the eigenvalues of S S_g, so tr sqrt(S S_g) = sum(sqrt(eigvalsh(R S_g R))). R is
computed once per real split and cached with its statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (float64), and the covariance's PSD square root once known."""

    mu: Tensor  # (D,)
    sigma: Tensor  # (D, D)
    sqrt_sigma: Tensor | None = None

    def with_sqrt(self) -> GaussianStats:
        if self.sqrt_sigma is None:
            self.sqrt_sigma = psd_sqrt(self.sigma)
        return self

    def to(self, device: torch.device | str) -> GaussianStats:
        move = lambda t: None if t is None else t.to(device, torch.float64)  # noqa: E731
        return GaussianStats(move(self.mu), move(self.sigma), move(self.sqrt_sigma))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """What the statistics cache stores (torch-fidelity's mu/sigma keys, plus sqrt_sigma once known)."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "sqrt_sigma": self.sqrt_sigma}
        return {k: t.detach().cpu().numpy() for k, t in arrays.items() if t is not None}

    @classmethod
    def from_numpy(cls, arrays, device: torch.device | str = "cpu") -> GaussianStats:
        sqrt = arrays["sqrt_sigma"] if "sqrt_sigma" in arrays else None
        return cls(torch.from_numpy(np.asarray(arrays["mu"])), torch.from_numpy(np.asarray(arrays["sigma"])),
                   None if sqrt is None else torch.from_numpy(np.asarray(sqrt))).to(device)


def feature_statistics(features: Tensor) -> GaussianStats:
    """Mean and unbiased covariance (N - 1, as numpy.cov and torch-fidelity) of (N, D) features, in float64."""
    x = features.detach().to(torch.float64)
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got {tuple(x.shape)}")
    mu = x.mean(dim=0)
    centred = x - mu
    return GaussianStats(mu, centred.T @ centred / (len(x) - 1))


def psd_sqrt(sigma: Tensor) -> Tensor:
    """The symmetric square root of a covariance; eigenvalues below 0 (rounding) count as 0."""
    eigenvalues, vectors = torch.linalg.eigh(sigma)
    return (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(real: GaussianStats, fake: GaussianStats) -> float:
    """||mu_r - mu_g||^2 + tr(S_r) + tr(S_g) - 2 tr sqrt(S_r S_g), on real's device (one host sync)."""
    root = real.with_sqrt().sqrt_sigma
    fake = fake.to(root.device)
    product = root @ fake.sigma @ root
    product = (product + product.T) / 2  # symmetric up to rounding; eigvalsh reads one triangle only
    tr_covmean = torch.linalg.eigvalsh(product).clamp(min=0).sqrt().sum()
    diff = real.mu - fake.mu
    return float(diff @ diff + real.sigma.trace() + fake.sigma.trace() - 2 * tr_covmean)
