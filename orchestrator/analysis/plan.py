"""What a sweep planned to measure, read from the `sweep.yaml` kept in its results directory.

A trial without a number (stopped early, diverged, errored, unfinished) still belongs to the block of the
measurement it was planned to get, so the counts beside a mean are those of that block. The plan is the file
as the sweep was started (`orchestrator sweep` copies it there): `eval.extractor`, `train.kimg`,
`eval.fid_samples`, `eval.final_fid_samples`, `eval.every_kimg`. Settings the file leaves out take the
defaults of `gan.config` (repeated here, and checked against it by the tests, so that the analysis layer
imports nothing but the store).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from orchestrator.store.reader import DEFAULT_EVERY_KIMG

SWEEP_FILE = "sweep.yaml"
FINGERPRINT_FILE = "fingerprint"
# gan.config's defaults (EvalConfig.extractor, TrainConfig.kimg, EvalConfig.fid_samples, .final_fid_samples).
DEFAULT_EXTRACTOR = "inception-v3-compat"
DEFAULT_KIMG = 400.0
DEFAULT_FID_SAMPLES = 2000
DEFAULT_FINAL_FID_SAMPLES = 10000


@dataclass(frozen=True)
class Plan:
    extractor: str = DEFAULT_EXTRACTOR
    kimg: float = DEFAULT_KIMG  # the training budget: where the final FID is measured
    fid_samples: int = DEFAULT_FID_SAMPLES  # images per intermediate FID (what ASHA judges)
    final_fid_samples: int = DEFAULT_FINAL_FID_SAMPLES
    every_kimg: float = DEFAULT_EVERY_KIMG


def read_plan(sweep_dir: Path) -> Plan:
    """The sweep's planned measurement; defaults for whatever the file lacks (or when it is missing or unreadable)."""
    try:
        spec = yaml.safe_load((Path(sweep_dir) / SWEEP_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    train = spec.get("train") if isinstance(spec.get("train"), dict) else {}
    evaluation = spec.get("eval") if isinstance(spec.get("eval"), dict) else {}
    extractor = evaluation.get("extractor")
    return Plan(
        extractor=extractor if isinstance(extractor, str) and extractor else DEFAULT_EXTRACTOR,
        kimg=_positive(train.get("kimg"), float, DEFAULT_KIMG),
        fid_samples=_positive(evaluation.get("fid_samples"), int, DEFAULT_FID_SAMPLES),
        final_fid_samples=_positive(evaluation.get("final_fid_samples"), int, DEFAULT_FINAL_FID_SAMPLES),
        every_kimg=_positive(evaluation.get("every_kimg"), float, DEFAULT_EVERY_KIMG),
    )


def _positive(value: Any, kind: type, default: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return default
    return kind(value)


def read_fingerprint(sweep_dir: Path) -> str | None:
    """The hash `orchestrator sweep` wrote of the validated sweep (None when the file is missing)."""
    try:
        return (Path(sweep_dir) / FINGERPRINT_FILE).read_text().strip() or None
    except OSError:
        return None


def samples_label(samples: Any) -> str:
    """'FID-2k' for 2,000 images, 'FID-256' for 256: which FID a number is, in a few characters."""
    if samples is None:
        return "FID"
    n = int(samples)
    if n >= 1000 and n % 100 == 0:
        return f"FID-{n / 1000:g}k"
    return f"FID-{n}"


def samples_near(evaluations: pd.DataFrame, kimg: float, every: float) -> int | None:
    """The sample count of the evaluations the sweep ran at `kimg` (the first at or past it, within one
    evaluation interval); the most common one if several; None when no evaluation is there."""
    if evaluations.empty or "fid_samples" not in evaluations or "kimg" not in evaluations:
        return None
    at = evaluations[(evaluations["kimg"] >= kimg - 1e-9) & (evaluations["kimg"] < kimg + every - 1e-9)]
    counts = Counter(int(s) for s in at["fid_samples"] if s is not None and not pd.isna(s))
    return counts.most_common(1)[0][0] if counts else None


class RungSamples:
    """The sample count of the FID ASHA judged at a rung: from the evaluations table at that kimg, else the
    plan's `eval.fid_samples` (intermediate evaluations all use it)."""

    def __init__(self, evaluations: pd.DataFrame, plan: Plan):
        if "final" in evaluations:  # a rung is never the budget: ASHA judges intermediate evaluations
            evaluations = evaluations[~evaluations["final"].fillna(False).astype(bool)]
        self.evaluations, self.plan, self.cache = evaluations, plan, {}

    def __call__(self, kimg: Any) -> int | None:
        if kimg is None or pd.isna(kimg):
            return None
        kimg = float(kimg)
        if kimg not in self.cache:
            found = samples_near(self.evaluations, kimg, self.plan.every_kimg)
            self.cache[kimg] = found if found is not None else self.plan.fid_samples
        return self.cache[kimg]
