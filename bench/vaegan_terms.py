#!/usr/bin/env python
"""The size of VAE-GAN's loss terms in a short run: KL prior vs learned-similarity reconstruction.

Larsen et al. 2016 weigh the two as sums (KL over latent dims, Gaussian log-likelihood over D's features);
this prints what `training_loop` logs for them (`kl`, `recon`, the losses) at every evaluation, so the
README's figures can be reproduced. CPU, no Ray, about a minute on 2 cores:
    python bench/vaegan_terms.py
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig  # noqa: E402
from gan.training import training_loop  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kimg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = TrialConfig(
        model=ModelConfig(variant="vae-gan", g_widths=(64, 32, 16, 16), d_widths=(16, 32, 64, 64)),
        data=DataConfig(synthetic_count=2000),
        train=TrainConfig(kimg=args.kimg, batch_size=50, device="cpu", seed=args.seed),
        eval=EvalConfig(every_kimg=0.5, fid_samples=64, final_fid_samples=64, extractor="tiny-conv", grid_size=2),
    )
    with tempfile.TemporaryDirectory() as run_dir:
        training_loop(cfg, run_dir)
        print("| kimg | kl | recon | loss_e | loss_g | loss_d |\n|---|---|---|---|---|---|")
        for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines():
            m = json.loads(line)
            columns = ("kimg", "kl", "recon", "loss_e", "loss_g", "loss_d")
            print("| " + " | ".join(f"{m[k]:.3g}" for k in columns) + " |")


if __name__ == "__main__":
    main()
