"""Generator, discriminator and encoder for every variant, built from a `ModelConfig`.

All generators are the DCGAN generator (Radford et al. 2016): a latent vector is
upsampled by transposed convolutions, 4x4 first and then doubling to `image_size`.
USE-GAN swaps one of those transposed convs for a USE module, CMHSA-GAN inserts a
self-attention block between two of them, USE-CMHSA-GAN does both (the
use-cmhsa-gan paper, eqs 3.1-3.11). Discriminators are the DCGAN discriminator;
WGAN-GP's critic uses layer norm instead of batch norm; VAE-GAN adds an encoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gan.config import ATTENTION_VARIANTS, USE_VARIANTS, VARIANTS, ModelConfig


class USE(nn.Module):
    """Upsampling Squeeze-and-Excitation: reweight channels, then double the resolution."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        if in_ch < 2:
            raise ValueError(f"USE needs at least 2 input channels to halve, got in_ch={in_ch}")
        self.reduce = nn.Conv2d(in_ch, in_ch // 2, 1)  # Conv_1: C -> C/2
        self.expand = nn.Conv2d(in_ch // 2, in_ch, 1)  # Conv_2: C/2 -> C
        self.upsample = nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False)  # BatchNorm follows

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """A = sigmoid(Conv_2(ReLU(Conv_1(z)))) with z the per-channel mean (eqs 3.1-3.2); (B, C, 1, 1)."""
        z = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.expand(F.relu(self.reduce(z))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x * self.channel_weights(x))  # eq 3.3, then upsampling


# Parameter names of CMHSA's Q, K and V convolutions before they became one `qkv` convolution (2026-11).
LEGACY_QKV = ("query", "key", "value")


def fuse_legacy_qkv(state_dict: dict[str, torch.Tensor], prefix: str) -> bool:
    """In place: a CMHSA's separate query/key/value conv weights (old checkpoints) stacked into `qkv`'s, in
    that order (its output channels are Q, then K, then V). True when there was anything to fuse."""
    fused = False
    for kind in ("weight", "bias"):
        old = [f"{prefix}{name}.{kind}" for name in LEGACY_QKV]
        if all(key in state_dict for key in old) and f"{prefix}qkv.{kind}" not in state_dict:
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(key) for key in old])
            fused = True
    return fused


class CMHSA(nn.Module):
    """Convolution-based multi-head self-attention over all H*W positions, with a residual (eqs 3.4-3.11)."""

    def __init__(self, channels: int, heads: int, dropout: float):
        super().__init__()
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"CMHSA heads={heads} does not divide channels={channels}")
        self.heads = heads
        self.head_dim = channels // heads  # eq 3.4
        self.scale = 1.0 / math.sqrt(self.head_dim)  # eq 3.5
        self.dropout = dropout
        # Q, K and V of eq 3.6 as one 1x1 convolution: output channels [0, C) are Q, [C, 2C) K, [2C, 3C) V.
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out_proj = nn.Conv2d(channels, channels, 1)  # W in eq 3.11

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fuse_legacy_qkv(state_dict, prefix)  # checkpoints written before the fusion load unchanged
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of eq 3.6 as (B, heads, H*W, head_dim), each contiguous, so with unit stride along head_dim
        whatever x's memory format: flash, memory-efficient and cuDNN attention refuse anything else."""
        b, _, h, w = x.shape
        qkv = self.qkv(x).reshape(b, 3, self.heads, self.head_dim, h * w)  # a view in both memory formats
        return qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)  # one copy for all three

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Y = out_proj(Output) + X; with return_attention also the softmax weights (B, heads, HW, HW).

        The returned weights are alpha of eq 3.8, i.e. before attention dropout.
        """
        q, k, v = self.project(x)
        p = self.dropout if self.training else 0.0
        if return_attention:
            attn = torch.softmax(q @ k.transpose(2, 3) * self.scale, dim=-1)  # eqs 3.7-3.8
            out = F.dropout(attn, p) @ v  # eqs 3.9-3.10
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        y = self.out_proj(self._merge_heads(out, x)) + x
        return (y, attn) if return_attention else y

    @staticmethod
    def _merge_heads(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, HW, head_dim) -> (B, C, H, W) in x's memory format (a mixed-format sum would copy)."""
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return out.permute(0, 2, 1, 3).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return out.transpose(2, 3).reshape(b, c, h, w)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; valid: {', '.join(VARIANTS)}")


