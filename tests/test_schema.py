"""Sweep files: the shipped ones load, trials expand as documented, bad files fail with one clear line."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import optuna
import pytest

from gan.config import ATTENTION_VARIANTS, ModelConfig, TrainConfig
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- shipped sweeps --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_loads(path: Path, tmp_path: Path):
    sweep = load_sweep(path, data_override=str(tmp_path))  # the real dataset may live elsewhere
    assert sweep.name == path.stem
    assert sweep.source_text == path.read_text()
    if sweep.method != "optuna":
        trials = sweep.trials()
        assert len({repr(t) for t in trials}) == len(trials)
        for params in trials:
            sweep.trial_config(params)


def test_shipped_grid_sizes(tmp_path: Path):
    sizes = {name: len(load_sweep(SWEEPS / f"{name}.yaml", data_override=str(tmp_path)).trials())
             for name in ("ablation", "channels", "heads")}
    assert sizes == {"ablation": 6 * 5, "channels": 3 * 3, "heads": 3 + 2 * 4 * 3}


def test_smoke_sweep_is_small_and_stops_trials_early():
    sweep = load_sweep(SWEEPS / "smoke.yaml")
    assert sweep.data.path is None and sweep.eval.extractor == "tiny-conv"
    assert len(sweep.trials()) >= 6
    assert sweep.resources.gpu == 0
    s = sweep.scheduler
    assert s.type == "asha" and s.max_t == sweep.train.kimg and s.grace_period * s.reduction_factor < s.max_t


def test_lr_ratio_is_optuna_with_log_uniform_lr_d(tmp_path: Path):
    sweep = load_sweep(SWEEPS / "lr_ratio.yaml", data_override=str(tmp_path))
    assert sweep.method == "optuna" and sweep.scheduler.type == "asha"
    lr_d = sweep.parameters["lr_d"]
    assert (lr_d.distribution, lr_d.min, lr_d.max) == ("log_uniform", 1e-4, 8e-4)
    assert sweep.train.lr_g == 1e-4


def test_flat_parameter_names_are_unique():
    model = {f for f in ModelConfig.__dataclass_fields__}
    train = {f for f in TrainConfig.__dataclass_fields__}
    assert not model & train


# --- expansion -------------------------------------------------------------------------------------

HEADS_LIKE = """
name: heads-like
parameters:
  variant: {values: [dcgan, wgan, cmhsa-gan, use-cmhsa-gan]}
  heads: {values: [1, 2, 4, 8], when: {variant: [cmhsa-gan, use-cmhsa-gan]}}
  seed: {values: [0, 1, 2]}
