"""Plain-dataclass configuration of one training run (a "trial").

Kept free of pydantic and Ray so that `gan` runs on machines that have only torch
(the GPU benchmark box). `orchestrator.sweepfile` validates sweep files with pydantic
and produces these objects.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("dcgan", "use-gan", "cmhsa-gan", "use-cmhsa-gan", "wgan", "vae-gan")
ATTENTION_VARIANTS = ("cmhsa-gan", "use-cmhsa-gan")
USE_VARIANTS = ("use-gan", "use-cmhsa-gan")
SPLITS = ("train", "val", "test", "all")
# Feature extractors for FID/IS/KID (gan.metrics); numbers from different ones are never compared.
INCEPTION = "inception-v3-compat"  # torch-fidelity's standard InceptionV3: comparable with published FIDs
TINY_CONV = "tiny-conv"  # fixed random-weight conv net: offline tests and smoke runs only
EXTRACTORS = (INCEPTION, TINY_CONV)


@dataclass
class ModelConfig:
    variant: str = "dcgan"
    nz: int = 100  # latent size (both papers)
    # Channels of the generator's transposed convs, widest first; a final
    # transposed conv maps the last width to 3 channels. 64x64 needs 4 widths.
    g_widths: tuple[int, ...] = (512, 256, 128, 64)
    d_widths: tuple[int, ...] = (64, 128, 256, 512)  # discriminator convs, narrowest first
    heads: int = 4  # CMHSA heads; must divide the channels at `cmhsa_at`
    attn_dropout: float = 0.1  # dropout on attention weights (eq. 3.9)
    # Where the modules sit, as a feature-map resolution (see README "Choices"):
    use_at: int = 32  # the transposed conv producing this resolution becomes a USE module
    cmhsa_at: int = 16  # CMHSA runs on the feature map of this resolution
    image_size: int = 64


@dataclass
class DataConfig:
    path: str | None = None  # None: procedurally generated faces (smoke runs, tests)
    image_size: int = 64
    min_side: int | None = None  # drop images whose shorter side is below this; None = image_size
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test
    split_seed: int = 0
    synthetic_count: int = 2000  # images generated when path is None
    cache_dir: str | None = None  # None: $GAN_CACHE_DIR or ~/.cache/gan-sweeps


@dataclass
class TrainConfig:
    kimg: float = 400.0  # budget: thousands of real images shown to D
    batch_size: int = 100
    lr_d: float | None = None  # None: variant default (4e-4, both papers; wgan 1e-4, WGAN-GP)
    lr_g: float | None = None  # None: variant default (1e-4)
    beta1: float | None = None  # None: variant default (0.5; wgan 0.0)
    beta2: float | None = None  # None: variant default (0.999; wgan 0.9)
    d_steps: int | None = None  # D steps per G step; None: variant default (1; wgan 5)
    gp_weight: float = 10.0  # WGAN-GP gradient-penalty weight
    recon_weight: float = 1.0  # VAE-GAN feature-reconstruction weight in the decoder loss
    kl_weight: float = 1.0  # VAE-GAN prior (KL) weight in the encoder loss
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # GPU speed switches (ignored on CPU). Off by default: on one H100 (bench/README.md, "Earlier GPU figures",
    # dcgan 512) fp32 with TF32 trained faster than bf16 autocast (8,854 vs 7,369 img/s); channels_last was slower.
    amp: bool = False  # bf16 autocast
    channels_last: bool = False
    # torch.compile G and D (default mode). With a CUDA graph the graph is captured around the compiled kernels
    # (reduce-overhead if that capture fails); without one, the compiled kernels run without any CUDA graph.
    compile: bool = False
    # One CUDA graph per iteration (BCE variants on CUDA; gan.step): auto | on | off. auto = off until a GPU
    # run of `bench/bench_train.py --check-graph` has shown graph and eager training agree.
    cuda_graph: str = "auto"


@dataclass
class EvalConfig:
    every_kimg: float = 20.0
    fid_samples: int = 2000  # intermediate (cheap) FID
    final_fid_samples: int = 10000  # last evaluation
    kid: bool = False
    extractor: str = "inception-v3-compat"  # or "tiny-conv" (offline tests; never ranked with inception)
    weights_path: str | None = None  # InceptionV3 weights file; else $GAN_INCEPTION_WEIGHTS or download
    fid_split: str = "train"  # real split the FID reference statistics come from
    grid_size: int = 8  # fixed-noise sample grid is grid_size x grid_size


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialConfig:
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return kind(**values)

        return cls(
            model=build(ModelConfig, d.get("model", {})),
            data=build(DataConfig, d.get("data", {})),
            train=build(TrainConfig, d.get("train", {})),
            eval=build(EvalConfig, d.get("eval", {})),
        )


def variant_defaults(variant: str) -> dict[str, float]:
    """Optimiser settings each objective was published with: a baseline gets its own paper's settings.

    BCE variants and vae-gan: the DCGAN-channels paper (lr D 4e-4 / G 1e-4, Adam beta1 0.5).
    wgan: WGAN-GP (Gulrajani et al. 2017, Algorithm 1): lr 1e-4 for both, Adam (0, 0.9), 5 critic steps.
    """
    if variant == "wgan":
        return {"lr_d": 1e-4, "lr_g": 1e-4, "beta1": 0.0, "beta2": 0.9, "d_steps": 5}
    return {"lr_d": 4e-4, "lr_g": 1e-4, "beta1": 0.5, "beta2": 0.999, "d_steps": 1}


def optimiser_settings(variant: str, train: TrainConfig) -> dict[str, float]:
    """The effective lr_d, lr_g, beta1, beta2, d_steps: the trial's own value where set, else the variant's."""
    defaults = variant_defaults(variant)
    chosen = {k: getattr(train, k) if getattr(train, k) is not None else v for k, v in defaults.items()}
    chosen["d_steps"] = int(chosen["d_steps"])
    return chosen