def _check_width_count(role: str, widths: tuple[int, ...], image_size: int) -> None:
    """A 4x4 map doubled len(widths) times must give image_size, i.e. len(widths) == log2(image_size) - 2."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    needed = int(math.log2(image_size)) - 2
    if len(widths) != needed:
        raise ValueError(
            f"{role} needs {needed} widths for image_size={image_size}, got {len(widths)}: {tuple(widths)}"
        )


def _check_placement(name: str, value: int, allowed: list[int], image_size: int) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name}={value} is not a valid resolution for image_size={image_size}; choose one of {allowed}"
        )


class Generator(nn.Module):
    """DCGAN generator (B, nz) -> (B, 3, image_size, image_size) in [-1, 1], with the variant's modules."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_variant(cfg.variant)
        widths = tuple(cfg.g_widths)
        _check_width_count("generator", widths, cfg.image_size)
        # Resolution of the feature map after each width's layer: 4, 8, ..., image_size / 2.
        resolutions = [4 * 2**i for i in range(len(widths))]
        use_at = cfg.use_at if cfg.variant in USE_VARIANTS else None
        cmhsa_at = cfg.cmhsa_at if cfg.variant in ATTENTION_VARIANTS else None
        if use_at is not None:
            _check_placement("use_at", use_at, resolutions[1:], cfg.image_size)
        if cmhsa_at is not None:
            _check_placement("cmhsa_at", cmhsa_at, resolutions, cfg.image_size)

        self.nz = cfg.nz
        layers: list[nn.Module] = []
        for i, (width, resolution) in enumerate(zip(widths, resolutions, strict=True)):
            if i == 0:
                layers.append(nn.ConvTranspose2d(cfg.nz, width, 4, 1, 0, bias=False))  # 1x1 -> 4x4
            elif resolution == use_at:
                layers.append(USE(widths[i - 1], width))
            else:
                layers.append(nn.ConvTranspose2d(widths[i - 1], width, 4, 2, 1, bias=False))
            layers += [nn.BatchNorm2d(width), nn.ReLU()]
            if resolution == cmhsa_at:
                layers.append(CMHSA(width, cfg.heads, cfg.attn_dropout))
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1), nn.Tanh()]  # to RGB
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.nz, 1, 1))


def _conv_trunk(widths: tuple[int, ...], norm: str) -> nn.Sequential:
    """DCGAN discriminator body: stride-2 4x4 convs, image_size -> 4x4, no norm on the first (as in DCGAN)."""
    if norm not in ("batch", "layer"):
        raise ValueError(f"unknown norm {norm!r}; valid: batch, layer")
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
    for in_ch, out_ch in zip(widths[:-1], widths[1:], strict=False):
        # GroupNorm(1, C) normalises each sample on its own, as WGAN-GP's per-sample penalty requires.
        normalise = nn.BatchNorm2d(out_ch) if norm == "batch" else nn.GroupNorm(1, out_ch)
        layers += [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False), normalise, nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """DCGAN discriminator: (B, 3, image_size, image_size) -> one logit per image (B,)."""

    def __init__(self, cfg: ModelConfig, norm: str = "batch"):
        super().__init__()
        _check_width_count("discriminator", tuple(cfg.d_widths), cfg.image_size)
        self.features = _conv_trunk(tuple(cfg.d_widths), norm)
        self.logit = nn.Conv2d(cfg.d_widths[-1], 1, 4, 1, 0)  # 4x4 -> 1x1

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B,); with return_features also the last hidden block (B, d_widths[-1], 4, 4)."""
        features = self.features(x)
        logit = self.logit(features).flatten()
        return (logit, features) if return_features else logit


class Encoder(nn.Module):
    """VAE-GAN encoder (Larsen et al. 2016): image -> (mu, logvar) of a diagonal Gaussian over the latent."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_width_count("encoder", tuple(cfg.d_widths), cfg.image_size)
        self.features = _conv_trunk(tuple(cfg.d_widths), "batch")
        flat = cfg.d_widths[-1] * 4 * 4
        self.mu = nn.Linear(flat, cfg.nz)
        self.logvar = nn.Linear(flat, cfg.nz)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).flatten(1)
        return self.mu(h), self.logvar(h)


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation, for `model.apply`: weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(cfg: ModelConfig) -> dict[str, nn.Module]:
    """{"G": generator, "D": discriminator or critic} plus "E": encoder for vae-gan, all DCGAN-initialised."""
    _check_variant(cfg.variant)
    models: dict[str, nn.Module] = {
        "G": Generator(cfg),
        "D": Discriminator(cfg, norm="layer" if cfg.variant == "wgan" else "batch"),
    }
    if cfg.variant == "vae-gan":
        models["E"] = Encoder(cfg)
    for model in models.values():
        model.apply(init_weights)
    return models


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