"""


def test_conditional_parameter_only_multiplies_where_it_holds(tmp_path: Path):
    trials = load_sweep(write(tmp_path, HEADS_LIKE)).trials()
    assert len(trials) == 2 * 3 + 2 * 4 * 3
    assert len({repr(sorted(t.items())) for t in trials}) == len(trials)
    for t in trials:
        assert ("heads" in t) == (t["variant"] in ATTENTION_VARIANTS)
    assert trials == load_sweep(write(tmp_path, HEADS_LIKE)).trials()  # deterministic order


def test_seeds_expand_innermost_whatever_their_place_in_the_file(tmp_path: Path):
    sweep = load_sweep(write(tmp_path, "name: r\nparameters:\n  seed: {values: [0, 1]}\n"
                                       "  variant: {values: [dcgan, wgan]}\n  lr_d: {values: [0.001, 0.002]}\n"))
    trials = sweep.trials()
    assert [t["seed"] for t in trials] == [0, 1] * 4
    assert [(t["variant"], t["lr_d"]) for t in trials[::2]] == [("dcgan", 0.001), ("dcgan", 0.002),
                                                                ("wgan", 0.001), ("wgan", 0.002)]
    assert list(trials[0]) == ["seed", "variant", "lr_d"]  # each trial's keys keep the file's order


def test_grid_repeats_add_a_repeat_key(tmp_path: Path):
    once = load_sweep(write(tmp_path, "name: r\nparameters: {seed: {values: [0, 1]}}\n")).trials()
    assert once == [{"seed": 0}, {"seed": 1}]
    sweep = load_sweep(write(tmp_path, "name: r\nnum_samples: 3\ntrain: {seed: 7}\n"
                                       "parameters: {variant: {values: [dcgan, wgan]}}\n"))
    trials = sweep.trials()
    assert [t["repeat"] for t in trials] == [0, 1, 2, 0, 1, 2]  # innermost: a configuration's seeds together
    # Repeats are seed replicates: each gets its own seed (train.seed + repeat), never a copy of repeat 0.
    seeds = [(t["variant"], sweep.trial_config(t).train.seed) for t in trials]
    assert seeds == [("dcgan", 7), ("dcgan", 8), ("dcgan", 9), ("wgan", 7), ("wgan", 8), ("wgan", 9)]
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == len(trials)
    assert sweep.scheduler.unit is None  # fifo
    asha = load_sweep(write(tmp_path, "name: r\nnum_samples: 2\ntrain: {kimg: 40}\nscheduler: {type: asha}\n",
                            "asha.yaml"))
    assert asha.scheduler.unit == "config"  # repeats are seeds: cull configurations, not seeds


def test_list_values_and_yaml_exponents_come_back_typed(tmp_path: Path):
    text = """
name: typed
parameters:
  g_widths: {values: [[512, 256, 128, 64], [1024, 512, 256, 128]]}
  lr_d: {values: [4e-4, 2]}      # YAML 1.1 reads 4e-4 as text; 2 is an int
"""
    trials = load_sweep(write(tmp_path, text)).trials()
    assert trials[0] == {"g_widths": [512, 256, 128, 64], "lr_d": 4e-4}
    assert all(type(t["lr_d"]) is float for t in trials)


RANDOM = """
name: rnd
method: random
num_samples: 300
search_seed: {seed}
parameters:
  variant: {{values: [dcgan, cmhsa-gan]}}
  heads: {{values: [2, 4], when: {{variant: [cmhsa-gan]}}}}
  lr_d: {{distribution: log_uniform, min: 1.0e-4, max: 8.0e-4}}
  attn_dropout: {{distribution: uniform, min: 0.0, max: 0.5}}
  batch_size: {{distribution: int_uniform, min: 16, max: 20}}
"""


def test_random_sampling_is_seeded_bounded_and_log_scaled(tmp_path: Path):
    trials = load_sweep(write(tmp_path, RANDOM.format(seed=7))).trials()
    assert trials == load_sweep(write(tmp_path, RANDOM.format(seed=7))).trials()
    assert trials != load_sweep(write(tmp_path, RANDOM.format(seed=8))).trials()
    assert len(trials) == 300
    assert all(1e-4 <= t["lr_d"] <= 8e-4 and 0 <= t["attn_dropout"] <= 0.5 for t in trials)
    assert {t["batch_size"] for t in trials} == {16, 17, 18, 19, 20}
    assert all(("heads" in t) == (t["variant"] == "cmhsa-gan") for t in trials)
    # log-uniform: half the draws below the geometric mean (uniform would give ~26%)
    below = sum(t["lr_d"] < math.sqrt(1e-4 * 8e-4) for t in trials) / len(trials)
    assert 0.4 < below < 0.6
    assert 0.2 < statistics.mean(t["attn_dropout"] for t in trials) < 0.3


OPTUNA = """
name: opt
method: optuna
num_samples: 10
parameters:
  variant: {values: [dcgan, use-cmhsa-gan]}
  g_widths: {values: [[512, 256, 128, 64], [1024, 512, 256, 128]]}
  heads: {values: [1, 8], when: {variant: [use-cmhsa-gan]}}
  lr_d: {distribution: log_uniform, min: 1.0e-4, max: 8.0e-4}
  d_steps: {distribution: int_uniform, min: 1, max: 3}
  nz: {value: 64}
