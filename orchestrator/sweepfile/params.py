"""The flat parameter namespace: every swept name is one field of gan.config.ModelConfig or TrainConfig."""
from __future__ import annotations

import typing
from typing import Any

from pydantic import TypeAdapter

from gan.config import ModelConfig, TrainConfig

# Parameters that make trials replicates of one configuration rather than different configurations.
REPLICATE_PARAMS = ("seed", "repeat")
# Their valid values depend on the channel widths, so they are listed, never sampled.
NO_DISTRIBUTION = ("heads", "use_at", "cmhsa_at")

MODEL_TYPES = {k: v for k, v in typing.get_type_hints(ModelConfig).items() if k != "image_size"}
TRAIN_TYPES = typing.get_type_hints(TrainConfig)
PARAM_TYPES: dict[str, Any] = {**MODEL_TYPES, **TRAIN_TYPES}
PARAM_SECTION = {**{k: "model" for k in MODEL_TYPES}, **{k: "train" for k in TRAIN_TYPES}}
_ADAPTERS = {name: TypeAdapter(hint) for name, hint in PARAM_TYPES.items()}


def base_type(hint: Any) -> Any:
    """`float | None` -> float."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 else hint


def coerce(name: str, value: Any) -> Any:
    """A value in the field's own type, with lists (not tuples) for widths: JSON- and Parquet-friendly."""
    return plain(_ADAPTERS[name].validate_python(value))


def plain(value: Any) -> Any:
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def optuna_choice(value: Any) -> Any:
    """Optuna categoricals must be None/bool/int/float/str: widths become '512-256-128-64'."""
    return "-".join(str(v) for v in value) if isinstance(value, list) else value