"""


def test_optuna_space_with_a_real_optuna_trial(tmp_path: Path):
    sweep = load_sweep(write(tmp_path, OPTUNA))
    with pytest.raises(ValueError, match="optuna_space"):
        sweep.trials()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_widths = set()
    for _ in range(30):
        trial = study.ask()
        params = sweep.optuna_space(trial)
        assert params["g_widths"] in ([512, 256, 128, 64], [1024, 512, 256, 128])
        assert trial.params["g_widths"] == "-".join(map(str, params["g_widths"]))  # what Optuna stores
        assert ("heads" in params) == (params["variant"] == "use-cmhsa-gan")
        assert 1e-4 <= params["lr_d"] <= 8e-4 and params["d_steps"] in (1, 2, 3) and params["nz"] == 64
        assert sweep.trial_config(params).model.g_widths == tuple(params["g_widths"])
        seen_widths.add(tuple(params["g_widths"]))
        study.tell(trial, params["lr_d"])
    assert len(seen_widths) == 2


def test_trial_config_merges_parameters_over_fixed_settings(tmp_path: Path):
    text = """
name: merge
data: {image_size: 32}
model: {g_widths: [256, 128, 64], d_widths: [64, 128, 256], heads: 2}
train: {lr_d: 2.0e-4, kimg: 50}
eval: {every_kimg: 5, fid_samples: 100, final_fid_samples: 200}
parameters:
  heads: {values: [4]}
  lr_d: {values: [1.0e-4]}
"""
    sweep = load_sweep(write(tmp_path, text))
    cfg = sweep.trial_config({"heads": 4, "lr_d": 1e-4, "g_widths": [64, 32, 16], "repeat": 1})
    assert (cfg.model.heads, cfg.train.lr_d, cfg.model.g_widths) == (4, 1e-4, (64, 32, 16))
    assert (cfg.model.d_widths, cfg.train.kimg, cfg.eval.fid_samples) == ((64, 128, 256), 50, 100)
    assert cfg.model.image_size == cfg.data.image_size == 32
    with pytest.raises(ValueError, match="lerning_rate"):
        sweep.trial_config({"lerning_rate": 1})


def test_fingerprint_tracks_what_trials_compute(tmp_path: Path):
    base = "name: f\ntrain: {lr_d: 4.0e-4}\nresources: {cpu: 1}\nparameters: {seed: {values: [0, 1]}}\n"
    fp = load_sweep(write(tmp_path, base)).fingerprint()
    assert fp == load_sweep(write(tmp_path, base)).fingerprint()
    assert fp == load_sweep(write(tmp_path, base.replace("cpu: 1", "cpu: 2"))).fingerprint()
    assert fp != load_sweep(write(tmp_path, base.replace("4.0e-4", "2.0e-4"))).fingerprint()
    assert fp != load_sweep(write(tmp_path, base), data_override=str(tmp_path)).fingerprint()


def test_relative_paths_start_from_the_working_directory_and_nothing_is_created(tmp_path, monkeypatch):
    (tmp_path / "faces").mkdir()
    path = write(tmp_path, "name: rel\ndata: {path: faces, cache_dir: cache}\n")
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(path)
    assert sweep.data.path == str(tmp_path / "faces")
    assert sweep.data.cache_dir == str(tmp_path / "cache") and not (tmp_path / "cache").exists()
    assert sweep.trial_config({}).data.path == str(tmp_path / "faces")


def test_asha_defaults(tmp_path: Path):
    text = "name: a\ntrain: {kimg: 100}\neval: {every_kimg: 10}\nscheduler: {type: asha}\n"
    sweep = load_sweep(write(tmp_path, text))
    assert (sweep.scheduler.grace_period, sweep.scheduler.max_t) == (10, 100)


# --- malformed files ---------------------------------------------------------------------------------

MALFORMED = [
    # (id, file text, key in the message or None, text the message must contain)
    ("yaml-syntax", "name: x\nmodel:\n  heads: [1, 2\n", None, "line 4"),
    ("yaml-duplicate-key", "name: x\ntrain:\n  lr_d: 1.0e-4\n  lr_d: 2.0e-4\n", None, "duplicate key 'lr_d'"),
    ("empty-file", "# only a comment\n", None, "empty"),
    ("top-level-list", "- name: x\n", None, "got a list"),
    ("unknown-key", "name: x\ntrain: {lerning_rate: 0.1}\n", "train.lerning_rate", "'lerning_rate'"),
    ("key-in-wrong-section", "name: x\nmodel: {lr_d: 0.1}\n", "model.lr_d", "belongs in train"),
    ("misspelt-top-key", "name: x\nparameter: {}\n", "parameter", "did you mean 'parameters'"),
    ("wrong-type", "name: x\ntrain: {lr_d: fast}\n", "train.lr_d", "expected a number, got 'fast'"),
    ("wrong-type-in-values", "name: x\nparameters: {lr_d: {values: [1.0e-4, fast]}}\n",
     "parameters.lr_d.values[1]", "'fast'"),
    ("missing-name", "method: grid\n", "name", "missing"),
    ("bad-name", "name: ../up\n", "name", "'../up'"),
    ("unknown-variant", "name: x\nparameters: {variant: {values: [dcgan, cmhsa_gan]}}\n",
     "parameters.variant.values[1]", "'cmhsa_gan' (did you mean 'cmhsa-gan'?"),
    ("unknown-method", "name: x\nmethod: bayes\n", "method", "'bayes'"),
    ("unknown-scheduler", "name: x\nscheduler: {type: hyperband}\n", "scheduler.type", "'hyperband'"),
    ("negative-lr", "name: x\ntrain: {lr_d: -1.0e-4}\n", "train.lr_d", "-0.0001"),
    ("zero-lr", "name: x\nparameters: {lr_g: {values: [1.0e-4, 0]}}\n", "parameters.lr_g.values[1]", "got 0"),
    ("infinite-lr", "name: x\ntrain: {lr_g: .inf}\n", "train.lr_g", "inf"),
    ("beta-out-of-range", "name: x\ntrain: {beta1: 1.0}\n", "train.beta1", "1.0"),
    ("heads-not-dividing", "name: x\nparameters: {variant: {values: [dcgan, cmhsa-gan]}, heads: {values: [2, 3]}}\n",
     "parameters.heads.values[1]", "heads=3 does not divide the 128"),
    ("heads-not-dividing-a-swept-width",
     "name: x\nmodel: {variant: use-cmhsa-gan, heads: 8}\n"
     "parameters: {g_widths: {values: [[512, 256, 128, 64], [32, 16, 4, 4]]}}\n",
     "parameters.g_widths.values[1]", "heads=8 does not divide the 4"),
    ("widths-vs-image-size", "name: x\nmodel: {g_widths: [512, 256, 128]}\n", "model.g_widths", "[512, 256, 128]"),
    ("image-size", "name: x\ndata: {image_size: 48}\n", "data.image_size", "48"),
    ("use-at-not-a-generator-resolution",
     "name: x\nmodel: {variant: use-gan}\nparameters: {use_at: {values: [16, 64]}}\n",
     "parameters.use_at.values[1]", "use_at=64"),
    ("cmhsa-at-not-a-generator-resolution", "name: x\nmodel: {variant: cmhsa-gan, cmhsa_at: 12}\n",
     "model.cmhsa_at", "cmhsa_at=12"),
    ("split", "name: x\ndata: {split: [0.8, 0.1, 0.2]}\n", "data.split", "[0.8, 0.1, 0.2]"),
    ("grace-above-max-t", "name: x\ntrain: {kimg: 100}\nscheduler: {type: asha, grace_period: 200}\n",
     "scheduler.grace_period", "200"),
    ("grace-below-first-fid", "name: x\nscheduler: {type: asha, grace_period: 5}\n",
     "scheduler.grace_period", "no fid at its first rung"),
    ("max-t-above-kimg", "name: x\ntrain: {kimg: 100}\nscheduler: {type: asha, max_t: 150}\n",
     "scheduler.max_t", "150"),
    ("every-above-kimg", "name: x\ntrain: {kimg: 10}\n", "eval.every_kimg", "20"),
    ("final-fid-below-fid", "name: x\neval: {fid_samples: 1000, final_fid_samples: 500}\n",
     "eval.final_fid_samples", "500"),
    ("empty-values", "name: x\nparameters: {seed: {values: []}}\n", "parameters.seed.values", "[]"),
    ("bare-list-parameter", "name: x\nparameters: {seed: [0, 1]}\n", "parameters.seed", "[0, 1]"),
    ("distribution-with-grid", "name: x\nparameters: {lr_d: {distribution: uniform, min: 1.0e-4, max: 2.0e-4}}\n",
     "parameters.lr_d.distribution", "uniform"),
    ("min-not-below-max",
     "name: x\nmethod: random\nnum_samples: 2\n"
     "parameters: {lr_d: {distribution: log_uniform, min: 2.0e-4, max: 1.0e-4}}\n",
     "parameters.lr_d.max", "0.0001"),
    ("negative-lr-bound",
     "name: x\nmethod: random\nnum_samples: 2\nparameters: {lr_d: {distribution: uniform, min: -1.0, max: 1.0}}\n",
     "parameters.lr_d.min", "-1.0"),
    ("unknown-parameter", "name: x\nparameters: {lerning_rate: {values: [1]}}\n",
     "parameters.lerning_rate", "'lerning_rate'"),
    ("sweep-eval-key", "name: x\nparameters: {fid_samples: {values: [1000, 2000]}}\n",
     "parameters.fid_samples", "eval.fid_samples"),
    ("sweep-data-key", "name: x\nparameters: {image_size: {values: [32, 64]}}\n",
     "parameters.image_size", "data.image_size"),
    ("when-on-a-distribution",
     "name: x\nmethod: random\nnum_samples: 2\nparameters: {lr_d: {distribution: uniform, min: 1.0e-4, max: 2.0e-4},"
     " heads: {values: [1], when: {lr_d: [1.0e-4]}}}\n",
     "parameters.heads.when.lr_d", "'lr_d'"),
    ("when-never-holds",
     "name: x\nparameters: {variant: {values: [dcgan, wgan]}, heads: {values: [1], when: {variant: [cmhsa-gan]}}}\n",
     "parameters.heads.when.variant", "['cmhsa-gan']"),
    ("random-without-num-samples", "name: x\nmethod: random\n", "num_samples", "random"),
    ("wrong-goal", "name: x\nmetric: {name: fid, goal: maximize}\n", "metric.goal", "'maximize'"),
    ("fractional-gpus-above-one", "name: x\nresources: {gpu: 1.5}\n", "resources.gpu", "1.5"),
    ("two-gpus-for-a-one-gpu-trial", "name: x\nresources: {gpu: 2}\n", "resources.gpu", "one GPU"),
    ("kimg-swept", "name: x\nparameters: {kimg: {values: [100, 200]}}\n", "parameters.kimg", "one budget"),
    ("repeats-with-swept-seeds", "name: x\nnum_samples: 2\nparameters: {seed: {values: [0, 1]}}\n",
     "num_samples", "list more seeds"),
    ("compile-with-wgan", "name: x\ntrain: {compile: true}\nparameters: {variant: {values: [dcgan, wgan]}}\n",
     "train.compile", "double backward"),
    ("swept-compile-with-wgan", "name: x\nmodel: {variant: wgan}\nparameters: {compile: {values: [false, true]}}\n",
     "parameters.compile", "double backward"),
    ("unit-with-fifo", "name: x\nscheduler: {type: fifo, unit: config}\n", "scheduler.unit", "asha"),
    ("unknown-unit", "name: x\nscheduler: {type: asha, unit: seed}\n", "scheduler.unit", "'seed'"),
]


@pytest.mark.parametrize("text,key,needle", [pytest.param(*case[1:], id=case[0]) for case in MALFORMED])
def test_malformed_sweep_fails_with_one_clear_line(tmp_path: Path, text: str, key: str | None, needle: str):
    path = write(tmp_path, text)
    with pytest.raises(SweepError) as caught:
        load_sweep(path)
    error, message = caught.value, str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert error.key == key
    if key:
        assert message.startswith(f"{path}: {key}: ")
    assert needle in error.message


def test_missing_file_and_missing_data_directory(tmp_path: Path):
    with pytest.raises(SweepError, match="file not found"):
        load_sweep(tmp_path / "nope.yaml")
    missing = tmp_path / "no-such-faces"
    path = write(tmp_path, f"name: x\ndata: {{path: '{missing}'}}\n")
    with pytest.raises(SweepError) as caught:
        load_sweep(path)
    assert caught.value.key == "data.path" and str(missing) in caught.value.message
    with pytest.raises(SweepError) as caught:
        load_sweep(write(tmp_path, "name: x\n"), data_override=str(missing))
    assert caught.value.key == "data.path" and "data override" in caught.value.message


def test_asha_unit_defaults_to_config_when_seeds_are_swept_and_warns_when_forced_to_trial(tmp_path: Path):
    base = "name: u\ntrain: {kimg: 40}\nparameters: {variant: {values: [dcgan, wgan]}%s}\nscheduler: {type: asha%s}\n"
    seeded = load_sweep(write(tmp_path, base % (", seed: {values: [0, 1]}", ""), "a.yaml"))
    assert seeded.scheduler.unit == "config" and seeded.warnings() == []
    single = load_sweep(write(tmp_path, base % ("", ""), "b.yaml"))
    assert single.scheduler.unit == "trial" and single.warnings() == []
    forced = load_sweep(write(tmp_path, base % (", seed: {values: [0, 1]}", ", unit: trial"), "c.yaml"))
    assert forced.scheduler.unit == "trial"
    assert len(forced.warnings()) == 1 and "may stop some seeds of a configuration" in forced.warnings()[0]


def test_compile_is_allowed_where_a_condition_keeps_it_away_from_wgan(tmp_path: Path):
    text = ("name: c\nparameters:\n  variant: {values: [dcgan, wgan]}\n"
            "  compile: {values: [true], when: {variant: [dcgan]}}\n")
    sweep = load_sweep(write(tmp_path, text))
    assert [(t["variant"], t.get("compile")) for t in sweep.trials()] == [("dcgan", True), ("wgan", None)]


def test_learning_rates_default_to_each_variants_own_paper(tmp_path: Path):
    from gan.config import optimiser_settings

    sweep = load_sweep(write(tmp_path, "name: lr\nparameters: {variant: {values: [dcgan, wgan, vae-gan]}}\n"))
    settings = {t["variant"]: optimiser_settings(t["variant"], sweep.trial_config(t).train) for t in sweep.trials()}
    assert settings["wgan"] == {"lr_d": 1e-4, "lr_g": 1e-4, "beta1": 0.0, "beta2": 0.9, "d_steps": 5}  # WGAN-GP
    assert settings["dcgan"] == settings["vae-gan"] == {"lr_d": 4e-4, "lr_g": 1e-4, "beta1": 0.5, "beta2": 0.999,
                                                        "d_steps": 1}
    fixed = load_sweep(write(tmp_path, "name: lr\ntrain: {lr_d: 2.0e-4}\nmodel: {variant: wgan}\n", "f.yaml"))
    assert optimiser_settings("wgan", fixed.trial_config({}).train)["lr_d"] == 2e-4  # the file wins
